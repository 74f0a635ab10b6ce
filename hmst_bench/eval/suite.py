"""`SuiteSpec`: what `register_suites` registers. Kept free of heavy imports (read at CLI start)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

# the keys the runner itself writes into RUN/eval/<suite>.json; a postprocess key must differ
RECORD_KEYS = frozenset({"suite", "tasks", "results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                         "higher_is_better", "n-samples", "samples", "provenance"})
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True)
class SuiteSpec:
    """One evaluation suite: a name for `--suite`, a line for `list suites`, the lm-eval task
    (or group) names it runs, the folder of lm-eval task YAML configs that defines them (None:
    lm-eval's built-in tasks), the benchmark-store datasets they read (`hmst-bench data`),
    whether its metric executes generated code (then `hmst-bench eval` sandboxes it), and the
    metrics computed after lm-eval from the suite's per-sample log.

    `postprocess` maps a key of the result file to the module that computes it. `hmst-bench eval`
    imports each module before it loads the model and, after the suite ran, calls
    `module.postprocess(record, lm, out_dir) -> dict`, stored under the key when not empty
    (out_dir: where the results go, for figures; None when nothing can be written there), and
    `module.summary_rows(record) -> rows` if the module has one: rows for the eval table, in the
    format of `hmst_bench.eval.runner.summary_rows`. Modules run in the mapping's order."""

    name: str
    description: str
    tasks: Sequence[str] = ()
    task_dir: str | None = None
    data: Sequence[str] = ()
    executes_code: bool = False  # its metric runs generated programs (sandbox; --samples, --k, ...)
    postprocess: Mapping[str, str] = field(default_factory=dict, hash=False)  # result key -> module
    distribution: str = field(default="", compare=False)  # filled in by the registry

    def __post_init__(self) -> None:
        if not self.name or " " in self.name:
            raise ValueError(f"suite name {self.name!r} must be a non-empty word")
        if not self.tasks:
            raise ValueError(f"suite {self.name!r} names no lm-eval tasks")
        self._check_postprocess()

    def _check_postprocess(self) -> None:
        example = "e.g. {'calibration': 'hmst_bench.eval.calibration'}"
        if not isinstance(self.postprocess, Mapping):
            raise ValueError(f"suite {self.name!r}: postprocess must map a result key to a module name, {example}")
        for key, module in self.postprocess.items():
            if not isinstance(key, str) or not _KEY.fullmatch(key):
                raise ValueError(f"suite {self.name!r}: postprocess key {key!r} must be a word (letters, digits, _ and -)")
            if key in RECORD_KEYS:
                raise ValueError(f"suite {self.name!r}: postprocess key {key!r} is written by the runner itself; "
                                 "choose another")
            if not isinstance(module, str) or not _MODULE.fullmatch(module):
                raise ValueError(f"suite {self.name!r}: postprocess module {module!r} for {key!r} must be a dotted "
                                 f"module name, {example}")
        object.__setattr__(self, "postprocess", dict(self.postprocess))  # a copy the caller cannot change later
