"""`SuiteSpec`: what `register_suites` registers. Kept free of heavy imports (read at CLI start)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class SuiteSpec:
    """One evaluation suite: a name for `--suite`, a line for `list suites`, and the lm-eval
    task names it runs, with an optional folder of lm-eval task YAML configs that define them."""

    name: str
    description: str
    tasks: Sequence[str] = ()
    task_dir: str | None = None
    distribution: str = field(default="", compare=False)  # filled in by the registry

    def __post_init__(self) -> None:
        if not self.name or " " in self.name:
            raise ValueError(f"suite name {self.name!r} must be a non-empty word")
