"""TruthfulQA (`truthfulqa/truthful_qa`): mc_task.json (multiple_choice) and TruthfulQA.csv
(generation), as the hub loader builds them: answer->label dicts become parallel lists in JSON
order; the CSV's ';'-separated answer lists are split and stripped; rows missing correct or
incorrect answers are skipped."""

from __future__ import annotations

from pathlib import Path

from hmst_bench.eval.store.common import Benchmark, Imported, RowError, StoreError
from hmst_bench.eval.store.sources import Sources, checked, csv_rows, json_array

BENCHMARK = Benchmark(
    "truthfulqa", "truthfulqa/truthful_qa", ("multiple_choice", "generation"), ("validation",),
    {"multiple_choice": {"validation": 817}, "generation": {"validation": 817}},
    "a folder holding mc_task.json and/or TruthfulQA.csv (sylinrl/TruthfulQA data/), or one of them",
    "multiple_choice",
)
SCHEMA = {
    "multiple_choice": {"question": "str", "mc1_targets": "targets", "mc2_targets": "targets"},
    "generation": {"type": "str", "category": "str", "question": "str", "best_answer": "str",
                   "correct_answers": "list[str]", "incorrect_answers": "list[str]", "source": "str"},
}

_FILES = {"mc_task.json": "multiple_choice", "truthfulqa.csv": "generation"}
_COLUMNS = ("Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source")


def _targets(record: dict, key: str) -> dict:
    if key not in record:
        raise RowError(f"missing key {key!r} (a row needs question, mc1_targets, mc2_targets)")
    value = record[key]
    if not isinstance(value, dict):
        raise RowError(f"{key!r} must map each answer to its label 0/1")
    return {"choices": list(value), "labels": list(value.values())}


def _multiple_choice(path: Path, text: str) -> list[dict]:
    schema = SCHEMA["multiple_choice"]
    rows = []
    for line, record in json_array(path, text):
        def build(record=record):
            if not isinstance(record, dict):
                raise RowError(f"expected a JSON object, found {type(record).__name__}")
            if "question" not in record:
                raise RowError("missing key 'question'")
            return {"question": record["question"], "mc1_targets": _targets(record, "mc1_targets"),
                    "mc2_targets": _targets(record, "mc2_targets")}
        rows.append(checked(path, line, build, schema))
    return rows


def _answer_list(cell: str) -> list[str]:
    return [part.strip() for part in cell.strip().split(";")]


def _generation(path: Path, text: str, warn: list[str]) -> list[dict]:
    schema = SCHEMA["generation"]
    rows: list[dict] = []
    columns = None
    for line, cells in csv_rows(path, text):
        if columns is None:
            columns = [c.strip() for c in cells]
            missing = [c for c in _COLUMNS if c not in columns]
            if missing:
                raise StoreError(f"{path} line {line}: missing column {missing[0]!r} (the header needs "
                                 f"{', '.join(_COLUMNS)})")
            continue
        if len(cells) != len(columns):
            raise StoreError(f"{path} line {line}: expected {len(columns)} columns, found {len(cells)}")
        r = dict(zip(columns, cells))
        if not r["Correct Answers"] or not r["Incorrect Answers"]:
            warn.append(f"{path} line {line}: no correct or incorrect answers; skipped, as the hub loader does")
            continue
        rows.append(checked(path, line, lambda: {
            "type": r["Type"], "category": r["Category"], "question": r["Question"], "best_answer": r["Best Answer"],
            "correct_answers": _answer_list(r["Correct Answers"]),
            "incorrect_answers": _answer_list(r["Incorrect Answers"]), "source": r["Source"]}, schema))
    if columns is None:
        raise StoreError(f"{path}: empty file (expected a header row: {', '.join(_COLUMNS)})")
    return rows


def import_files(path: Path, src: Sources) -> Imported:
    """Both configs from a folder holding their files, or the one config a single file holds."""
    if path.is_file():
        config = "multiple_choice" if path.suffix.lower() == ".json" else "generation" if path.suffix.lower() == ".csv" else None
        if config is None:
            raise StoreError(f"{path} is neither mc_task.json nor TruthfulQA.csv; PATH: {BENCHMARK.hint}")
        files = {config: path}
    else:  # the top level only: the upstream repo keeps other versions in subfolders
        files = {_FILES[p.name.lower()]: p for p in sorted(path.iterdir())
                 if p.is_file() and p.name.lower() in _FILES}
        if not files:
            raise StoreError(f"no mc_task.json or TruthfulQA.csv in {path}; PATH: {BENCHMARK.hint}")
    data, warn = {}, []
    if "multiple_choice" in files:
        f = files["multiple_choice"]
        data["multiple_choice"] = {"validation": _multiple_choice(f, src.text(f))}
    if "generation" in files:
        f = files["generation"]
        data["generation"] = {"validation": _generation(f, src.text(f), warn)}
    return Imported(data, warn)
