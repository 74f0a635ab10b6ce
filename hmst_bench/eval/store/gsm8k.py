"""GSM8K (`openai/gsm8k`): train.jsonl and test.jsonl, already in the hub's schema."""

from __future__ import annotations

from pathlib import Path

from hmst_bench.eval.store.common import Benchmark, Imported, StoreError
from hmst_bench.eval.store.sources import Sources, checked_records, find_files

BENCHMARK = Benchmark(
    "gsm8k", "openai/gsm8k", ("main",), ("train", "test"),
    {"main": {"train": 7473, "test": 1319}},
    "a folder holding train.jsonl and test.jsonl (openai/grade-school-math grade_school_math/data/)",
    "main",
)
SCHEMA = {"main": {"question": "str", "answer": "str"}}


def import_files(path: Path, src: Sources) -> Imported:
    """Both splits from a folder, or the one split a file's name says it holds."""
    schema = SCHEMA["main"]
    if path.is_file():
        split = "train" if "train" in path.name.lower() else "test" if "test" in path.name.lower() else None
        if split is None:
            raise StoreError(f"cannot tell whether {path} is the train or the test split; name it train.jsonl or test.jsonl")
        files = {split: path}
    else:
        files = {name.split(".")[0]: p for name, p in find_files(path, ("train.jsonl", "test.jsonl")).items()}
        if not files:
            raise StoreError(f"no train.jsonl or test.jsonl in {path}; PATH: {BENCHMARK.hint}")
    main = {split: [row for _, row in checked_records(files[split], src.text(files[split]), schema)]
            for split in ("train", "test") if split in files}
    return Imported({"main": main}, [])
