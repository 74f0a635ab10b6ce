"""Runs recorded in an experiment's report: how a study outlives the machine that trains it.

A report folder (results/<name>/) holds each finished run's row and its per-item scores
(manifest.json, items.parquet): everything a comparison is computed from, without the weights.
When `experiment run` finds a run recorded there and no folder for it under runs/<name>/, the run
counts as done: its recorded scores join the next report and nothing retrains it. So a study longer
than one machine's life (a preempted node, a wiped cloud box) goes on from a clone of the repository
once its report is committed; the report is rewritten after every finished run for that reason.

A record is reused only while the experiment entry that produced it is unchanged. The manifest keeps
one digest per entry of everything that decides its runs (architecture, size, settings, stages, the
base it starts from, corpus, window, vocabulary, recipe, suites and their options); an edited entry's
records are ignored and the plan says so. The shared tokenizer is retrained on a new machine: it is
deterministic, and the comparison still refuses runs whose tokenizer hashes differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hmst_bench.experiment.spec import ArchEntry, Experiment, ExperimentError


def entry_digest(exp: Experiment, entry: ArchEntry) -> str:
    """sha256 of what decides every run of `entry` in `exp` (its label excluded: renaming keeps records)."""
    decided = {
        "entry": {k: v for k, v in dataclasses.asdict(entry).items() if k not in ("label", "processes")},
        "base": dataclasses.asdict(exp.base) if entry.from_base and exp.base else None,
        "corpus": exp.corpus, "seq_len": exp.seq_len, "vocab_size": exp.vocab_size, "training": exp.training,
        "suites": [{"name": s.name, "options": s.options} for s in exp.suites],
    }
    return hashlib.sha256(json.dumps(decided, sort_keys=True, default=str).encode()).hexdigest()


def entry_digests(exp: Experiment) -> dict:
    return {entry.label: entry_digest(exp, entry) for entry in exp.archs}


@dataclass
class Recorded:
    """The reusable runs of one report folder: their manifest rows and item scores."""

    folder: Optional[Path] = None
    runs: list = field(default_factory=list)  # manifest rows (dicts)
    items: object = None  # DataFrame of those runs' items, or None
    stale: list = field(default_factory=list)  # labels whose entry changed since they were recorded

    @property
    def keys(self) -> set:
        return {key(r["label"], r["budget"], r["seed"]) for r in self.runs}


def key(label: str, budget, seed) -> tuple:
    return str(label), str(budget), int(seed)


def load(folder: Path, exp: Experiment) -> Recorded:
    """The runs of the report in `folder` that `exp` may reuse (none when there is no report)."""
    import pandas as pd

    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.exists():
        return Recorded(folder)
    try:
        manifest = json.loads(path.read_text())
        items = pd.read_parquet(folder / "items.parquet")
    except (OSError, ValueError) as exc:
        raise ExperimentError(f"the report in {folder} cannot be read ({exc}); restore it (git checkout {folder}) "
                              "or move it away to recompute every run") from None
    if manifest.get("experiment") != exp.name:
        return Recorded(folder)
    recorded = manifest.get("entry_digests") or {}
    current = entry_digests(exp)
    stale = sorted({r.get("label") for r in manifest.get("runs", [])} & set(current)
                   - {label for label in current if recorded.get(label) == current[label]})
    rows = [r for r in manifest.get("runs", []) if r.get("label") in current and r.get("label") not in stale
            and r.get("status") == "complete"]
    kept = {r["run"] for r in rows}
    return Recorded(folder, rows, items[items["run"].isin(kept)].reset_index(drop=True), stale)


def merge(local_runs, local_items, recorded: Recorded, wanted: set):
    """Local runs plus the recorded runs in `wanted` (keys) that no local run replaces."""
    import pandas as pd

    have = set() if local_runs is None or not len(local_runs) else {
        key(r.label, r.budget, r.seed) for r in local_runs.itertuples()}
    rows = [r for r in recorded.runs if key(r["label"], r["budget"], r["seed"]) in wanted - have]
    if not rows:
        return local_runs, local_items
    names = {r["run"] for r in rows}
    extra_items = recorded.items[recorded.items["run"].isin(names)]
    frames = [f for f in (local_runs, pd.DataFrame(rows)) if f is not None and len(f)]
    runs = pd.concat(frames, ignore_index=True)
    items = pd.concat([f for f in (local_items, extra_items) if f is not None and len(f)], ignore_index=True)
    return runs, items
