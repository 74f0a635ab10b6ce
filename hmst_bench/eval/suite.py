"""`SuiteSpec`: what `register_suites` registers. Kept free of heavy imports (read at CLI start)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class SuiteSpec:
    """One evaluation suite: a name for `--suite`, a line for `list suites`, the lm-eval task
    (or group) names it runs, the folder of lm-eval task YAML configs that defines them (None:
    lm-eval's built-in tasks), the benchmark-store datasets they read (`hmst-bench data`), and
    whether its metric executes generated code (then `hmst-bench eval` sandboxes it)."""

    name: str
    description: str
    tasks: Sequence[str] = ()
    task_dir: str | None = None
    data: Sequence[str] = ()
    executes_code: bool = False  # its metric runs generated programs (sandbox; --samples, --k, ...)
    distribution: str = field(default="", compare=False)  # filled in by the registry

    def __post_init__(self) -> None:
        if not self.name or " " in self.name:
            raise ValueError(f"suite name {self.name!r} must be a non-empty word")
        if not self.tasks:
            raise ValueError(f"suite {self.name!r} names no lm-eval tasks")
