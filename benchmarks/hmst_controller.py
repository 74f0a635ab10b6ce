"""HMST's meta-controller, measured in one run: inference FLOPs per generated token and decoding
tokens/s with the controller on against `controller=off` (every gate full) on the same prompts,
the controller's own overhead, and what its decisions did to the answers.

A micro HMST (4 blocks, exits after blocks 1, 2 and 3, trained with the early-exit loss) is
trained here through the CLI on the HMST experiments' knowledge base
(`synthetic-facts:entities=100,repeat=30,qa=0.5`, window 128, learning rate 3e-3): stage 1, the
critic stage, then stage 3 (PPO), in a temporary folder. The prompts are the critic's validation questions (`facts.critic_questions`,
split "validation": seen entities the corpus answers and invented ones, never trained on by
stage 3) in factqa's prompt, answered greedily at batch 1 with factqa's stop strings, once with
the controller on (its greedy decisions, verification included) and once off:

- flops_per_token: per prompt, the FLOPs of generating its answer minus those of generating its
  first token (the prefill), summed over prompts, over the one-token decoding steps run (the
  stop token's included; torch's FlopCounterMode, the controller's decisions and the critic's
  check included; FAISS is not involved without memory);
- flops_per_answer: all FLOPs of answering a prompt (the prompt's prefill included), per prompt;
- tokens_per_s: tokens decoded (the first of each answer included) over the wall-clock seconds
  of generating every answer, median of `--repeats`;
- controller_overhead: one decision's FLOPs (the cost table's) over one full decoding step's;
- accuracy / abstention / hallucination by factqa's judge, and the controller's gate rates.

    python benchmarks/hmst_controller.py [--budget 5e12] [--stage3-budget 3e10] [--prompts 64] [--repeats 3]

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

CORPUS = "synthetic-facts:entities=100,repeat=30,qa=0.5"  # the knowledge base of experiments/hmst-*.toml


def train(out: Path, args, env: dict) -> None:
    cli = [sys.executable, "-m", "hmst_bench.cli", "train", "--out", str(out), "--save-every", "0"]
    for extra in (["--arch", "hmst", "--size", "micro", "--seq-len", "128", "--lr", "3e-3", "--corpus", CORPUS, "--budget", args.budget,
                   "--set", "n_layers=4", "--set", "exit_layers=1,2,3", "--set", "early_exit_loss=1"],
                  ["--stage", "critic", "--budget", args.critic_budget],
                  ["--stage", "3", "--budget", args.stage3_budget]):
        subprocess.run(cli + extra, check=True, env=env, stdout=sys.stderr)


def prompts(run, n: int) -> list[tuple[list[int], dict]]:
    from hmst_bench.data import facts
    from hmst_bench.eval import hallucination

    size = facts.FactsSpec.parse(run.info["corpus_spec"])
    primer = hallucination.documents(facts.SEED, size)[1]
    questions = [q for q in facts.critic_questions(facts.SEED, size) if q["split"] == "validation"][:n]
    room = run.model.max_seq_len - hallucination.GREEDY_GENERATION["max_gen_toks"]
    return [(run.tokenizer.encode(hallucination.prompt(q["question"], primer), add_special_tokens=False)[-room:], q)
            for q in questions]


def decode(model, rows, stop, max_new: int, repeats: int) -> dict:
    from hmst_bench.budget import count_flops
    from hmst_bench.eval import hallucination

    steps = [0]  # one-token decoding steps run (the same count in both modes, stop tokens included)
    plain = model._decode_step

    def counting(new_tokens, state, pad=None):
        steps[0] += int(state is not None and new_tokens.shape[1] == 1)
        return plain(new_tokens, state, pad)

    model._decode_step = counting
    try:
        flops, decoded, whole = 0.0, 0, 0.0
        with torch.no_grad():
            for ids, _ in rows:
                x = torch.tensor([ids])
                _, f1 = count_flops(lambda: model.generate(x, 1, stop=stop))  # the prefill and first token
                before = steps[0]
                _, fn = count_flops(lambda: model.generate(x, max_new, stop=stop))
                flops += fn - f1
                whole += fn
                decoded += steps[0] - before
            model.take_decoding_stats()
            times, outcomes, stats, produced = [], [], None, 0
            for r in range(repeats):
                before, start = steps[0], time.perf_counter()
                answers = [model.generate(torch.tensor([ids]), max_new, stop=stop)[0] for ids, _ in rows]
                times.append(time.perf_counter() - start)
                if r == 0:
                    produced = steps[0] - before + len(rows)  # tokens decoded, the first of each included
                    stats = model.take_decoding_stats()
                    outcomes = [hallucination.judge(hallucination.first_line(model.tokenizer.decode(a)), q["answer"], q["seen"])
                                for a, (_, q) in zip(answers, rows)]
    finally:
        model._decode_step = plain
    n = len(rows)
    return {"flops_per_token": flops / decoded if decoded else None, "decoding_steps": decoded,
            "flops_per_answer": whole / n,
            "tokens_per_s": produced / statistics.median(times),
            "accuracy": outcomes.count("correct") / n, "abstention": outcomes.count("abstained") / n,
            "hallucination": outcomes.count("hallucinated") / n, "controller": stats or None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="5e12")
    parser.add_argument("--critic-budget", default="1e11")
    parser.add_argument("--stage3-budget", default="3e10")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HMST_BENCH_HOME": tmp}
        os.environ["HMST_BENCH_HOME"] = tmp
        out = Path(tmp) / "run"
        train(out, args, env)
        from hmst_bench.eval import hallucination
        from hmst_bench.eval.lm import HmstBenchLM
        from hmst_bench.train.rundir import load_run

        run = load_run(out)
        model = run.model.eval()
        lm = HmstBenchLM(run=run, device="cpu", batch_size=1, progress=False)
        stop = [lm.eot_token_id, lm.stop_when(hallucination.GREEDY_GENERATION["until"])]
        rows = prompts(run, args.prompts)
        max_new = hallucination.GREEDY_GENERATION["max_gen_toks"]
        result = {}
        for mode in ("off", "on"):
            model.config.controller = mode
            result[mode] = decode(model, rows, stop, max_new, args.repeats)
        costs = model.costs()
        full = costs.full_step
        on, off = result["on"], result["off"]
        ppo = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "ppo"' in line]
        print(json.dumps({
            "model": {"arch": "hmst", "size": "micro", "n_layers": 4, "exit_layers": [1, 2, 3], "corpus": CORPUS,
                      "budgets": {"1": args.budget, "critic": args.critic_budget, "3": args.stage3_budget},
                      "achieved_flops": run.info["achieved_flops"], "ppo_updates": len(ppo),
                      "reward_first_last": [ppo[0]["reward"], ppo[-1]["reward"]] if ppo else None},
            "prompts": len(rows), "on": on, "off": off,
            "controller_overhead": costs.controller / full,
            "figure": {"flops_ratio": on["flops_per_token"] / off["flops_per_token"]
                       if on["flops_per_token"] and off["flops_per_token"] else None,
                       "speed_ratio": on["tokens_per_s"] / off["tokens_per_s"],
                       "answer_flops_ratio": on["flops_per_answer"] / off["flops_per_answer"],
                       "accuracy_change": on["accuracy"] - off["accuracy"]},
            "reference": "the same weights with controller=off (every gate full), same prompts, measured in this run",
        }, indent=2))


if __name__ == "__main__":
    main()
