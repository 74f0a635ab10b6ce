"""Generation throughput of our lm-eval adapter against lm-eval's HFLM, and HMST's long-context
scoring cost before and after prefix sharing, in one process.

Prints one JSON object with two parts, each figure beside its reference measured in this run:

- generate: generated tokens per second of `generate_until` through `HmstBenchLM` (the
  `hmst-bench` lm-eval model, `hmst_bench.eval.lm`) and through `lm_eval.models.huggingface.HFLM`
  on the run's transformers copy (`RUN/hf`), device cpu, both with the same `max_length` (the
  model's window), at batch size 1 and 16, on the same 32 GSM8K 5-shot prompts (the first 32
  test questions, each after 5 train examples drawn with a seeded generator, in lm-eval's gsm8k
  format "Question: ...\\nAnswer: ..." joined by blank lines), until = ["Question:", "\\n\\n"],
  max_gen_toks 128, greedy. Tokens are counted the same way on both sides: the run's tokenizer
  on each returned text (after lm-eval cut it at the stop string). Each side is warmed up first
  with a short untimed call. The outputs of ours and HFLM are compared at each batch size
  ("identical_outputs": how many of the 32 are equal), and ours at 16 against ours at 1.
  Each timing is the median of `--repeats` passes (the sides alternating order pass by pass).
  Targets: ours/HFLM at batch 16 >= 1.0, ours at 16 / ours at 1 >= 4.0.
  The model is a dense-llama micro run trained here with `--seq-len 512`, so the 128 answer
  tokens fit after a 384-token prompt (the adapter and HFLM both keep the prompt's last
  max_length - max_gen_toks tokens; a 5-shot prompt is longer and is cut from the left).
- longctx: seconds per document of the `longctx` suite's loglikelihood requests (10 choices
  " NNNNN" after each document's prompt, as the suite's multiple_choice task makes them; built
  here from `hmst_bench.eval.longctx.documents` and handed to `lm.loglikelihood` directly,
  not through the runner), `--docs` documents of each of the six tasks (kv and passkey at 1x, 4x,
  16x the window), for (a) an HMST micro stage-2 run (memory on, window 64) through the adapter
  as is, which groups continuations by context and calls the model's `score_continuations`
  (one read of the shared context: "after"); (b) the same with that method replaced on the
  instance by the base class default `hmst_bench.model.LanguageModel.score_continuations`
  (every continuation read with the whole context: "before"); (c) a dense-llama micro run at
  the same window (64), same total training budget, whose context is cut to its window.
  The (a) and (b) log-likelihoods are compared (max_abs_ll_diff). Targets: (a)/(c) <= 2.0
  (HMST within 2x a dense model's time per document); the before/after speedup is reported.

Runs are trained first (through the CLI, about half a minute in all) in a temporary
directory, with `HMST_BENCH_HOME` pointed there too. The GSM8K rows are read from the shared
benchmark copy, `$HMST_BENCH_SHARED_DATA/gsm8k/{train,test}.jsonl` (default `../shared/data`
beside the repository); without it the script exits with a one-line message.

    python benchmarks/generation_throughput.py [--prompts 32] [--max-gen-toks 128] [--docs 16] [--repeats 3]

Only the JSON goes to stdout; training output and lm-eval's logging go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GEN_RUN = ("--arch", "dense-llama", "--size", "micro", "--corpus", "synthetic-facts", "--seq-len", "512",
           "--budget", "2e11", "--save-every", "0", "--eval-every", "1000000")
HMST_S1 = ("--arch", "hmst", "--size", "micro", "--corpus", "synthetic-facts", "--seq-len", "64", "--budget", "1e10",
           "--save-every", "0", "--eval-every", "1000000")
HMST_S2 = ("--stage", "2", "--budget", "1.5e10", "--save-every", "0", "--eval-every", "1000000")
DENSE_64 = ("--arch", "dense-llama", "--size", "micro", "--corpus", "synthetic-facts", "--seq-len", "64",
            "--budget", "2.5e10", "--save-every", "0", "--eval-every", "1000000")  # HMST's stage 1 + stage 2 budget
UNTIL = ["Question:", "\n\n"]
FEWSHOT_SEED = 1234


def log(msg: str) -> None:
    print(f"[generation_throughput] {msg}", file=sys.stderr, flush=True)


def train(out: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "hmst_bench.cli", "train", *args, "--out", str(out)]
    log("training: " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, stdout=sys.stderr, stderr=sys.stderr, cwd=REPO, env=os.environ.copy())


def shared_data() -> Path:
    return Path(os.environ.get("HMST_BENCH_SHARED_DATA") or REPO.parent / "shared" / "data")


def gsm8k_prompts(folder: Path, n: int) -> list[str]:
    """The first n test questions, each after 5 train examples (seeded draw), lm-eval style."""
    def rows(name):
        with open(folder / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    train_rows, test_rows = rows("train.jsonl"), rows("test.jsonl")
    rng = random.Random(FEWSHOT_SEED)
    prompts = []
    for row in test_rows[:n]:
        shots = rng.sample(train_rows, 5)
        text = "\n\n".join(f"Question: {s['question']}\nAnswer: {s['answer']}" for s in shots)
        prompts.append(f"{text}\n\nQuestion: {row['question']}\nAnswer:")
    return prompts


def instances(kind: str, args: list) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def timed_generate(lm, args: list) -> tuple[float, list[str]]:
    reqs = instances("generate_until", args)
    t = time.perf_counter()
    out = lm.generate_until(reqs, disable_tqdm=True)
    return time.perf_counter() - t, out


def generation(run_dir: Path, prompts: list[str], max_gen_toks: int, batch_sizes: tuple[int, ...], repeats: int) -> dict:
    import torch
    from lm_eval.models.huggingface import HFLM

    from hmst_bench.eval.lm import HmstBenchLM

    gen_kwargs = {"until": list(UNTIL), "max_gen_toks": max_gen_toks, "do_sample": False}
    args = [(p, dict(gen_kwargs)) for p in prompts]
    warm = [(p, {"until": list(UNTIL), "max_gen_toks": 8, "do_sample": False}) for p in prompts[:2]]
    first = HmstBenchLM(run=str(run_dir), device="cpu", batch_size=1, progress=False)
    window = first.max_length
    tokenizer = first.tokenizer
    prompt_tokens = [len(first.tok_encode(p)) for p in prompts]
    room = first._prompt_room(max_gen_toks)
    sides, outputs, seconds = {}, {}, {}
    for b in batch_sizes:
        sides[("ours", b)] = first if b == 1 else HmstBenchLM(run=str(run_dir), device="cpu", batch_size=b, progress=False)
        sides[("hflm", b)] = HFLM(pretrained=str(run_dir / "hf"), device="cpu", batch_size=b, max_length=window)
    for key, lm in sides.items():
        timed_generate(lm, warm)  # warm-up, not timed
    times: dict = {}
    for r in range(repeats):  # each repeat: every side once, ours and HFLM in alternating order
        for b in batch_sizes:
            for name in (("ours", "hflm") if r % 2 == 0 else ("hflm", "ours")):
                secs, out = timed_generate(sides[(name, b)], args)
                times.setdefault((name, b), []).append(secs)
                if r == 0:
                    outputs[(name, b)] = out
                elif out != outputs[(name, b)]:
                    log(f"{name} batch {b}: repeat {r + 1} generated other text than repeat 1")
                log(f"{name} batch {b} repeat {r + 1}: {secs:.2f} s")
    seconds = {k: statistics.median(v) for k, v in times.items()}

    def tokens(texts):  # the same count rule for both sides
        return sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)

    result: dict = {"per_batch": {}}
    rate = {}
    for b in batch_sizes:
        row = {}
        for name in ("ours", "hflm"):
            n = tokens(outputs[(name, b)])
            rate[(name, b)] = n / seconds[(name, b)]
            row[name] = {"seconds": round(seconds[(name, b)], 3), "generated_tokens": n,
                         "tokens_per_s": round(rate[(name, b)], 1)}
        same = sum(x == y for x, y in zip(outputs[("ours", b)], outputs[("hflm", b)]))
        row["identical_outputs"] = f"{same}/{len(prompts)}"
        row["ours_vs_hflm"] = round(rate[("ours", b)] / rate[("hflm", b)], 4)
        result["per_batch"][str(b)] = row
    lo, hi = min(batch_sizes), max(batch_sizes)
    vs_hflm = rate[("ours", hi)] / rate[("hflm", hi)]
    vs_b1 = rate[("ours", hi)] / rate[("ours", lo)]
    result.update({
        f"ours_vs_hflm_at_{hi}": round(vs_hflm, 4),
        f"ours_vs_hflm_at_{hi}_target": 1.0,
        f"ours_vs_hflm_at_{hi}_met": vs_hflm >= 1.0,
        f"ours_{hi}_vs_ours_{lo}": round(vs_b1, 4),
        f"ours_{hi}_vs_ours_{lo}_target": 4.0,
        f"ours_{hi}_vs_ours_{lo}_met": vs_b1 >= 4.0,
        f"hflm_{hi}_vs_hflm_{lo}": round(rate[("hflm", hi)] / rate[("hflm", lo)], 4),
        "all_outputs_identical_to_hflm": all(outputs[("ours", b)] == outputs[("hflm", b)] for b in batch_sizes),
        f"ours_{hi}_identical_to_ours_{lo}": f"{sum(x == y for x, y in zip(outputs[('ours', hi)], outputs[('ours', lo)]))}/{len(prompts)}",
        "outputs_hitting_max_gen_toks": sum(len(tokenizer.encode(t, add_special_tokens=False)) >= max_gen_toks
                                            for t in outputs[("ours", lo)]),
        "empty_outputs": sum(not t for t in outputs[("ours", lo)]),
        "prompts": len(prompts),
        "prompt_tokens": {"min": min(prompt_tokens), "mean": round(sum(prompt_tokens) / len(prompt_tokens), 1),
                          "max": max(prompt_tokens)},
        "prompt_tokens_kept": room,
        "prompts_cut": sum(n > room for n in prompt_tokens),
        "max_gen_toks": max_gen_toks,
        "until": UNTIL,
        "window": window,
        "model": "trained here: " + " ".join(GEN_RUN),
        "params": sum(p.numel() for p in first.model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "seconds_per_repeat": {f"{name}_{b}": [round(x, 3) for x in v] for (name, b), v in times.items()},
    })
    return result


def longctx_requests(tokenizer, window: int, docs: int) -> list[tuple[str, list]]:
    """Per task: the loglikelihood arguments the suite's multiple_choice task makes."""
    from hmst_bench.eval import longctx as L

    out = []
    for family in L.FAMILIES:
        for length in L.LENGTHS:
            rows = L.documents(family, length, window, tokenizer, n_docs=docs)
            out.append((f"longctx_{family}_{length}x", [(d["prompt"], " " + c) for d in rows for c in d["choices"]]))
    return out


