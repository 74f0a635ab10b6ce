"""Repository-wide source conventions that a reviewer would otherwise have to re-check by hand
(HMST's review listed them as failures): mixed precision goes through `torch.amp` /
accelerate, never the deprecated `torch.cuda.amp` namespace."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for root in ("hmst_bench", "baselines", "plugins", "suites", "benchmarks")
           for p in (REPO / root).rglob("*.py") if ".egg-info" not in p.parts]


def test_sources_are_found():
    assert len(SOURCES) > 30 and any(p.name == "model.py" for p in SOURCES)


def test_no_deprecated_cuda_amp():
    pattern = re.compile(r"torch\.cuda\.amp|from torch\.cuda import amp")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in SOURCES
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert offenders == [], f"use torch.amp (or accelerate) instead of torch.cuda.amp: {offenders}"
