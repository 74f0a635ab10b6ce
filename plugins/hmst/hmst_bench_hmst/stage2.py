"""HMST's stage 2: train the memory on documents longer than the attention window.

`hmst-bench train --stage 2 --out R` continues the complete stage-1 run in R: the trainer builds
the model with `memory=true` (the plugin's `stage_config`), loads stage 1's weights (the memory's
modules keep their initialisation, with the reader's gate at 0, so the model starts exactly where
stage 1 ended) and hands over to `run`. Stage 2 trains every parameter on `longdocs.LongDocs`:
documents of `memory_segments` windows (stdlib-code files and synthetic-facts recall tasks, mixed
by `recall_fraction`), each read in window-sized segments with the memory written between them
(`HMSTModel.loss`).

After every optimiser step the entries the step's documents consolidated go into the run's
long-term store (`memory.LongTermMemory`, gathered from all ranks in rank order so every rank
holds the same store), which later documents read too; it is saved with each checkpoint and with
the run's files.

Budget: the first real step is measured by the shared meter (the reads and writes of each
document's memory included; see `memory.memory_extra_flops`) and charged to every step; the
long-term store grows, so each step adds the FLOPs its searches of that store measured
(`after_update`; metrics.jsonl logs `longterm_search_flops` and the running
`longterm_flops_total`, so achieved_flops = steps x flops_per_step + longterm_flops_total).
Validation reads held-out long documents the same way, and `--resume` continues
exactly (the data is a pure function of seed and step, the store comes back with the checkpoint).
"""

from __future__ import annotations

import numpy as np
import torch

from hmst_bench.train.context import TrainContext
from hmst_bench.train.loop import TrainError, start_budget


def run(ctx: TrainContext) -> None:
    from hmst_bench_hmst.longdocs import LongDocs

    config, model = ctx.config, ctx.model
    if not config.memory:
        raise TrainError("stage 2 trains HMST's memory, but this run sets memory=false; drop --set memory=false")
    doc_tokens = config.memory_segments * config.max_seq_len
    if config.memory_segments > config.memory_max_segments:
        raise TrainError(f"memory_segments ({config.memory_segments}) exceeds memory_max_segments "
                         f"({config.memory_max_segments}); lower memory_segments")
    try:
        data = LongDocs(ctx.tokenizer, doc_tokens, config.recall_fraction)
        data.check_seq_len(doc_tokens)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    ctx.data = data
    ctx.row_tokens = doc_tokens
    model.collect_consolidated = model.longterm is not None
    if ctx.resuming:
        ctx.restore()  # the long-term store comes back through load_artifacts
    else:
        start_budget(ctx, ctx.probe_flops(ctx.batches(0)))
    model.take_pending()  # the probe's reads are not a training step

    def after_update() -> tuple[float, dict]:
        pending, flops = model.take_pending()
        added = _to_longterm(ctx, [p for p in pending if p is not None])
        flops = ctx.meter.sum_over_ranks(flops)
        total = ctx.extra_state["longterm_flops"] = ctx.extra_state.get("longterm_flops", 0.0) + flops  # checkpointed
        size = len(model.longterm) if model.longterm is not None else 0
        return flops, {"longterm_entries": size, "longterm_added": added, "longterm_search_flops": flops,
                       "longterm_flops_total": total}

    while not ctx.should_stop:
        ctx.train_step(after_update)


def _to_longterm(ctx: TrainContext, pending: list) -> int:
    """Add this rank's and every other rank's consolidated entries to the long-term store."""
    model = ctx.model
    if model.longterm is None or not pending:
        return 0
    ids, vecs, usage = (np.concatenate(parts, axis=0) for parts in zip(*pending))  # this rank's rows, in micro order
    if ctx.accelerator.num_processes > 1:
        device = ctx.accelerator.device
        gathered = [ctx.accelerator.gather(torch.from_numpy(a).to(device)).cpu().numpy() for a in (ids, vecs, usage)]
        ids, vecs, usage = gathered
    rows_per_step = ctx.recipe.batch_size * ctx.recipe.grad_accum * ctx.accelerator.num_processes
    return model.longterm.add_step(ctx.step, rows_per_step, ids, vecs, usage)

