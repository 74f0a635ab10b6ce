"""Deep supervision with adaptive computation time (ACT): the stage runner of recurrent models
(hrm-codegen, hrm-lora), written once here for every architecture that implements its protocol.

The model protocol (`model` is the LanguageModel; `model.config` has `segments`,
`halt_exploration_prob` and `q_loss_weight`):
    carry_init(input_ids) -> (z_h, z_l)           the fixed state every sequence starts from
    run_segment(input_ids, z_h, z_l) -> (z_h, z_l) one segment of the recurrence (one-step gradient)
    head(z_h) -> raw logits;  lm_loss(raw, labels) -> the mean next-token loss
    q_head: a module, or None (ACT off);  q_logits(z_h, input_ids) -> [B, 2] (see pooled_q)
    loss(batch) calls segment_loss(self, batch) when the batch carries "z_h"

Every slot of the batch holds one training sequence and its recurrent state (z_H, z_L). An
optimiser step runs ONE segment (h_cycles x l_cycles calls, one-step gradient) on every slot,
from the slot's carried state, and steps the optimiser on that segment's loss; the new state is
detached and carried to the next step. A slot keeps its sequence until it halts, then takes the
row at its place in the next step's batch (`ctx.batches(step)`, a pure function of seed and step)
and the fixed initial state again. A slot halts after `segments` segments, or earlier with ACT:

- the Q-head gives (halt, continue) logits from z_H pooled over the row; it halts when
  halt > continue, unless exploration (probability `halt_exploration_prob`) drew a minimum of
  2..segments segments for it that it has not reached (the reference's rule);
- q_halt learns the row's next-token accuracy after this segment (the reward for halting now);
  q_continue learns sigmoid of the next segment's best Q (its halt Q on the last segment), from
  one more segment run without gradients inside the same forward pass (the ACT target pass).

Without ACT every sequence runs exactly `segments` segments. Halting only happens in training;
inference runs all `segments` segments (as the reference evaluates), which keeps every position's
distribution causal: a halting decision pooled over a row would let later tokens change it.

Budget: the FLOPs of a step (all slots' segment forward and backward, the no-grad cycles and the
ACT target pass) are measured by the shared meter on the run's first real step; every step has
the same shapes and does the same work, so each is charged that figure. The trained tokens of a
step are those of the slots that halted in it (a sequence counts once, when it is finished), so
run.json's flops_per_token is the compute spent per training token over all its segments.

The carried slots are saved with every checkpoint (gathered from all ranks), so `--resume` is exact.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from hmst_bench.train.context import TrainContext
from hmst_bench.train.loop import start_budget


@dataclass
class Slots:
    """One micro-batch's sequences and what the runner knows about each row."""

    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]
    z_h: Optional[torch.Tensor]  # [B, T, d] carried state (None before the first step)
    z_l: Optional[torch.Tensor]
    steps: torch.Tensor  # [B] segments run so far on this row's sequence
    halted: torch.Tensor  # [B] bool: the row takes a new sequence at the next step

    FIELDS = ("input_ids", "labels", "z_h", "z_l", "steps", "halted")


def pooled_q(q_head, z_h: torch.Tensor, input_ids: torch.Tensor, pad_id: Optional[int]) -> torch.Tensor:
    """[B, 2] (halt, continue) logits from z_H averaged over each row's real tokens. Under a causal
    mask position 0 has seen one token, so the HRM reference's read of position 0 would decide from
    the first token alone; the mean summarises the whole sequence."""
    real = (input_ids != pad_id).unsqueeze(-1).to(z_h.dtype) if pad_id is not None else torch.ones_like(z_h[..., :1])
    pooled = (z_h * real).sum(1) / real.sum(1).clamp_min(1)
    return q_head(pooled).float()


