"""Evaluation throughput of our lm-eval adapter against lm-eval's own HFLM, in one process.

Prints one JSON object: loglikelihood requests per second of `HmstBenchLM` (the `hmst-bench`
lm-eval model, `hmst_bench.eval.lm`) and of `lm_eval.models.huggingface.HFLM` loading the run's
transformers copy (`RUN/hf`, device cpu, same batch size, max_length = the model's window), on
the same checkpoint and the same requests, their ratio adapter/HFLM (target >= 1.0), and the
largest absolute difference between the two sides' log-likelihoods (expected < 1e-4).

The requests are real lm-eval requests built through our suite configs: MMLU 5-shot over a few
subjects (one-token continuations " A".." D" sharing a context) plus TruthfulQA MC2 (multi-token
continuations), read from the shared benchmark copies (`$HMST_BENCH_SHARED_DATA`, default
`../shared/data` beside the repository) imported into a temporary store. Without those copies a
synthetic set of the same shape is used instead, and "requests_source" says so.

Both sides score fresh copies of the identical Instances; a warm-up slice is run on each side
first and is not timed. The list is cut into `--chunks` slices (a question's choices stay in one
slice) and the sides alternate slice by slice, the order flipped each time, so load from other
work on a shared machine falls on both alike; a side's rate is all its requests over all its
time, `--repeats` passes over the list. "adapter_vs_hflm_cpu_time" (HFLM's process CPU seconds
over ours) is a cross-check that load does not affect as much.

Without `--run`, a dense-llama tiny run is trained first (about a minute, through the CLI) in a
temporary directory, with `HMST_BENCH_HOME` pointed at a temporary directory as well.

    python benchmarks/eval_throughput.py [--run DIR] [--batch-size B] [--repeats 2]

Only the JSON goes to stdout; training output, lm-eval's logging and progress go to stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MMLU_SUBJECTS = ("anatomy", "astronomy", "college_biology", "high_school_geography", "marketing", "world_religions")
TRAIN_ARGS = ("--arch", "dense-llama", "--size", "tiny", "--budget", "3e11", "--save-every", "0",
              "--eval-every", "1000000")


def log(msg: str) -> None:
    print(f"[eval_throughput] {msg}", file=sys.stderr, flush=True)


def train_run(out: Path) -> None:
    """A dense-llama tiny run (5 steps) through the CLI; its output goes to stderr."""
    cmd = [sys.executable, "-m", "hmst_bench.cli", "train", *TRAIN_ARGS, "--out", str(out)]
    log("training: " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, stdout=sys.stderr, stderr=sys.stderr, cwd=REPO, env=os.environ.copy())


def shared_data() -> Path:
    return Path(os.environ.get("HMST_BENCH_SHARED_DATA") or REPO.parent / "shared" / "data")


def suite_requests(data: Path, subjects, mmlu_limit: int, tqa_limit: int) -> tuple[list, str, dict]:
    """lm-eval Instances of our suite configs over the benchmarks present in `data`."""
    import logging

    from hmst_bench.eval import store
    from hmst_bench.eval.runner import task_manager
    from hmst_bench.plugins import get_registry

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    parts = []  # (task name, num_fewshot, limit)
    if (data / "mmlu").is_dir():
        store.import_benchmark("mmlu", data / "mmlu")
        parts += [(f"mmlu_{s}", 5, mmlu_limit) for s in subjects]
    if (data / "truthfulqa").is_dir():
        store.import_benchmark("truthfulqa", data / "truthfulqa")
        parts.append(("truthfulqa_mc2", None, tqa_limit))
    if not parts:
        return [], "", {}
    suites = get_registry().suites()
    manager = task_manager([suites[n] for n in ("mmlu", "truthfulqa_mc2") if n in suites])
    tasks = manager.load([name for name, _, _ in parts])["tasks"]
    instances, mix = [], {}
    for name, shots, limit in parts:
        task = tasks[name]
        if shots is not None:
            task.set_config(key="num_fewshot", value=shots)
        task.set_fewshot_seed(seed=1234)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        assert all(i.request_type == "loglikelihood" for i in task.instances), name
        instances += task.instances
        mix[name] = len(task.instances)
    described = []
    if any(n.startswith("mmlu_") for n, _, _ in parts):
        described.append(f"mmlu 5-shot ({len(subjects)} subjects x {mmlu_limit} questions x 4 choices)")
    if "truthfulqa_mc2" in mix:
        described.append(f"truthfulqa_mc2 0-shot ({tqa_limit} questions, all choices)")
    return instances, "real: " + " + ".join(described) + f", our suite configs over {data}", mix


def synthetic_requests(why: str, n_questions: int = 180, n_tqa: int = 60, seed: int = 0) -> tuple[list, str, dict]:
    """Requests shaped like the real ones: long 5-shot-like contexts with " A".." D", and
    question contexts with 4-12 multi-token answers. Words drawn from a fixed vocabulary."""
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    words = ("the of and to in is was for that with as on by at from which this are be an or it has"
             " cell energy river law market temple body star king trade water light force price"
             " acid bone moon city god mass wave tax faith nerve orbit coast shrine demand heat").split()

    def sentence(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k)).capitalize()

    def question() -> str:
        body = sentence(rng.randint(8, 25)) + "?"
        return body + "".join(f"\n{c}. {sentence(rng.randint(1, 6))}" for c in "ABCD") + "\nAnswer:"

    instances = []
    for q in range(n_questions):
        shots = "".join(question() + f" {rng.choice('ABCD')}\n\n" for _ in range(5))
        context = "The following are multiple choice questions (with answers).\n\n" + shots + question()
        for c in "ABCD":
            instances.append(Instance("loglikelihood", {}, (context, f" {c}"), len(instances)))
    preamble = "".join(f"Q: {sentence(10)}?\nA: {sentence(12)}.\n\n" for _ in range(6))
    n_mmlu = len(instances)
    for q in range(n_tqa):
        context = preamble + f"Q: {sentence(rng.randint(6, 15))}?\nA:"
        for _ in range(rng.randint(4, 12)):
            instances.append(Instance("loglikelihood", {}, (context, " " + sentence(rng.randint(3, 15)) + "."),
                                      len(instances)))
    source = (f"synthetic ({why}): {n_questions} MMLU-shaped 5-shot questions x 4 one-token "
              f"choices + {n_tqa} TruthfulQA-shaped questions with 4-12 multi-token answers")
    return instances, source, {"synthetic_mmlu_shaped": n_mmlu, "synthetic_tqa_shaped": len(instances) - n_mmlu}


def fresh(instances: list) -> list:
    return [copy.copy(i) for i in instances]


def timed(lm, instances: list) -> tuple[float, float, list]:
    """(wall seconds, process CPU seconds, answers) of one loglikelihood call on fresh copies."""
    batch = fresh(instances)
    wall, cpu = time.perf_counter(), time.process_time()
    out = lm.loglikelihood(batch, disable_tqdm=True)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def chunked(instances: list, n_chunks: int) -> list[list]:
    """Consecutive slices of about equal size, cut only where the context changes (a question's
    choices stay together, so both sides can share their context within a slice)."""
    target = max(1, len(instances) // max(1, n_chunks))
    chunks, current = [], []
    for inst in instances:
        if len(current) >= target and inst.args[0] != current[-1].args[0]:
            chunks.append(current)
            current = []
        current.append(inst)
    return chunks + [current] if current else chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="an existing dense run directory (with hf/); default: train one")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="time the whole list this many times per side")
    parser.add_argument("--chunks", type=int, default=8, help="slices the two sides alternate on")
    parser.add_argument("--mmlu-limit", type=int, default=30, help="questions per MMLU subject")
    parser.add_argument("--tqa-limit", type=int, default=60, help="TruthfulQA MC2 questions")
    parser.add_argument("--synthetic", action="store_true", help="use the synthetic requests even if data exists")
    args = parser.parse_args()

    # everything but the final JSON goes to stderr, also what libraries print to stdout
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="hmst-eval-throughput-") as tmp:
        os.environ["HMST_BENCH_HOME"] = str(Path(tmp) / "home")
        run_dir = args.run
        if run_dir is None:
            run_dir = Path(tmp) / "run"
            train_run(run_dir)
        if not (run_dir / "hf").is_dir():
            sys.exit(f"{run_dir} has no hf/ copy (only the dense baselines write one)")

        import torch
        from lm_eval.models.huggingface import HFLM

        from hmst_bench.eval.lm import HmstBenchLM

        data = shared_data()
        instances, source, mix = ([], "", {}) if args.synthetic else \
            suite_requests(data, MMLU_SUBJECTS, args.mmlu_limit, args.tqa_limit)
        if not instances:
            instances, source, mix = synthetic_requests("--synthetic" if args.synthetic else f"no mmlu or truthfulqa in {data}")
        log(f"{len(instances)} requests: {source}")

        ours = HmstBenchLM(run=str(run_dir), device="cpu", batch_size=args.batch_size, progress=False)
        window = ours.max_length
        hflm = HFLM(pretrained=str(run_dir / "hf"), device="cpu", batch_size=args.batch_size, max_length=window)
        params = sum(p.numel() for p in ours.model.parameters())
        ctx_tokens = [len(ours.tok_encode(i.args[0])) for i in instances]
        full = sum(c + len(ours.tok_encode(i.args[1])) > window for c, i in zip(ctx_tokens, instances))

        # warm-up (not timed): a slice across the list, so both request shapes are exercised
        warm = instances[:: max(1, len(instances) // 64)]
        timed(ours, warm)
        timed(hflm, warm)

        # The two sides alternate slice by slice (order flipped each slice), so load from other
        # work on the machine falls on both alike; each side's time is summed over all slices.
        chunks = chunked(instances, args.chunks)
        sides = {"adapter": ours, "hflm": hflm}
        wall = {k: [0.0] * args.repeats for k in sides}
        cpu = {k: 0.0 for k in sides}
        answers = {k: [] for k in sides}
        for r in range(args.repeats):
            for c, chunk in enumerate(chunks):
                order = list(sides) if (c + r) % 2 == 0 else list(sides)[::-1]
                for name in order:
                    seconds, cpu_s, out = timed(sides[name], chunk)
                    wall[name][r] += seconds
                    cpu[name] += cpu_s
                    if r == 0:
                        answers[name] += out
            log(f"repeat {r + 1}: " + ", ".join(f"{k} {wall[k][r]:.2f} s ({len(instances) / wall[k][r]:.1f} requests/s)"
                                                for k in sides))

        diffs = [abs(a[0] - b[0]) for a, b in zip(answers["adapter"], answers["hflm"])]
        greedy_mismatch = sum(a[1] != b[1] for a, b in zip(answers["adapter"], answers["hflm"]))
        n = len(instances)
        ours_rate, hf_rate = n * args.repeats / sum(wall["adapter"]), n * args.repeats / sum(wall["hflm"])
        result = {
            "benchmark": "eval_throughput",
            "adapter_requests_per_s": round(ours_rate, 1),
            "hflm_requests_per_s": round(hf_rate, 1),
            "adapter_vs_hflm": round(ours_rate / hf_rate, 4),
            "target": 1.0,
            "requests": n,
            "request_mix": mix,
            "requests_source": source,
            "distinct_contexts": len({i.args[0] for i in instances}),
            "mean_context_tokens": round(sum(ctx_tokens) / n, 1),
            "requests_cut_to_window": full,
            "max_abs_ll_diff": max(diffs),
            "is_greedy_mismatches": greedy_mismatch,
            "batch_size": args.batch_size,
            "model": f"{ours.run.info.get('arch')} {ours.run.info.get('size')}",
            "run": "trained here: " + " ".join(TRAIN_ARGS) if args.run is None else str(run_dir),
            "params": params,
            "window": window,
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "slices": len(chunks),
            "seconds_per_repeat": {k: [round(x, 2) for x in v] for k, v in wall.items()},
            "adapter_vs_hflm_cpu_time": round(cpu["hflm"] / cpu["adapter"], 4),
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
    json.dump(result, json_out)
    json_out.write("\n")
    json_out.flush()


if __name__ == "__main__":
    main()
