"""One experiment job: the steps of one run (train, later stages, evaluations, inference cost),
in one process, in order. `python -m hmst_bench.experiment.job JOB.json` runs it; the local pool
starts it as a subprocess and submitit (Slurm) calls `run_file` on the node.

Each step is the `hmst-bench` command a user would type, run in-process through the CLI (so
its checks, errors and run-directory rules are exactly the CLI's, and the interpreter and its
imports are paid once per run, not once per command). A multi-process training step goes through
`accelerate launch` (GPUs) or torchrun (CPUs) instead. The first failing step ends the job: its
one-line error is the log's last line and the exit status is non-zero.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def distributed_argv(argv: list, processes: int) -> list:
    """The command line that runs `hmst-bench ARGV` in `processes` data-parallel processes."""
    import torch

    if torch.cuda.is_available():
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "-m", "hmst_bench.cli", *argv]
    # `accelerate launch --cpu` starts one process; torchrun with ACCELERATE_USE_CPU starts N
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "hmst_bench.cli", *argv]


def run_steps(steps: list, processes: int = 1) -> int:
    """Run the steps; returns 0, or the exit status of the first that failed."""
    import click

    from hmst_bench.cli import cli

    for step in steps:
        shown = " ".join(step["argv"]) if step["kind"] == "cost" else "hmst-bench " + " ".join(step["argv"])
        print(f"== {step['what']}: {shown}", file=sys.stderr, flush=True)
        if step["kind"] == "cost":
            from hmst_bench.report.cost import measure

            try:
                record = measure(step["argv"][0])
            except Exception as exc:  # noqa: BLE001 - reported as the job's failure, in one line
                print(f"error: inference cost of {step['argv'][0]}: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
            print(f"FLOPs per generated token: {record['flops_per_generated_token']}", file=sys.stderr)
            continue
        if step["kind"] == "train" and processes > 1:
            env = {**os.environ, "ACCELERATE_USE_CPU": os.environ.get("ACCELERATE_USE_CPU", "1")}
            code = subprocess.call(distributed_argv(step["argv"], processes), env=env)
            if code:
                print(f"error: {step['what']} exited with status {code}", file=sys.stderr)
                return code
            continue
        try:
            cli.main(args=list(step["argv"]), prog_name="hmst-bench", standalone_mode=False)
        except click.exceptions.Abort:
            print("error: aborted", file=sys.stderr)
            return 130
        except click.ClickException as exc:
            print(f"error: {exc.format_message()}", file=sys.stderr)
            return exc.exit_code or 1
        except SystemExit as exc:  # train interrupted by a signal exits 128 + signum
            if exc.code:
                print(f"error: {step['what']} stopped with status {exc.code}", file=sys.stderr)
                return int(exc.code) if isinstance(exc.code, int) else 1
    return 0


def run_file(path: str) -> int:
    with open(path) as fh:
        job = json.load(fh)
    return run_steps(job["steps"], job.get("processes", 1))


def submitit_entry(path: str) -> None:
    """What submitit runs on the node: the job in a child process (its log redirected), raising
    when it fails so the job shows as failed."""
    with open(path) as fh:
        job = json.load(fh)
    with open(job["log"], "ab") as log:
        code = subprocess.call([sys.executable, "-m", "hmst_bench.experiment.job", path], stdout=log, stderr=log)
    if code:
        raise RuntimeError(f"job exited with status {code}; see {job['log']}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(run_file(sys.argv[1]))
