"""Training throughput of the hmst-bench trainer against a bare PyTorch loop, in one process.

Prints one JSON object: tokens/s and achieved GFLOP/s of dense-llama (tiny by default) under
`hmst_bench.train.loop.train` and under a minimal hand-written loop doing the same work (same
model, same batches, AdamW, clipping), plus this machine's fp32 matmul peak measured in the same
run, and the ratios trainer/bare and trainer/peak. Targets: >= 0.95 and >= 0.45.

The trainer's rate is read from its own metrics.jsonl between its logged steps, so it includes
everything the trainer does per step (meter, logging, progress callback) but not the one-off
start-up (tokenizer, FLOP probe) or the final validation and checkpoint.

    python benchmarks/train_throughput.py [--size tiny] [--steps 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def matmul_peak_gflops(n: int = 2048, reps: int = 8) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def bare_loop(size: str, steps: int, warmup: int, batch_size: int) -> tuple[float, float, int]:
    """Same model, data and optimiser as the trainer, with nothing else: returns (tok/s, loss, seq_len)."""
    import dataclasses

    import torch

    from hmst_bench.data.corpora import load_corpus
    from hmst_bench.data.tokenizer import train_tokenizer
    from hmst_bench.data.tokens import encode_corpus
    from hmst_bench.plugins import get_registry
    from hmst_bench.train.context import Recipe, make_optimizer

    spec = get_registry().arch("dense-llama")
    config = spec.make_config(size)
    corpus = load_corpus("stdlib-code")
    tok = train_tokenizer(corpus.split["train"], config.vocab_size, cache_key=corpus.fingerprint)
    config = dataclasses.replace(config, vocab_size=len(tok))
    data = encode_corpus(corpus, tok)
    torch.manual_seed(0)
    model = spec.build(config, tok)
    model.train()
    recipe = Recipe(batch_size=batch_size, seq_len=config.max_seq_len)
    opt = make_optimizer(model, recipe)
    seq = config.max_seq_len
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        batch = data.batch(0, step, 0, 0, batch_size, seq)
        loss, _ = model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    return steps * batch_size * seq / elapsed, float(loss), seq


def trainer_loop(size: str, steps: int, warmup: int, batch_size: int, seq_len: int) -> tuple[float, float]:
    """Run the real trainer; returns (steady-state tok/s from metrics.jsonl, FLOPs per step)."""
    from hmst_bench.train.loop import TrainSettings, train

    tokens = (warmup + steps) * batch_size * seq_len
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        info = train(TrainSettings(arch="dense-llama", size=size, budget=f"{tokens}tok", out=out, batch_size=batch_size,
                                   save_every=0, eval_every=10**9, log_every=1))
        rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    a, b = rows[warmup - 1], rows[-1]
    return (b["tokens"] - a["tokens"]) / (b["elapsed"] - a["elapsed"]), info["flops_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternate bare/trainer this many times; best of each")
    args = parser.parse_args()

    import torch

    peak = matmul_peak_gflops()
    bare, trainer, fps, seq = [], [], None, None
    for _ in range(args.repeats):
        tok_s, _, seq = bare_loop(args.size, args.steps, args.warmup, args.batch_size)
        bare.append(tok_s)
        tok_s, fps = trainer_loop(args.size, args.steps, args.warmup, args.batch_size, seq)
        trainer.append(tok_s)
    tokens_per_step = args.batch_size * seq
    trainer_gflops = max(trainer) / tokens_per_step * fps / 1e9
    bare_gflops = max(bare) / tokens_per_step * fps / 1e9
    result = {
        "benchmark": "train_throughput",
        "arch": "dense-llama",
        "size": args.size,
        "batch_size": args.batch_size,
        "seq_len": seq,
        "steps_timed": args.steps,
        "torch_threads": torch.get_num_threads(),
        "flops_per_step": fps,
        "trainer_tokens_per_s": round(max(trainer), 1),
        "bare_tokens_per_s": round(max(bare), 1),
        "trainer_vs_bare": round(max(trainer) / max(bare), 4),
        "trainer_gflops": round(trainer_gflops, 2),
        "bare_gflops": round(bare_gflops, 2),
        "matmul_peak_gflops": round(peak, 2),
        "trainer_fraction_of_peak": round(trainer_gflops / peak, 4),
        "targets": {"trainer_vs_bare": 0.95, "trainer_fraction_of_peak": 0.45},
        "all_runs": {"trainer_tokens_per_s": [round(x, 1) for x in trainer], "bare_tokens_per_s": [round(x, 1) for x in bare]},
    }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
