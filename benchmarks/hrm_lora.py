"""The Gemma-HRM audit's claims measured on hrm-lora, in one run: "O(1) memory" (peak training
memory with the one-step gradient against full BPTT at 2 and 8 cycles) and "20-30% faster than
standard fine-tuning" (training tokens/s and FLOPs per token against plain LoRA of the same base),
with the trainable parameters and the validation loss each reaches at equal FLOPs.

A dense-llama tiny is trained here on stdlib-code (`--base-budget`) and serves as the pretrained
base (`--init-from`, its RUN/hf). hrm-lora (2 x 2 cycles, one-step gradient) and lora (the same
adapters, one pass) are then trained from it to the same FLOPs (`--budget`), in a temporary
folder. Measured:

- train: FLOPs per trained token (run.json, measured by the shared meter), tokens/s between the
  first and last logged steps, validation loss, trainable (adapter) parameters;
- peak_memory_mib: the resident set's rise during one training step (`hmst_bench.memory_probe`,
  batch `--memory-batch` x the base's window) for hrm-lora at h_cycles 2 and 8 with the one-step
  gradient and with full BPTT, and for lora.

    python benchmarks/hrm_lora.py [--base-budget 3e13] [--budget 3e12] [--memory-batch 4]

Prints one JSON object on stdout; training output goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def trained(out: Path, **settings) -> tuple[dict, float]:
    """Train; returns (run.json, training tokens/s between the first and last logged steps)."""
    from hmst_bench.train.loop import TrainSettings, train

    info = train(TrainSettings(out=out, eval_every=10**6, save_every=0, **settings))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r.get("kind") == "train"]
    first, last = steps[0], steps[-1]
    return info, (last["tokens"] - first["tokens"]) / max(1e-9, last["elapsed"] - first["elapsed"])


def adapter_params(run_dir: Path) -> int:
    from hmst_bench.train.rundir import load_run

    return sum(p.numel() for n, p in load_run(run_dir).model.named_parameters() if "lora_" in n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-budget", default="3e13")
    parser.add_argument("--budget", default="3e12")
    parser.add_argument("--memory-batch", type=int, default=4)
    args = parser.parse_args()

    from hmst_bench.memory_probe import training_peak_bytes

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base_info, _ = trained(root / "base", arch="dense-llama", size="tiny", budget=args.base_budget)
        runs = {arch: trained(root / arch, arch=arch, init_from=root / "base", budget=args.budget)
                for arch in ("hrm-lora", "lora")}
        hrm, lora = runs["hrm-lora"][0], runs["lora"][0]
        train = {arch: {"flops_per_token": info["flops_per_token"], "tokens_per_s": round(rate, 1),
                        "val_loss": round(info["val_loss"], 4), "tokens": info["tokens"],
                        "trainable_params": adapter_params(root / arch)} for arch, (info, rate) in runs.items()}
        config = {k: hrm["config"][k] for k in ("vocab_size", "max_seq_len", "base", "low_rank", "high_rank")}
        window = config["max_seq_len"]
        mib = {}
        for bptt in (False, True):
            for cycles in (2, 8):
                peak = training_peak_bytes("hrm-lora", {**config, "h_cycles": cycles, "full_bptt": bptt},
                                           batch=args.memory_batch, seq_len=window)
                mib[f"{'bptt' if bptt else 'one_step'}_{cycles}"] = round(peak / 2**20, 1)
        mib["lora"] = round(training_peak_bytes("lora", config, batch=args.memory_batch, seq_len=window) / 2**20, 1)
        print(json.dumps({
            "base": {"arch": "dense-llama", "size": "tiny", "budget": args.base_budget, "val_loss": round(base_info["val_loss"], 4),
                     "params": base_info["params_total"], "window": window},
            "hrm_config": {k: hrm["config"][k] for k in ("split", "low_rank", "high_rank", "h_cycles", "l_cycles", "full_bptt")},
            "budget": args.budget, "train": train,
            "peak_memory_mib": {**mib, "batch": args.memory_batch,
                                "one_step_8_vs_2": round(mib["one_step_8"] / mib["one_step_2"], 4),
                                "bptt_8_vs_one_step_8": round(mib["bptt_8"] / mib["one_step_8"], 4)},
            "figure": {"tokens_per_s_hrm_vs_lora": round(train["hrm-lora"]["tokens_per_s"] / train["lora"]["tokens_per_s"], 4),
                       "flops_per_token_hrm_vs_lora": round(hrm["flops_per_token"] / lora["flops_per_token"], 4),
                       "val_loss_hrm_minus_lora": round(hrm["val_loss"] - lora["val_loss"], 4),
                       "memory_one_step_8_vs_2": round(mib["one_step_8"] / mib["one_step_2"], 4)},
            "reference": "plain LoRA (lora) of the same base, same adapters and budget; hrm-lora's own 2-cycle one-step step",
        }, indent=2))


if __name__ == "__main__":
    main()
