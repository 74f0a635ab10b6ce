"""HMST's early exit, measured in one run: the loss at every exit, and for each softmax-margin
threshold the fraction of tokens exiting early, the loss change, and decoding FLOPs per token and
tokens/s against full depth.

An HMST micro model with four blocks (`--set n_layers=4`) and exits after blocks 1, 2 and 3
(`exit_layers=1,2,3`) is trained here through the CLI with the early-exit loss on
(`early_exit_loss=1`: LayerSkip's weights rising with depth), on the sized knowledge base of the
HMST experiments (`synthetic-facts:entities=100,repeat=30,qa=0.5`), in a temporary folder. Then, on `--texts` held-out validation windows of the run's corpus:

- exit_losses: the teacher-forced loss (nats per token) of the exit head after each block and of
  the full model, over every position of the windows;
- sweep: for each margin (0 = the rule off), the windows are decoded token by token with the
  KV cache at batch 1, feeding the true next token (teacher forcing through `decode_step`, which
  applies the rule), after a `--prefix`-token prefill: the loss of the true tokens under the rule,
  its change against the rule off, the fraction of tokens that exited before the last block (and
  at which exit), FLOPs per decoded token (torch's FlopCounterMode over the decoding steps) and
  tokens/s (wall clock, median of `--repeats`), each as a ratio to the rule off.

A skipped block's KV cache gets keys and values computed from the exited hidden state (CALM's
propagation), whose cost is in the FLOPs. The headline is the largest FLOPs saving whose loss
change stays within 1%.

    python benchmarks/early_exit.py [--budget 1e12] [--texts 8] [--prefix 16] [--repeats 3]

Prints one JSON object on stdout; training output goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MARGINS = (0.0, 0.9, 0.7, 0.5, 0.3, 0.1)


CORPUS = "synthetic-facts:entities=100,repeat=30,qa=0.5"  # the knowledge base of experiments/hmst-*.toml


def train(out: Path, budget: str, env: dict) -> None:
    argv = [sys.executable, "-m", "hmst_bench.cli", "train", "--arch", "hmst", "--size", "micro", "--seq-len", "128",
            "--corpus", CORPUS, "--budget", budget, "--set", "n_layers=4", "--set", "exit_layers=1,2,3",
            "--set", "early_exit_loss=1", "--save-every", "0", "--out", str(out)]
    subprocess.run(argv, check=True, env=env, stdout=sys.stderr)


def windows(run, n: int) -> torch.Tensor:
    """The first n validation windows of the run's corpus, as the trainer's validation reads them."""
    from hmst_bench.data.corpora import load_corpus
    from hmst_bench.data.tokens import encode_corpus

    data = encode_corpus(load_corpus(run.info["corpus_spec"]), run.tokenizer)
    w = run.model.max_seq_len
    return torch.from_numpy(data.val_windows(w, n * (w + 1)))[:n, :w].long()  # each fits the window


@torch.no_grad()
def exit_losses(model, ids: torch.Tensor) -> dict:
    import torch.nn.functional as F

    exits: dict = {}
    _, logits, _ = model.forward_all(ids[:, :-1], exits=exits)
    target = ids[:, 1:].flatten()
    out = {f"exit{e}": float(F.cross_entropy(model.exit_logits(h).flatten(0, 1).float(), target)) for e, h in exits.items()}
    out["full"] = float(F.cross_entropy(logits.flatten(0, 1).float(), target))
    return out


@torch.no_grad()
def decode_teacher_forced(model, ids: torch.Tensor, prefix: int) -> tuple[float, list, float]:
    """(nats of the true tokens after the prefix, exit depth of each step, seconds) at batch 1."""
    nats, depths, seconds = 0.0, [], 0.0
    for row in ids:
        logprobs, state = model.decode_step(row[None, :prefix], None)
        start = time.perf_counter()
        for t in range(prefix, len(row)):
            if t > prefix:
                logprobs, state = model.decode_step(row[None, t - 1 : t], state)
            nats -= float(logprobs[0, row[t]])
        seconds += time.perf_counter() - start
        depths += state["exited_at"]
    return nats, depths, seconds


def decode_flops(model, ids: torch.Tensor, prefix: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    total = 0
    with torch.no_grad():
        for row in ids:
            _, state = model.decode_step(row[None, :prefix], None)
            with FlopCounterMode(display=False) as counter:
                for t in range(prefix, len(row) - 1):
                    _, state = model.decode_step(row[None, t : t + 1], state)
            total += counter.get_total_flops()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="1e12")
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--prefix", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HMST_BENCH_HOME": tmp}
        os.environ["HMST_BENCH_HOME"] = tmp
        out = Path(tmp) / "run"
        train(out, args.budget, env)
        from hmst_bench.train.rundir import load_run

        run = load_run(out)
        model = run.model.eval()
        ids = windows(run, args.texts)
        losses = exit_losses(model, ids)
        decoded = ids.shape[0] * (ids.shape[1] - args.prefix)
        sweep = []
        for margin in MARGINS:
            model.config.exit_margin = margin
            times = []
            for _ in range(args.repeats):
                nats, depths, seconds = decode_teacher_forced(model, ids, args.prefix)
                times.append(seconds)
            flops = decode_flops(model, ids, args.prefix) / (ids.shape[0] * (ids.shape[1] - args.prefix - 1))
            sweep.append({"margin": margin, "loss": nats / decoded,
                          "exit_fraction": sum(d < len(model.layers) for d in depths) / len(depths),
                          "exited_at": {str(e): depths.count(e) for e in sorted(set(depths))},
                          "flops_per_token": flops, "tokens_per_s": decoded / statistics.median(times)})
        base = sweep[0]
        for row in sweep:
            row["loss_change"] = row["loss"] / base["loss"] - 1
            row["flops_ratio"] = row["flops_per_token"] / base["flops_per_token"]
            row["speed_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
        within = [r for r in sweep[1:] if r["loss_change"] <= 0.01]
        best = min(within, key=lambda r: r["flops_ratio"]) if within else None
        print(json.dumps({
            "model": {"arch": "hmst", "size": "micro", "n_layers": 4, "exit_layers": [1, 2, 3],
                      "corpus": run.info["corpus_spec"], "budget": args.budget,
                      "achieved_flops": run.info["achieved_flops"], "val_loss": run.info["val_loss"]},
            "texts": int(ids.shape[0]), "window": int(ids.shape[1]), "prefix": args.prefix, "decoded_tokens": decoded,
            "exit_losses": losses,
            "sweep": sweep,
            "figure": None if best is None else {"margin": best["margin"], "flops_ratio": best["flops_ratio"],
                                                 "speed_ratio": best["speed_ratio"], "loss_change": best["loss_change"],
                                                 "exit_fraction": best["exit_fraction"]},
            "reference": "the same model decoding with the rule off (margin 0), measured in this run",
        }, indent=2))


if __name__ == "__main__":
    main()