def segment_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """One segment from the batch's carried state ("z_h", "z_l"); aux["state"] is the new detached
    state. With "steps" (segments already run per row) and a Q-head, the Q losses are added:
    q_halt learns the segment's next-token accuracy on the row (the reference's exact match of a
    whole sequence is almost never reached by a language model), q_continue the sigmoid of the
    next segment's best Q (its halt Q on the last segment), from one more segment without gradients."""
    import torch.nn.functional as F

    from hmst_bench.arch import IGNORE_INDEX

    ids, labels = batch["input_ids"], batch["labels"]
    z_h, z_l = model.run_segment(ids, batch["z_h"], batch["z_l"])
    raw = model.head(z_h)
    lm = model.lm_loss(raw, labels)
    aux = {"state": (z_h.detach(), z_l.detach()), "lm_loss": lm.detach()}
    if "steps" not in batch or model.q_head is None:
        return lm, aux
    q = model.q_logits(z_h, ids)
    with torch.no_grad():
        live = labels != IGNORE_INDEX
        accuracy = ((raw.argmax(-1) == labels) & live).sum(-1) / live.sum(-1).clamp_min(1)
        next_q = model.q_logits(model.run_segment(ids, z_h.detach(), z_l.detach())[0], ids)
        last = batch["steps"] + 1 >= model.config.segments
        target = torch.sigmoid(torch.where(last, next_q[:, 0], next_q.max(-1).values))
    q_halt_loss = F.binary_cross_entropy_with_logits(q[:, 0], accuracy.float())
    q_continue_loss = F.binary_cross_entropy_with_logits(q[:, 1], target)
    aux.update(q=q.detach(), q_halt_loss=q_halt_loss.detach(), q_continue_loss=q_continue_loss.detach())
    return lm + model.config.q_loss_weight * (q_halt_loss + q_continue_loss), aux


def _refill(model, slots: Optional[Slots], fresh: dict) -> Slots:
    """Halted rows (every row at the start) take the fresh batch's row and the initial state."""
    ids, labels = fresh["input_ids"], fresh["labels"]
    init_h, init_l = model.carry_init(ids)
    if slots is None:
        b = ids.shape[0]
        return Slots(ids, labels, init_h.clone(), init_l.clone(), torch.zeros(b, dtype=torch.long, device=ids.device),
                     torch.zeros(b, dtype=torch.bool, device=ids.device))
    new = slots.halted
    row, state = new.view(-1, 1), new.view(-1, 1, 1)
    return Slots(torch.where(row, ids, slots.input_ids), torch.where(row, labels, slots.labels),
                 torch.where(state, init_h, slots.z_h), torch.where(state, init_l, slots.z_l),
                 torch.where(new, torch.zeros_like(slots.steps), slots.steps), torch.zeros_like(new))


def _halting(ctx: TrainContext, slots: Slots, q: Optional[torch.Tensor], micro: int) -> torch.Tensor:
    """Which rows halt after this step's segment (the reference's rule, see the module doc)."""
    cfg = ctx.config
    steps = slots.steps
    halted = steps >= cfg.segments
    if q is None:
        return halted
    halted = halted | (q[:, 0] > q[:, 1])
    # exploration is drawn for the step's whole global batch from (seed, step) and sliced like
    # the data (TokenData.batch), so a row's draw is the same on any number of processes and a
    # resumed run replays it
    r = ctx.recipe
    world = ctx.accelerator.num_processes
    total = r.batch_size * r.grad_accum * world
    g = torch.Generator().manual_seed(r.seed * 1_000_003 + ctx.step)
    explore_all = torch.rand(total, generator=g) < cfg.halt_exploration_prob
    minimum_all = torch.randint(2, cfg.segments + 1, (total,), generator=g)
    first = (ctx.accelerator.process_index * r.grad_accum + micro) * r.batch_size
    rows = slice(first, first + steps.shape[0])
    minimum = torch.where(explore_all[rows], minimum_all[rows], 0).to(steps.device)
    return halted & (steps >= minimum)


