"""Run a plan's pending runs as independent jobs and show their state.

`local`: up to N job processes at once (`python -m hmst_bench.experiment.job`), each writing its
log; they die with this process (PR_SET_PDEATHSIG), and a SIGINT/SIGTERM here is passed on, so the
trainer checkpoints and the next `experiment run` resumes. `slurm`: each job submitted through
submitit (`HMST_BENCH_SUBMITIT_CLUSTER=local` selects submitit's local executor, which is how it is
tested without a cluster), at most N in flight. One job's failure is reported with its log path
and the last line of the log; the other jobs go on.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from hmst_bench.experiment.plan import Plan, RunPlan
from hmst_bench.experiment.spec import ExperimentError
from hmst_bench.util import atomic_write_json

POLL_SECONDS = 0.5


@dataclass
class Outcome:
    run: RunPlan
    status: str  # "done" | "failed" | "interrupted"
    code: int
    seconds: float
    message: str = ""


def job_file(plan: Plan, run: RunPlan) -> Path:
    path = plan.root / "jobs" / f"{run.label}-{run.out.name}.json"
    atomic_write_json(path, {"steps": [s.__dict__ for s in run.steps], "processes": run.processes, "log": str(run.log),
                             "run": str(run.out)})
    return path


def _die_with_parent() -> None:  # runs in the child before exec: SIGTERM when the parent dies
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def thread_env(jobs: int) -> dict:
    """Each of `jobs` concurrent processes gets its share of the cores: N processes each starting
    a full-width thread pool on the same cores slow each other down (unless the user chose)."""
    share = str(max(1, (os.cpu_count() or 1) // max(1, jobs)))
    return {k: os.environ.get(k, share) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


class LocalJob:
    def __init__(self, plan: Plan, run: RunPlan, jobs: int = 1):
        run.log.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(run.log, "ab")
        env = {**os.environ, "TQDM_DISABLE": "1", **thread_env(jobs)}
        self.proc = subprocess.Popen([sys.executable, "-m", "hmst_bench.experiment.job", str(job_file(plan, run))],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     preexec_fn=_die_with_parent, start_new_session=True)

    def poll(self) -> Optional[int]:
        code = self.proc.poll()
        if code is not None:
            self.log.close()
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the trainer finishes its step and checkpoints


class SubmititJob:
    def __init__(self, executor, plan: Plan, run: RunPlan):
        from hmst_bench.experiment.job import submitit_entry

        run.log.parent.mkdir(parents=True, exist_ok=True)
        self.job = executor.submit(submitit_entry, str(job_file(plan, run)))

    def poll(self) -> Optional[int]:
        if not self.job.done():
            return None
        try:
            self.job.result()
            return 0
        except Exception:  # noqa: BLE001 - submitit re-raises the job's error; the log says what it was
            return 1

    def stop(self) -> None:
        self.job.cancel(check=False)


def submitit_executor(plan: Plan):
    import shutil

    try:
        import submitit
    except ImportError:
        raise ExperimentError("--executor slurm needs submitit: pip install submitit") from None
    cluster = os.environ.get("HMST_BENCH_SUBMITIT_CLUSTER") or None
    if cluster is None and shutil.which("sbatch") is None:
        raise ExperimentError("--executor slurm: no Slurm here (sbatch not found); use --executor local")
    executor = submitit.AutoExecutor(folder=str(plan.root / "submitit"), cluster=cluster or "slurm")
    params = dict(plan.experiment.slurm)
    params.setdefault("timeout_min", 24 * 60)
    params.setdefault("name", f"hmst-bench-{plan.experiment.name}")
    try:
        executor.update_parameters(**params)
    except (TypeError, ValueError) as exc:
        raise ExperimentError(f"{plan.experiment.path}: [slurm]: {exc}") from None
    return executor


def run_jobs(plan: Plan, jobs: int, executor: str, show: Callable[[dict], None],
             on_done: Optional[Callable[[Outcome], None]] = None) -> list[Outcome]:
    """Run every pending run, at most `jobs` at once; `show(states)` is called as states change
    (label/budget/seed -> "queued" | "running" | "done" | "failed" | "interrupted") and
    `on_done(outcome)` as each job ends."""
    pending = list(plan.pending)
    states = {r.key: "queued" for r in pending}
    if executor == "local":
        def make(p, r):
            return LocalJob(p, r, jobs)
    else:
        ex = submitit_executor(plan)

        def make(p, r):
            return SubmititJob(ex, p, r)
    running: dict = {}
    outcomes = []
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)
        for job, _, _ in running.values():
            job.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        show(states)
        while pending or running:
            while pending and len(running) < jobs and not stopping:
                run = pending.pop(0)
                running[run.key] = (make(plan, run), run, time.time())
                states[run.key] = "running"
                show(states)
            time.sleep(POLL_SECONDS)
            for key, (job, run, started) in list(running.items()):
                code = job.poll()
                if code is None:
                    continue
                del running[key]
                status = "done" if code == 0 else ("interrupted" if stopping else "failed")
                states[key] = status
                outcomes.append(Outcome(run, status, code, time.time() - started, "" if code == 0 else last_line(run.log)))
                show(states)
                if on_done is not None:
                    on_done(outcomes[-1])
            if stopping and not running:
                break
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if stopping:
        raise KeyboardInterrupt
    return outcomes


def last_line(log: Path) -> str:
    """The job's error: the last `error:` line of its log, else its last line."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [""])[-1].strip()


def write_experiment_json(plan: Plan) -> Path:
    """runs/<name>/experiment.json: what `compare` needs to know about this experiment's runs."""
    exp = plan.experiment
    path = plan.root / "experiment.json"
    record = {
        "name": exp.name, "file": str(exp.path), "digest": exp.digest, "baseline": exp.baseline,
        "description": exp.description,
        "archs": [{"label": a.label, "arch": a.arch, "size": a.size, "set": a.sets, "stages": a.stages} for a in exp.archs],
        "budgets": list(exp.budgets), "seeds": list(exp.seeds), "corpus": exp.corpus, "seq_len": exp.seq_len,
        "suites": [{"name": s.name, "options": s.options, "metrics": list(s.metrics)} for s in plan.suites],
        "skipped_suites": [{"name": n, "reason": why} for n, why in plan.skipped_suites],
        # run folders relative to this file's folder, so the experiment can be moved or copied
        "runs": [{"label": r.label, "budget": r.budget, "seed": r.seed, "path": r.out.relative_to(plan.root).as_posix()}
                 for r in plan.runs],
    }
    if read_experiment_json(plan.root) != json.loads(json.dumps(record)):  # a finished experiment's rerun writes nothing
        atomic_write_json(path, record)
    return path


def read_experiment_json(root: Path) -> Optional[dict]:
    try:
        return json.loads((Path(root) / "experiment.json").read_text())
    except (OSError, ValueError):
        return None
