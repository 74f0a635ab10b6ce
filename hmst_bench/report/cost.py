"""Inference cost of a trained run: FLOPs per generated token, measured, not estimated.

The run's own `generate` (KV cache where the architecture has one, its fallback where not) is run
under the FLOP counter twice on the same prompt: once for 1 new token and once for 1 + N. The
difference divided by N is the marginal cost of a decoded token, prefill excluded, so a model
without a KV cache (O(n) per token) and one with it (O(1) per token of context) are told apart.
Written to RUN/eval/inference-cost.json with the digest of the weights it was measured on.
"""

from __future__ import annotations

from pathlib import Path

PROMPT_TOKENS = 32
NEW_TOKENS = 32


def measure(run_dir: str | Path) -> dict:
    import torch

    from hmst_bench.budget import count_flops
    from hmst_bench.eval.runner import model_fingerprint
    from hmst_bench.experiment.plan import COST_FILE
    from hmst_bench.train.rundir import load_run
    from hmst_bench.util import atomic_write_json

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    prompt_len = min(PROMPT_TOKENS, run.model.max_seq_len // 2)
    new = max(1, min(NEW_TOKENS, run.model.max_seq_len - prompt_len - 1))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(len(run.tokenizer), (1, prompt_len), generator=gen)
    special = torch.tensor(sorted(run.tokenizer.all_special_ids))
    ids[torch.isin(ids, special)] = int(ids.max())  # plain text tokens only: no EOS that would end generation

    def flops_for(n: int) -> tuple[float, int]:
        with torch.no_grad():
            out, flops = count_flops(lambda: run.model.generate(ids, max_new_tokens=n, temperature=0.0))
        return float(flops), len(out[0])

    one, _ = flops_for(1)
    many, produced = flops_for(1 + new)
    decoded = max(produced - 1, 0)
    record = {"model_sha256": model_fingerprint(run_dir)["model_sha256"], "prompt_tokens": prompt_len,
              "new_tokens": decoded, "flops_first_token": one,
              "flops_per_generated_token": (many - one) / decoded if decoded else None}
    (run_dir / "eval").mkdir(exist_ok=True)
    atomic_write_json(run_dir / "eval" / COST_FILE, record)
    return record