def _step(ctx: TrainContext, carried: list[Optional[Slots]]) -> tuple[list[Slots], float, dict, int]:
    """One optimiser step's forward and backward over every micro-batch; returns the updated
    slots, the mean total loss, aux metrics and the number of rows that halted."""
    model = ctx.model
    act = model.q_head is not None
    fresh = ctx.batches(ctx.step)
    n = len(fresh)
    out, losses, lm_losses, q_losses = [], [], [], []
    halted_rows, halted_segments = 0, 0
    for i, batch in enumerate(fresh):
        slots = _refill(model, carried[i], batch)
        inputs = {"input_ids": slots.input_ids, "labels": slots.labels, "z_h": slots.z_h, "z_l": slots.z_l}
        if act:
            inputs["steps"] = slots.steps
        sync = contextlib.nullcontext() if i == n - 1 else ctx.accelerator.no_sync(ctx.wrapped)
        with sync:
            loss, aux = ctx.wrapped(inputs)
            ctx.accelerator.backward(loss / n)
        losses.append(loss.detach())
        lm_losses.append(aux["lm_loss"])
        if act:
            q_losses.append(aux["q_halt_loss"] + aux["q_continue_loss"])
        slots.z_h, slots.z_l = aux["state"]
        slots.steps = slots.steps + 1
        slots.halted = _halting(ctx, slots, aux.get("q"), i)
        halted_rows += int(slots.halted.sum())
        halted_segments += int(slots.steps[slots.halted].sum())
        out.append(slots)
    stats = torch.stack([torch.stack(losses).mean(), torch.stack(lm_losses).mean(),
                         torch.stack(q_losses).mean() if q_losses else torch.zeros((), device=losses[0].device),
                         torch.tensor(float(halted_rows), device=losses[0].device),
                         torch.tensor(float(halted_segments), device=losses[0].device)])
    if ctx.accelerator.num_processes > 1:
        stats = ctx.accelerator.reduce(stats, reduction="sum")
        stats[:3] /= ctx.accelerator.num_processes
    total, lm, q_loss, rows, segs = (float(v) for v in stats)
    aux = {"lm_loss": lm}
    if act:
        aux["q_loss"] = q_loss
    if rows:
        aux["segments"] = segs / rows  # mean segments of the sequences finished in this step
    rows_total = n * ctx.recipe.batch_size * ctx.accelerator.num_processes
    aux["halted"] = rows / rows_total
    return out, total, aux, int(rows)


def _pack(ctx: TrainContext, carried: list[Slots]) -> list[dict]:
    """The slots as CPU tensors for the checkpoint, every rank's rows gathered (rank order)."""
    packed = []
    for slots in carried:
        entry = {}
        for name in Slots.FIELDS:
            t = getattr(slots, name)
            if ctx.accelerator.num_processes > 1:
                t = ctx.accelerator.gather(t.contiguous())
            entry[name] = t.detach().cpu()
        packed.append(entry)
    return packed


def _unpack(ctx: TrainContext, packed: list[dict]) -> list[Slots]:
    b, rank, device = ctx.recipe.batch_size, ctx.accelerator.process_index, ctx.accelerator.device
    return [Slots(**{name: entry[name][rank * b:(rank + 1) * b].to(device) for name in Slots.FIELDS})
            for entry in packed]


def run(ctx: TrainContext) -> None:
    """Train until the budget is spent (or a signal arrives), one segment per optimiser step."""
    model = ctx.model
    if ctx.resuming:
        extra = ctx.restore()
        carried = _unpack(ctx, extra["slots"])
    else:
        holder = {}

        def first():
            holder["step"] = _step(ctx, [None] * ctx.recipe.grad_accum)

        _, fps = ctx.meter.measure(first, model, ctx.batches(0))
        # planned before the first optimiser step, so it already uses the schedule's rate
        start_budget(ctx, fps, segments=ctx.config.segments)
        carried = _finish(ctx, *holder["step"])
    while not ctx.should_stop:
        carried = _finish(ctx, *_step(ctx, carried))


def _finish(ctx: TrainContext, carried: list[Slots], loss: float, aux: dict, halted_rows: int) -> list[Slots]:
    """Optimiser step, then charge, log and (when due) checkpoint with the slots."""
    ctx.optimizer_step(loss)
    ctx.extra_state = {"slots": _pack(ctx, carried)}
    ctx.after_step(aux["lm_loss"], aux, flops=ctx.meter.flops_per_step, tokens=halted_rows * ctx.recipe.seq_len)
    return carried
