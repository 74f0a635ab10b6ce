"""What `hmst-bench experiment run` costs beyond the work it schedules, and how fast `compare` is.

1. Overhead: the same tiny experiment (dense-llama and dense-gpt2 at size micro, one budget, factqa)
   run twice in this process's environment, into separate folders: once as `hmst-bench experiment
   run --jobs 1` (planning, probe steps, job processes, report), once as the plain commands a user
   would type one by one (`train` then `eval` per run, then `compare`). Ratio = experiment / plain
   wall time; the target is an overhead under 5% (ratio < 1.05). Each run's job does one more
   thing than the plain commands (the inference-cost measurement), which counts as overhead here.
2. compare at scale: 100 runs' result files (5 labels x 5 budgets x 4 seeds, 200 factqa items each,
   in the run.json / eval-file format) compared into a report, against the time to merely read and
   parse those files (the floor for anything that reads them).

Prints one JSON object. Run: python benchmarks/experiment_overhead.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EXPERIMENT = """
name = "overhead"
baseline = "dense-llama"
corpus = "synthetic-facts"
seq_len = 128
size = "micro"
budgets = ["1.6e11"]
seeds = [0]
[training]
batch_size = 8
[[archs]]
arch = "dense-llama"
[[archs]]
arch = "dense-gpt2"
[suites.factqa]
limit = 4
"""


def cli(*args: str, env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hmst_bench.cli", *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def overhead(work: Path) -> dict:
    env = {**os.environ, "HMST_BENCH_HOME": str(work / "home"), "TQDM_DISABLE": "1"}
    file = work / "overhead.toml"
    file.write_text(EXPERIMENT)
    # warm the shared caches (corpus tokens, tokenizer) once, so neither side pays for them
    cli("experiment", "run", str(file), "--dry-run", env={**env, "HMST_BENCH_RUNS": str(work / "warm")})
    experiment = cli("experiment", "run", str(file), "--out", str(work / "exp-report"),
                     env={**env, "HMST_BENCH_RUNS": str(work / "exp")})
    plain = 0.0
    tok = work / "warm" / "overhead" / "tokenizer"
    for arch in ("dense-llama", "dense-gpt2"):
        out = work / "plain" / arch
        plain += cli("train", "--arch", arch, "--size", "micro", "--budget", "1.6e11", "--seed", "0", "--seq-len", "128",
                     "--corpus", "synthetic-facts", "--tokenizer", str(tok), "--batch-size", "8", "--out", str(out), env=env)
        plain += cli("eval", "--run", str(out), "--suite", "factqa", "--limit", "4", env=env)
    plain += cli("compare", str(work / "plain" / "*"), "--baseline", "dense-llama", "--out", str(work / "plain-report"), env=env)
    return {"experiment_seconds": round(experiment, 2), "plain_commands_seconds": round(plain, 2),
            "overhead_ratio": round(experiment / plain, 4), "target_ratio_below": 1.05}


def fake_runs(root: Path, labels=5, budgets=5, seeds=4, items=200) -> list[Path]:
    rng = np.random.default_rng(0)
    runs = []
    for li in range(labels):
        for bi in range(budgets):
            flops = 1e10 * 2 ** bi
            for seed in range(seeds):
                run = root / f"arch{li}-{bi}-s{seed}"
                (run / "eval").mkdir(parents=True)
                loss = 2.0 + 1e3 * (flops * (1 + 0.2 * li)) ** -0.3 + rng.normal(0, 0.005)
                info = {"arch": "dense-llama" if li == 0 else f"arch{li}", "size": "micro", "budget": f"{flops:g}",
                        "seed": seed, "status": "complete", "achieved_flops": flops, "tokens": 1000, "val_loss": loss,
                        "val_bpb": loss / 2, "params_total": 1, "params_active": 1, "wall_seconds": 1.0,
                        "tokenizer": {"hash": "t"}, "corpus": {"fingerprint": "c"}, "training": {"seq_len": 128}}
                (run / "run.json").write_text(json.dumps(info))
                samples = [{"doc_id": i, "doc": {"entity": f"e{i // 4}"}, "doc_hash": f"h{i}", "filter": "none",
                            "metrics": ["acc"], "acc": float(rng.random() < 0.3 + 0.05 * li)} for i in range(items)]
                record = {"suite": "factqa", "samples": {"factqa": samples}, "group_subtasks": {},
                          "provenance": {"limit": items, "window": 128, "data": {}}}
                (run / "eval" / "factqa.json").write_text(json.dumps(record))
                runs.append(run)
    return runs


def compare_speed(work: Path) -> dict:
    from rich.console import Console

    from hmst_bench.experiment.command import compare_command

    runs = fake_runs(work / "many")
    t0 = time.perf_counter()
    for run in runs:
        json.loads((run / "run.json").read_text())
        json.loads((run / "eval" / "factqa.json").read_text())
    read = time.perf_counter() - t0
    t0 = time.perf_counter()
    compare_command([str(work / "many" / "*")], "dense-llama", work / "many-report", False, None,
                    Console(file=open(os.devnull, "w")))
    seconds = time.perf_counter() - t0
    return {"compare_100_runs_seconds": round(seconds, 2), "read_100_runs_seconds": round(read, 3),
            "compare_over_read_ratio": round(seconds / read, 1)}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {"benchmark": "experiment_overhead", **overhead(work), **compare_speed(work)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
