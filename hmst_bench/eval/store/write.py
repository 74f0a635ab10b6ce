"""Writing a parsed benchmark into the store: its rows as jsonl, a digest of them, the manifest
(source, input sha256s, counts, warnings), and the atomic replacement of an earlier copy under
the benchmark's import lock."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from datetime import datetime, timezone
from pathlib import Path

from hmst_bench.eval.store import mmlu
from hmst_bench.eval.store.common import Benchmark, Imported, StoreWarning, store_root
from hmst_bench.locking import FileLock
from hmst_bench.util import atomic_dir, atomic_write_json


def counts_of(data: dict[str, dict[str, list]]) -> dict[str, dict[str, int]]:
    return {config: {split: len(rows) for split, rows in splits.items()} for config, splits in data.items()}


def count_warnings(b: Benchmark, counts: dict[str, dict[str, int]]) -> list[str]:
    """How a copy's row counts differ from the canonical ones: warnings, not errors."""
    if b.name == "mmlu":  # counted over all subjects
        return mmlu.count_warnings(counts)
    out = []
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


def serialise(data: dict[str, dict[str, list[dict]]]) -> dict[str, bytes]:
    return {f"{config}/{split}.jsonl": _jsonl_bytes(rows) for config, splits in data.items() for split, rows in splits.items()}


def make_manifest(b: Benchmark, data, source: str, source_files: dict[str, str], warn: list[str],
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
        "counts": counts_of(data),
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


def store(b: Benchmark, imported: Imported, source: str, source_files: dict[str, str]) -> dict:
    """Replace the stored copy of `b` by `imported`; return its manifest. The count warnings are
    raised as StoreWarnings at the caller of `import_benchmark` or `pull_benchmark`."""
    data = {config: imported.data[config] for config in sorted(imported.data)}
    warn = imported.warnings + count_warnings(b, counts_of(data))
    files = serialise(data)
    man = make_manifest(b, data, source, source_files, warn, files)
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
