"""MBPP (`google-research-datasets/mbpp`): mbpp.jsonl (full) and sanitized-mbpp.json (a JSON
array), already in the hub's schema; the hub's splits are ranges of task ids."""

from __future__ import annotations

from pathlib import Path

from hmst_bench.eval.store.common import Benchmark, Imported, StoreError
from hmst_bench.eval.store.sources import Sources, checked_records, find_files

BENCHMARK = Benchmark(
    "mbpp", "google-research-datasets/mbpp", ("full", "sanitized"), ("train", "test", "validation", "prompt"),
    {"full": {"train": 374, "test": 500, "validation": 90, "prompt": 10},
     "sanitized": {"train": 120, "test": 257, "validation": 43, "prompt": 7}},
    "a folder holding mbpp.jsonl and/or sanitized-mbpp.json (google-research mbpp/), or one of them",
    "full",
)
SCHEMA = {
    "full": {"task_id": "int32", "text": "str", "code": "str", "test_list": "list[str]",
             "test_setup_code": "str", "challenge_test_list": "list[str]"},
    "sanitized": {"source_file": "str", "task_id": "int32", "prompt": "str", "code": "str",
                  "test_imports": "list[str]", "test_list": "list[str]"},
}

# MBPP's canonical splits by task id (google-research mbpp README).
SPLITS = (("prompt", 1, 10), ("test", 11, 510), ("validation", 511, 600), ("train", 601, 974))


def _by_split(path: Path, records: list[tuple[int, dict]], warn: list[str]) -> dict[str, list[dict]]:
    """Rows into the canonical splits by task id, each in task-id order."""
    seen: dict[int, int] = {}
    splits: dict[str, list[dict]] = {name: [] for name, _, _ in SPLITS}
    for line, row in records:
        tid = row["task_id"]
        if tid in seen:
            raise StoreError(f"{path} line {line}: task_id {tid} appears twice (first at line {seen[tid]})")
        seen[tid] = line
        split = next((name for name, lo, hi in SPLITS if lo <= tid <= hi), None)
        if split is None:
            warn.append(f"{path} line {line}: task_id {tid} is outside the canonical ranges (1-974); skipped")
            continue
        splits[split].append(row)
    order = BENCHMARK.splits
    return {split: sorted(splits[split], key=lambda r: r["task_id"]) for split in order}


def import_files(path: Path, src: Sources) -> Imported:
    """Both configs from a folder holding their files, or the one config a single file holds."""
    if path.is_file():
        config = "full" if path.name.endswith(".jsonl") else "sanitized" if path.name.endswith(".json") else None
        if config is None:
            raise StoreError(f"{path} is neither mbpp.jsonl nor sanitized-mbpp.json; PATH: {BENCHMARK.hint}")
        files = {config: path}
    else:
        named = find_files(path, ("mbpp.jsonl", "sanitized-mbpp.json"))
        files = {"mbpp.jsonl": "full", "sanitized-mbpp.json": "sanitized"}
        files = {files[name]: p for name, p in named.items()}
        if not files:
            raise StoreError(f"no mbpp.jsonl or sanitized-mbpp.json in {path}; PATH: {BENCHMARK.hint}")
    data, warn = {}, []
    for config in ("full", "sanitized"):
        if config in files:
            f = files[config]
            records = checked_records(f, src.text(f), SCHEMA[config], array=config == "sanitized")
            data[config] = _by_split(f, records, warn)
    return Imported(data, warn)
