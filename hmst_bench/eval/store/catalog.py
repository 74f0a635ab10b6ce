"""The benchmarks the store knows, one module each: their hub records, row schemas and importers,
gathered in one place and looked up by name."""

from __future__ import annotations

from hmst_bench.eval.store import gsm8k, humaneval, mbpp, mmlu, truthfulqa
from hmst_bench.eval.store.common import Benchmark, StoreError

_MODULES = (mmlu, truthfulqa, gsm8k, mbpp, humaneval)  # the order `data list` and errors show

BENCHMARKS: dict[str, Benchmark] = {m.BENCHMARK.name: m.BENCHMARK for m in _MODULES}
# Field types per benchmark config ("*": every config), in the hub's column order (common.py: kinds)
SCHEMAS: dict[str, dict[str, dict[str, str]]] = {m.BENCHMARK.name: m.SCHEMA for m in _MODULES}
IMPORTERS = {m.BENCHMARK.name: m.import_files for m in _MODULES}  # name -> import_files(path, Sources)


def benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise StoreError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def schema(name: str, config: str) -> dict[str, str]:
    table = SCHEMAS[name]
    return table.get(config) or table["*"]
