"""HMST's stage 2: train the memory on documents longer than the attention window.

`hmst-bench train --stage 2 --out R` continues the complete stage-1 run in R: the trainer builds
the model with `memory=true` (the plugin's `stage_config`), loads stage 1's weights (the memory's
modules keep their initialisation, with the reader's gate at 0, so the model starts exactly where
stage 1 ended) and hands over to `run`. Stage 2 trains every parameter on `longdocs.LongDocs`:
documents of `memory_segments` windows (stdlib-code files and synthetic-facts recall tasks, mixed
by `recall_fraction`), each read in window-sized segments with the memory written between them
(`HMSTModel.loss`). Otherwise it is the shared loop: the FLOPs of its first real step (including
the memory's reads and writes; see `memory.memory_extra_flops`) are measured and charged to
stage 2's own budget, validation reads held-out long documents the same way, and `--resume`
continues it exactly (its data is a pure function of seed and step).
"""

from __future__ import annotations

from hmst_bench.train.context import TrainContext
from hmst_bench.train.loop import TrainError, shared_loop


def run(ctx: TrainContext) -> None:
    from hmst_bench_hmst.longdocs import LongDocs

    config = ctx.config
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
    shared_loop(ctx)
