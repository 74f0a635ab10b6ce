"""What every part of the store shares: its errors, where it lives, what a benchmark is, and the
check every row passes against its config's schema, whatever its source."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmst_bench.util import home


class StoreError(Exception):
    """A benchmark cannot be imported or read; the message is one line that names the fix."""


class StoreWarning(UserWarning):
    """An imported benchmark differs from its canonical size (or misses part of it)."""


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


@dataclass
class Imported:
    """A benchmark parsed completely, before anything is written."""

    data: dict[str, dict[str, list[dict]]]  # config -> split -> rows
    warnings: list[str]


def store_root() -> Path:
    return home() / "data"


# ---------------------------------------------------------------------------------------------
# Row checking. Field kinds: "ABCD" is an int 0-3 stored by the hub as a ClassLabel; "targets" is
# {"choices": [str], "labels": [int32]}.

LETTERS = "ABCD"


class RowError(ValueError):
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
    else:  # pragma: no cover - a typo in a schema
        raise AssertionError(kind)
    if not ok:
        want = {"str": "a string", "int32": "an integer", "list[str]": "a list of strings", "ABCD": "an integer 0-3",
                "targets": "{choices: [str], labels: [int]} of equal length"}[kind]
        raise RowError(f"{key!r} must be {want}, found {json.dumps(v)[:60]}")
    return v


def check_row(record: Any, schema: dict[str, str]) -> dict:
    if not isinstance(record, dict):
        raise RowError(f"expected a JSON object, found {type(record).__name__}")
    missing = [k for k in schema if k not in record]
    if missing:
        raise RowError(f"missing key {missing[0]!r} (a row needs {', '.join(schema)})")
    row = {k: _check_value(k, kind, record[k]) for k, kind in schema.items()}
    if "choices" in schema and len(row["choices"]) != 4:
        raise RowError(f"expected 4 choices, found {len(row['choices'])}")
    return row