def timed_loglikelihood(lm, tasks) -> tuple[dict, list]:
    seconds, answers = {}, []
    for task, args in tasks:
        reqs = instances("loglikelihood", args)
        t = time.perf_counter()
        answers += lm.loglikelihood(reqs, disable_tqdm=True)
        seconds[task] = time.perf_counter() - t
    return seconds, answers


def longctx(hmst_dir: Path, dense_dir: Path, docs: int, repeats: int) -> dict:
    from hmst_bench.eval.lm import HmstBenchLM
    from hmst_bench.model import LanguageModel

    hmst = HmstBenchLM(run=str(hmst_dir), device="cpu", progress=False)
    dense = HmstBenchLM(run=str(dense_dir), device="cpu", progress=False)
    window = hmst.max_length
    assert dense.max_length == window, (dense.max_length, window)
    tasks = longctx_requests(hmst.tokenizer, window, docs)
    n_docs = docs * len(tasks)
    warm = [(task, args[:10]) for task, args in tasks[:1]]  # one 1x document

    model = hmst.model
    before = types.MethodType(LanguageModel.score_continuations, model)

    def run(name, lm, patched=False):
        if patched:
            model.score_continuations = before  # the instance attribute shadows HMST's override
        try:
            timed_loglikelihood(lm, warm)
            runs = [timed_loglikelihood(lm, tasks) for _ in range(repeats)]
            secs = {task: statistics.median(r[0][task] for r in runs) for task, _ in tasks}
            answers = runs[0][1]
        finally:
            if patched:
                del model.score_continuations
        log(f"longctx {name}: {sum(secs.values()):.2f} s for {n_docs} documents")
        return secs, answers

    after_s, after_a = run("hmst shared prefix", hmst)
    before_s, before_a = run("hmst base-class score_continuations", hmst, patched=True)
    dense_s, dense_a = run("dense", dense)
    per_doc = {k: sum(v.values()) / n_docs for k, v in (("after", after_s), ("before", before_s), ("dense", dense_s))}
    vs_dense = per_doc["after"] / per_doc["dense"]
    return {
        "hmst_seconds_per_doc_after": round(per_doc["after"], 4),
        "hmst_seconds_per_doc_before": round(per_doc["before"], 4),
        "dense_seconds_per_doc": round(per_doc["dense"], 4),
        "prefix_sharing_speedup": round(per_doc["before"] / per_doc["after"], 4),
        "hmst_after_vs_dense": round(vs_dense, 4),
        "hmst_after_vs_dense_target": 2.0,
        "hmst_after_vs_dense_met": vs_dense <= 2.0,
        "hmst_before_vs_dense": round(per_doc["before"] / per_doc["dense"], 4),
        "seconds_per_doc_by_task": {task: {"after": round(after_s[task] / docs, 4), "before": round(before_s[task] / docs, 4),
                                           "dense": round(dense_s[task] / docs, 4)} for task, _ in tasks},
        "max_abs_ll_diff_before_after": max(abs(a[0] - b[0]) for a, b in zip(after_a, before_a)),
        "is_greedy_mismatches_before_after": sum(a[1] != b[1] for a, b in zip(after_a, before_a)),
        "documents": n_docs,
        "repeats": repeats,
        "requests": sum(len(a) for _, a in tasks),
        "window": window,
        "hmst_context": hmst.max_context,
        "dense_context": dense.max_context,
        "hmst_model": "trained here: " + " ".join(HMST_S1) + " then " + " ".join(HMST_S2),
        "dense_model": "trained here: " + " ".join(DENSE_64),
        "requests_made": "the suite's multiple_choice loglikelihood requests (prompt, ' ' + choice), "
                         "passed to lm.loglikelihood directly",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-gen-toks", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; each figure is the median")
    parser.add_argument("--docs", type=int, default=16, help="documents of each of the six longctx tasks (the suite has 100; more lets HMST batch more contexts)")
    args = parser.parse_args()

    data = shared_data() / "gsm8k"
    if not (data / "train.jsonl").is_file() or not (data / "test.jsonl").is_file():
        sys.exit(f"no GSM8K copy at {data} (train.jsonl, test.jsonl); set HMST_BENCH_SHARED_DATA")
    started = time.perf_counter()
    json_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints from libraries go to stderr
    with tempfile.TemporaryDirectory(prefix="generation-throughput-") as tmp:
        tmp = Path(tmp)
        os.environ["HMST_BENCH_HOME"] = str(tmp / "home")
        import logging

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        train(tmp / "gen", *GEN_RUN)
        train(tmp / "hmst", *HMST_S1)
        train(tmp / "hmst", *HMST_S2)
        train(tmp / "dense64", *DENSE_64)
        trained = time.perf_counter() - started
        prompts = gsm8k_prompts(data, args.prompts)
        result = {
            "benchmark": "generation_throughput",
            "generate": generation(tmp / "gen", prompts, args.max_gen_toks, (1, args.batch_size), args.repeats),
            "longctx": longctx(tmp / "hmst", tmp / "dense64", args.docs, args.repeats),
            "device": "cpu",
            "training_seconds": round(trained, 1),
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
    json.dump(result, json_out)
    json_out.write("\n")
    json_out.flush()


if __name__ == "__main__":
    main()
