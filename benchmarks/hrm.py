"""What hrm-codegen costs per token against dense-llama of the same size, and what its one-step
gradient saves in memory against full backpropagation through time, in one run.

Prints one JSON object:
- params of both: the presets give hrm-codegen dense-llama's blocks split into H and L halves, and
  dense-llama is run with an untied head like hrm-codegen's, so the counts are equal;
- training: both trained by `hmst_bench.train.loop.train` to the same FLOPs budget on
  stdlib-code; FLOPs per trained token as measured (run.json flops_per_token: every segment, the
  no-grad cycles and the ACT target pass), and tokens/s between the first and last logged steps;
  hrm/dense ratios of both;
- inference: forward FLOPs per token (counted) and scoring tokens/s (`token_logprobs` on the same
  batch, best of 3), hrm/dense ratios;
- greedy decoding tokens/s (batch 1, 64-token prompt, 64 new tokens): hrm-codegen with its
  per-call KV cache and with full recomputation (same tokens), and dense-llama with its cache;
- memory: the resident set's rise during one training step (hmst_bench.memory_probe) at 2
  and 8 H cycles with the one-step gradient and with full BPTT, and their ratios.

    python benchmarks/hrm.py [--size tiny] [--budget 2e12] [--memory-batch 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def trained(arch: str, size: str, budget: str, root: Path, **overrides) -> tuple[dict, float]:
    """Train `arch` to `budget`; returns (run.json, training tokens/s between logged steps)."""
    from hmst_bench.train.loop import TrainSettings, train

    out = root / arch
    info = train(TrainSettings(arch=arch, size=size, budget=budget, out=out, eval_every=10**6, save_every=0,
                               overrides=overrides))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r.get("kind") == "train"]
    first, last = steps[0], steps[-1]
    rate = (last["tokens"] - first["tokens"]) / max(1e-9, last["elapsed"] - first["elapsed"])
    return info, rate


def inference(run_dir: Path, batch: int) -> tuple[float, float]:
    """(forward FLOPs per token, scoring tokens/s) of a trained run on one batch of its window."""
    import torch

    from hmst_bench.budget import count_flops
    from hmst_bench.train.rundir import load_run

    run = load_run(run_dir)
    model = run.model.eval()
    t = model.max_seq_len
    ids = torch.randint(0, len(run.tokenizer), (batch, t + 1), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        flops = count_flops(lambda: model.token_logprobs(x, y))[1]
        model.token_logprobs(x, y)  # warm
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            model.token_logprobs(x, y)
            best = min(best, time.perf_counter() - start)
    return flops / (batch * t), batch * t / best


def decoding(run_dir: Path, prompt: int, new: int) -> dict:
    """Greedy tokens/s, batch 1, `prompt` + `new` tokens inside the window: the model's own
    `generate` (hrm-codegen: per-call KV cache) and, for hrm-codegen, full recomputation."""
    import torch

    from hmst_bench.generation import generate_rows
    from hmst_bench.train.rundir import load_run

    run = load_run(run_dir)
    model = run.model.eval()
    ids = torch.randint(0, len(run.tokenizer), (1, prompt), generator=torch.Generator().manual_seed(1))

    def rate(fn) -> tuple[float, list]:
        fn()  # warm
        start = time.perf_counter()
        out = fn()
        return new / (time.perf_counter() - start), out

    with torch.no_grad():
        cached, a = rate(lambda: model.generate(ids, new))
        result = {"tokens_per_s": round(cached, 1)}
        if run.spec.name == "hrm-codegen":
            model.kv_cache = False  # the shared generation then re-reads the prefix every step
            plain, b = rate(lambda: generate_rows(model, ids.tolist(), new))
            del model.kv_cache
            result.update(recompute_tokens_per_s=round(plain, 1), cache_speedup=round(cached / plain, 3), same_tokens=a == b)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--budget", default="2e12")
    parser.add_argument("--score-batch", type=int, default=8)
    parser.add_argument("--memory-batch", type=int, default=4)
    args = parser.parse_args()

    from hmst_bench.plugins import get_registry
    from hmst_bench.memory_probe import training_peak_bytes

    result: dict = {"size": args.size, "budget": args.budget}
    with tempfile.TemporaryDirectory() as tmp:
        # dense-llama unties its head here, as hrm-codegen's (the reference's) is: equal parameters
        runs = {"hrm-codegen": trained("hrm-codegen", args.size, args.budget, Path(tmp)),
                "dense-llama": trained("dense-llama", args.size, args.budget, Path(tmp), tie_embeddings=False)}
        hrm, dense = runs["hrm-codegen"][0], runs["dense-llama"][0]
        result["hrm_config"] = {k: hrm["config"][k] for k in ("h_layers", "l_layers", "h_cycles", "l_cycles", "segments", "act")}
        result["params"] = {"hrm": hrm["params_total"], "dense": dense["params_total"],
                            "ratio": round(hrm["params_total"] / dense["params_total"], 4)}
        tokens_per_step = hrm["training"]["batch_size"] * hrm["training"]["seq_len"]
        result["train"] = {
            "hrm_flops_per_token": hrm["flops_per_token"], "dense_flops_per_token": dense["flops_per_token"],
            "flops_per_token_ratio": round(hrm["flops_per_token"] / dense["flops_per_token"], 4),
            "hrm_flops_per_token_per_segment": hrm["flops_per_step"] / tokens_per_step,
            "per_segment_ratio": round(hrm["flops_per_step"] / tokens_per_step / dense["flops_per_token"], 4),
            "hrm_segments_per_sequence": round(hrm["steps"] * tokens_per_step / max(1, hrm["tokens"]), 3),
            "hrm_tokens_per_s": round(runs["hrm-codegen"][1], 1), "dense_tokens_per_s": round(runs["dense-llama"][1], 1),
            "tokens_per_s_ratio": round(runs["hrm-codegen"][1] / runs["dense-llama"][1], 4),
            "hrm_tokens": hrm["tokens"], "dense_tokens": dense["tokens"],
            "hrm_val_loss": round(hrm["val_loss"], 4), "dense_val_loss": round(dense["val_loss"], 4),
        }
        (hf, hs), (df, ds) = (inference(Path(tmp) / arch, args.score_batch) for arch in ("hrm-codegen", "dense-llama"))
        result["inference"] = {"hrm_flops_per_token": hf, "dense_flops_per_token": df,
                               "flops_per_token_ratio": round(hf / df, 4),
                               "hrm_tokens_per_s": round(hs, 1), "dense_tokens_per_s": round(ds, 1),
                               "tokens_per_s_ratio": round(hs / ds, 4)}
        hrm_dec, dense_dec = (decoding(Path(tmp) / arch, 64, 64) for arch in ("hrm-codegen", "dense-llama"))
        result["greedy_decoding"] = {"prompt": 64, "new_tokens": 64, "hrm": hrm_dec, "dense": dense_dec,
                                     "hrm_vs_dense": round(hrm_dec["tokens_per_s"] / dense_dec["tokens_per_s"], 4)}

    config = dict(get_registry().arch("hrm-codegen").make_config(args.size).__dict__)
    config = {k: config[k] for k in ("vocab_size", "max_seq_len", "d_model", "n_heads", "h_layers", "l_layers", "l_cycles")}
    config["segments"] = 1  # one training step is one segment whatever `segments` is
    mib = {}
    for bptt in (False, True):
        for cycles in (2, 8):
            peak = training_peak_bytes("hrm-codegen", {**config, "h_cycles": cycles, "full_bptt": bptt},
                                       batch=args.memory_batch, seq_len=config["max_seq_len"])
            mib[f"{'bptt' if bptt else 'one_step'}_{cycles}"] = round(peak / 2**20, 1)
    result["peak_memory_mib"] = {
        **mib, "batch": args.memory_batch,
        "one_step_8_vs_2": round(mib["one_step_8"] / mib["one_step_2"], 4),
        "bptt_8_vs_one_step_8": round(mib["bptt_8"] / mib["one_step_8"], 4),
        "bptt_2_vs_one_step_2": round(mib["bptt_2"] / mib["one_step_2"], 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
