"""MMLU (`cais/mmlu`, one config per subject): the Hendrycks CSVs (headerless, answer letter),
reformatted CSVs (header, answer 0-3) and jsonl, turned into the hub's rows."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hmst_bench.eval.store.common import LETTERS, Benchmark, Imported, RowError, StoreError
from hmst_bench.eval.store.sources import Sources, check_link, checked, csv_rows, hidden, jsonl

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

BENCHMARK = Benchmark(
    "mmlu", "cais/mmlu", MMLU_SUBJECTS, ("test", "validation", "dev"),
    {"all": {"test": 14042, "validation": 1531, "dev": 285}},
    "a folder with the Hendrycks CSVs (<subject>_test.csv, _val.csv, _dev.csv; with or without a "
    "header row) and/or jsonl files, e.g. the data/ folder of the MMLU tarball",
    "all",
)
ROW = {"question": "str", "subject": "str", "choices": "list[str]", "answer": "ABCD"}
SCHEMA = {"*": ROW}  # every subject has the same fields

_SUBJECT = re.compile(r"[a-z0-9_]+")  # a subject name becomes a folder name in the store
_CSV = re.compile(r"^(?P<subject>[a-z0-9_]+)_(?P<split>test|dev|val)\.csv$")
_CSV_SPLIT = {"test": "test", "dev": "dev", "val": "validation"}
_CHOICE_KEYS = ("choice_a", "choice_b", "choice_c", "choice_d")


def _csv_file(path: Path, text: str, subject: str) -> list[dict]:
    rows: list[dict] = []
    header = None
    for line, cells in csv_rows(path, text):
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
            if len(answer) != 1 or answer not in LETTERS:
                raise StoreError(f"{path} line {line}: answer {cells[5]!r} is not one of A, B, C, D")
            index = LETTERS.index(answer)
        rows.append(checked(path, line, lambda: {"question": cells[0], "subject": subject, "choices": cells[1:5],
                                                  "answer": index}, ROW))
    return rows


def _hub_form(record: Any) -> dict:
    if not isinstance(record, dict):
        raise RowError(f"expected a JSON object, found {type(record).__name__}")
    if "choices" in record:  # already the hub's form
        answer = record.get("answer")
        if isinstance(answer, str) and answer in LETTERS and len(answer) == 1:
            record = {**record, "answer": LETTERS.index(answer)}
        return record
    for key in ("subject", "question", *_CHOICE_KEYS, "answer"):
        if key not in record:
            raise RowError(f"missing key {key!r} (a row needs subject, question, choice_a..choice_d, answer)")
    if record["answer"] not in _CHOICE_KEYS:
        raise RowError(f"answer {record['answer']!r} is not one of {', '.join(_CHOICE_KEYS)}")
    return {"question": record["question"], "subject": record["subject"],
            "choices": [record[k] for k in _CHOICE_KEYS], "answer": _CHOICE_KEYS.index(record["answer"])}


def _jsonl_subjects(path: Path, text: str) -> dict[str, list[dict]]:
    by_subject: dict[str, list[dict]] = {}
    for line, record in jsonl(path, text):
        row = checked(path, line, lambda: _hub_form(record), ROW)
        if not _SUBJECT.fullmatch(row["subject"]):
            raise StoreError(f"{path} line {line}: subject {row['subject']!r} is not a subject name "
                             "(lower-case letters, digits and _)")
        by_subject.setdefault(row["subject"], []).append(row)
    return by_subject


def _jsonl_split(path: Path) -> str:
    name = path.name.lower()
    return "dev" if "dev" in name else "validation" if "val" in name else "test"


def import_files(path: Path, src: Sources) -> Imported:
    """Every subject and split found at `path` (a file, or a folder searched throughout)."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if not hidden(p, path)
                       and "auxiliary_train" not in p.relative_to(path).parts)  # the tarball's training extras
        for link in files:
            if _CSV.match(link.name) or link.name.endswith(".jsonl"):
                check_link(link)
        files = [p for p in files if p.is_file()]
    found: dict[tuple[str, str], tuple[Path, list[dict]]] = {}
    for f in files:
        match = _CSV.match(f.name)
        if match:
            split = _CSV_SPLIT[match["split"]]
            parsed = {match["subject"]: _csv_file(f, src.text(f), match["subject"])}
        elif f.name.endswith(".jsonl") and "train" not in f.name.lower():  # not the auxiliary training set
            split = _jsonl_split(f)
            parsed = _jsonl_subjects(f, src.text(f))
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
        raise StoreError(f"no MMLU files in {path}; PATH: {BENCHMARK.hint}")
    data: dict[str, dict[str, list[dict]]] = {}
    for subject in sorted({s for s, _ in found}):
        data[subject] = {split: found[(subject, split)][1] for split in BENCHMARK.splits
                         if (subject, split) in found}
    return Imported(data, [])


def count_warnings(counts: dict[str, dict[str, int]]) -> list[str]:
    """How an imported copy differs from the 57 canonical subjects and the splits' summed sizes."""
    out = []
    unknown = sorted(set(counts) - set(MMLU_SUBJECTS))
    missing = sorted(set(MMLU_SUBJECTS) - set(counts))
    if unknown:
        out.append(f"mmlu: {len(unknown)} subject(s) not among the 57 canonical ones: {', '.join(unknown[:5])}")
    if missing:
        out.append(f"mmlu: {len(counts)} subjects, canonical 57; missing {', '.join(missing[:5])}"
                   + (" ..." if len(missing) > 5 else ""))
    for split, want in BENCHMARK.counts["all"].items():
        got = sum(c.get(split, 0) for c in counts.values())
        if got != want:
            out.append(f"mmlu {split}: {got} rows over all subjects, canonical {want}")
    return out
