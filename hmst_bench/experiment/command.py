"""What `hmst-bench experiment run` and `hmst-bench compare` do, behind their click wrappers in
cli.py: plan, show the plan (`--dry-run`), run the jobs with a live table, then compare and
write the report. Errors are ExperimentError / CompareError (one line each)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Optional

from rich.console import Console

from hmst_bench.experiment import execute, plan as planning, recorded as records, spec
from hmst_bench.report.collect import CompareError


def runs_root(exp) -> Path:
    return Path(os.environ.get("HMST_BENCH_RUNS", "runs")) / exp.name


def run_experiment(file: Path, jobs: int, executor: str, dry_run: bool, out: Optional[Path], registry,
                   console: Console) -> int:
    """Returns the exit status: 0, or 1 when a run failed (the report is still written)."""
    exp = spec.with_all_archs(spec.load(file), registry)
    root = runs_root(exp)
    report = out or Path("results") / exp.name
    recorded = records.load(report, exp)
    with console.status(f"planning {exp.name}: checking architectures and data, probing a training step of each"):
        plan = planning.make_plan(exp, registry, root, probe=True, recorded=recorded)
    show_plan(plan, jobs, console)
    if dry_run:
        return 0
    execute.write_experiment_json(plan)
    command = f"hmst-bench experiment run {file}"

    def refresh(outcome) -> None:  # each finished run joins the report at once: a killed study keeps it
        if outcome.status == "done":
            try:
                report_experiment(plan, report, Console(quiet=True), command=command)
            except CompareError as exc:
                console.print(f"[yellow]note[/]: report not refreshed: {exc}", highlight=False, soft_wrap=True)
    outcomes = []
    if plan.base is not None and plan.base.steps:  # the pretrained base first: every from_base run starts from it
        base_plan = dataclasses.replace(plan, runs=[plan.base])
        with _Board(base_plan, console) as board:
            first = execute.run_jobs(base_plan, 1, executor, board.update)
        if any(o.status != "done" for o in first):
            o = first[0]
            console.print(f"[red]failed[/]: the base (exit {o.code}): {o.message} (log: {o.run.log})", highlight=False,
                          soft_wrap=True)
            return 1
        with console.status("probing the architectures that start from the base"):
            plan = planning.make_plan(exp, registry, root, probe=True, recorded=recorded)
    if plan.pending:
        started = time.time()
        with _Board(plan, console) as board:
            outcomes = execute.run_jobs(plan, jobs, executor, board.update, on_done=refresh)
        failed = [o for o in outcomes if o.status != "done"]
        console.print(f"{len(outcomes) - len(failed)} of {len(outcomes)} runs finished in {time.time() - started:.0f} s",
                      highlight=False)
        for o in failed:
            console.print(f"[red]failed[/]: {o.run.key} (exit {o.code}): {o.message} (log: {o.run.log})", highlight=False,
                          soft_wrap=True)
    else:
        console.print("every run is complete and evaluated: nothing to train or evaluate", highlight=False)
    comp = report_experiment(plan, report, console, command=command)
    if comp is not None:
        print_comparison(comp, report, console)
    return 1 if any(o.status != "done" for o in outcomes) else 0


def show_plan(plan, jobs: int, console: Console) -> None:
    from rich.table import Table

    exp = plan.experiment
    table = Table(title=f"experiment {exp.name}: {len(plan.runs)} runs, baseline {exp.baseline}")
    for col in ("run", "FLOPs", "est. train time", "to do"):
        table.add_column(col, justify="right" if col in ("FLOPs", "est. train time") else "left")
    for r in ([plan.base] if plan.base is not None else []) + plan.runs:
        todo = ", ".join(s.what for s in r.steps) or ("[green]recorded[/] in the report" if r.recorded else "[green]done[/]")
        table.add_row(r.key, _g(r.flops) if r.flops else "-", _dur(r.seconds) if r.steps and r.seconds else "-", todo)
    console.print(table)
    total = sum(r.flops for r in plan.runs)
    pending = [r for r in plan.pending if any(s.kind == "train" for s in r.steps)]
    est = sum(r.seconds or 0 for r in pending) / max(1, min(jobs, len(pending) or 1))
    probes = "; ".join(f"{k} {_g(p['flops_per_step'])} FLOPs/step in {p['seconds_per_step']:.2f} s"
                       for k, p in plan.probes.items())
    console.print(f"total training compute {_g(total)} FLOPs; {len(plan.pending)} of {len(plan.runs)} runs have work left; "
                  f"estimated training wall time {_dur(est)} at {jobs} job(s) at once (evaluation not included)"
                  + (f"\nmeasured probe steps: {probes}" if probes else ""), highlight=False, soft_wrap=True)
    unprobed = [e.label for e in exp.archs if e.from_base and e.label not in plan.probes] if plan.base and plan.base.steps else []
    if unprobed:
        console.print(f"[yellow]note[/]: {', '.join(unprobed)} start from the base and are probed (budgets checked, "
                      "time estimated) once it is trained", highlight=False)
    for name, why in plan.skipped_suites:
        console.print(f"[yellow]note[/]: suite {name} skipped: {why}", highlight=False)
    rec = plan.recorded
    if rec is not None and rec.stale:
        console.print(f"[yellow]note[/]: {', '.join(rec.stale)} changed in {exp.path} since {rec.folder} recorded "
                      "their runs: those records are not reused, the runs train again", highlight=False, soft_wrap=True)


def _g(x: float) -> str:
    return f"{x:.3g}"


def _dur(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


class _Board:
    """A live table of the jobs: queued, running (with elapsed time), done, failed."""

    COLOURS = {"queued": "dim", "running": "yellow", "done": "green", "failed": "red", "interrupted": "red"}

    def __init__(self, plan, console: Console):
        from rich.live import Live

        self.plan, self.console = plan, console
        self.states: dict = {}
        self.started: dict = {}
        self.live = Live(self._table(), console=console, refresh_per_second=2, transient=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        self.live.update(self._table())
        return self.live.__exit__(*exc)

    def update(self, states: dict) -> None:
        for key, state in states.items():
            if state == "running" and key not in self.started:
                self.started[key] = time.time()
        self.states = dict(states)
        self.live.update(self._table())

    def _table(self):
        from rich.table import Table

        counts = {s: list(self.states.values()).count(s) for s in self.COLOURS}
        table = Table(title=", ".join(f"{n} {s}" for s, n in counts.items() if n) or "starting")
        for col in ("run", "state", "log"):
            table.add_column(col)
        for r in self.plan.pending:
            state = self.states.get(r.key, "queued")
            shown = f"[{self.COLOURS[state]}]{state}[/]"
            if state == "running":
                shown += f" {time.time() - self.started.get(r.key, time.time()):.0f} s"
            table.add_row(r.key, shown, str(r.log) if state in ("running", "failed", "interrupted") else "")
        return table


def report_experiment(plan, out: Path, console: Console, command: str = ""):
    """Compare the experiment's complete runs (here, or recorded in the report) and write the
    report; None when the baseline has none yet."""
    from hmst_bench.report.collect import collect, comparability
    from hmst_bench.report.compare import compare
    from hmst_bench.report.write import write_report

    complete, missing, recorded = [], [], set()
    for r in plan.runs:
        info = planning.read_json(r.out / "run.json")
        if r.recorded:
            recorded.add(records.key(r.label, r.budget, r.seed))
            continue
        if not {st or "" for st, _ in r.stage_budgets} <= planning.done_stages(info):
            why = f"{info.get('status')} at stage {info.get('stage')}" if info else "not trained"
            missing.append({"label": r.label, "budget": r.budget, "seed": r.seed,
                            "why": f"{why}; log {r.log}" if r.log.exists() else why})
            continue
        complete.append(r.out)
    runs, items, mismatches = collect(complete) if complete else (None, None, [])
    if recorded:
        runs, items = records.merge(runs, items, plan.recorded, recorded)
        mismatches = comparability(runs)
        if mismatches:
            raise CompareError(f"{mismatches[0]} (runs recorded in {out} against runs here); move that report away "
                               "to retrain its runs")
    if runs is None or not (runs["label"] == plan.experiment.baseline).any():
        console.print(f"[red]no report[/]: the baseline {plan.experiment.baseline} has no complete run yet", highlight=False)
        return None
    meta = {"experiment": plan.experiment.name, "description": plan.experiment.description,
            "metrics_by_suite": {s.name: list(s.metrics) for s in plan.suites}, "mismatches": mismatches,
            "missing_runs": missing, "skipped_suites": [{"name": n, "reason": w} for n, w in plan.skipped_suites],
            "command": command, "entry_digests": records.entry_digests(plan.experiment)}
    comp = compare(runs, items, plan.experiment.baseline, meta["metrics_by_suite"], mismatches)
    write_report(comp, items, out, meta)
    return comp


def compare_command(patterns: list, baseline: Optional[str], out: Optional[Path], allow_mismatch: bool,
                    manifest: Optional[Path], console: Console):
    """`hmst-bench compare`: from run folders (or a report's manifest) to a report folder."""
    from hmst_bench.report.collect import collect, find_runs
    from hmst_bench.report.compare import compare
    from hmst_bench.report.write import read_manifest, write_report

    if manifest is not None:
        if patterns:
            raise CompareError("give run folders or --manifest, not both")
        runs, items, meta = read_manifest(manifest)
        out = out or manifest.parent
        baseline = baseline or meta.get("baseline")
    else:
        if not patterns:
            raise CompareError("give run folders or globs (e.g. 'runs/demo/*/*'), an experiment folder, or --manifest")
        paths = find_runs(patterns)
        runs, items, mismatches = collect(paths, allow_mismatch)
        experiments = set(runs["experiment"].dropna())
        exp = execute.read_experiment_json(Path(paths[0]).parent.parent) if len(experiments) == 1 else None
        meta = {"experiment": next(iter(experiments)) if len(experiments) == 1 else None,
                "description": (exp or {}).get("description", ""),
                "metrics_by_suite": {s["name"]: s["metrics"] for s in (exp or {}).get("suites", [])},
                "mismatches": mismatches, "missing_runs": [], "skipped_suites": (exp or {}).get("skipped_suites", []),
                "command": ""}
        baseline = baseline or (exp or {}).get("baseline") or _default_baseline(runs)
        out = out or Path("results") / (meta["experiment"] or "comparison")
    comp = compare(runs, items, baseline, meta.get("metrics_by_suite"), meta.get("mismatches"))
    meta = {k: v for k, v in meta.items() if k != "baseline"}
    write_report(comp, items, out, meta)
    print_comparison(comp, out, console)
    return comp


def _default_baseline(runs) -> str:
    labels = list(dict.fromkeys(runs["label"]))
    dense = [lab for lab in labels if str(lab).startswith("dense-")]
    if len(dense) == 1:
        return dense[0]
    raise CompareError(f"which run is the baseline? pass --baseline LABEL (labels: {', '.join(map(str, labels))})")


def print_comparison(comp, out: Path, console: Console) -> None:
    from rich.table import Table

    from hmst_bench.report.write import _ci, _f, headlines

    console.print(f"\n[bold]Compute-matched comparison against {comp.baseline}[/]")
    for line in headlines(comp):
        console.print("  " + line.replace("**", ""), highlight=False, soft_wrap=True)
    table = Table(title="validation loss, compute multiplier and each suite's main metric [95% CI]")
    for col in ("architecture", "budget", "FLOPs", "val loss", "multiplier"):
        table.add_column(col)
    suites = comp.metrics[(comp.metrics["suite"] != "validation")]
    units = []  # per suite its headline: the suite's own (group) row if it has one, with each compared metric
    for suite, df in suites.groupby("suite", sort=False):
        top = df[df["task"] == suite] if (df["task"] == suite).any() else df[df["task"] == df["task"].iloc[0]]
        units += list(dict.fromkeys(zip(top["task"], top["metric"])))
    units = units[:5]
    for task, metric in units:
        table.add_column(f"{task} {metric}")
    scale = comp.scaling.set_index(["label", "budget"])
    index = comp.metrics.set_index(["label", "budget", "task", "metric"])
    for (label, budget), r in scale.sort_values("achieved_flops").sort_index(level=0, sort_remaining=False).iterrows():
        cells = [label, str(budget), _f(r["achieved_flops"]), _f(r["val_loss"]),
                 "1 (baseline)" if label == comp.baseline else _ci(r["multiplier"], r["lo"], r["hi"], 2)]
        for task, metric in units:
            try:
                e = index.loc[(label, budget, task, metric)]
                cells.append(_ci(e["value"], e["lo"], e["hi"], 2))
            except KeyError:
                cells.append("missing")
        table.add_row(*cells)
    console.print(table)
    sig = comp.paired[comp.paired["significant"]] if len(comp.paired) else comp.paired
    console.print(f"{len(comp.paired)} paired comparisons against {comp.baseline}, {len(sig)} significant after Holm; "
                  f"report: {out / 'README.md'}", highlight=False, soft_wrap=True)
