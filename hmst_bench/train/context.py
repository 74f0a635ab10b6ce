"""`TrainContext`: the shared training machinery, handed to the shared loop and to stage runners.

Whatever loop runs (the default one in `loop.py`, HMST's stages, HRM's deep supervision), it
uses the same pieces from here, so every architecture is charged, logged and checkpointed alike:

    ctx.batches(step)            the micro-batches of an optimiser step on this rank (a pure
                                 function of seed and step, so resumes see identical data)
    ctx.probe_flops(batches)     FLOPs of forward+backward on real batches, state untouched
    ctx.plan(total_steps)        create the LR schedule (warmup + cosine) for a fresh run
    ctx.restore()                resume: weights, optimiser, schedule, RNG, meter, step, extras
    ctx.train_step(after_update) one optimiser step of the shared recipe (accumulation, clipping);
                                 after_update may update state and charge extra FLOPs
    ctx.optimizer_step()         clip, check finiteness, step optimiser and schedule
    ctx.train_only(module)       freeze all but one part of the model (a stage that trains it alone)
    ctx.after_step(loss, aux)    count the step, log, validate and checkpoint when due
    ctx.should_stop              budget reached or SIGINT/SIGTERM received
    ctx.validate()               validation loss and bits-per-byte via the model's token_logprobs
    ctx.checkpoint(extra)        atomic checkpoint; `extra` comes back from restore()
    ctx.meter                    the BudgetMeter (measure / add)
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from hmst_bench.arch import IGNORE_INDEX
from hmst_bench.budget import Budget, BudgetMeter
from hmst_bench.train import checkpoint as ckpt
from hmst_bench.train.rundir import MetricsLog


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


class LossModule(torch.nn.Module):
    """Routes `forward(batch)` to `model.loss(batch)`, so DistributedDataParallel (which hooks
    `forward`) and accelerate's autocast see the training objective of any architecture."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


@dataclass
class Recipe:
    """Training hyper-parameters; all of them must match for `--resume`."""

    seed: int = 0
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: Optional[int] = None  # None: 5% of the planned steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    mixed_precision: str = "no"

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def lr_lambda(total_steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def decays(param: torch.nn.Parameter) -> bool:
    """Whether the shared optimiser decays `param`: matrices do, vectors (norms, biases) do not,
    nor does any parameter a model marks `param._no_weight_decay = True` (Mamba's convention:
    decay would pull an SSM's A_log [d, N] towards 0, every state channel towards the rate A = -1)."""
    return param.ndim >= 2 and not getattr(param, "_no_weight_decay", False)


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW with two groups: the parameters that `decays`, at `recipe.weight_decay`, and the rest at 0."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if decays(p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas)


@dataclass
class TrainContext:
    spec: Any
    config: Any
    model: torch.nn.Module  # the unwrapped model
    wrapped: torch.nn.Module  # LossModule, prepared by accelerate (DDP when distributed)
    optimizer: torch.optim.Optimizer
    accelerator: Any
    tokenizer: Any
    data: Any  # TokenData
    recipe: Recipe
    budget: Budget
    meter: BudgetMeter
    run_dir: Path
    byte_lengths: Any
    stage: Optional[str] = None
    resuming: bool = False
    save_every: int = 250
    eval_every: int = 0  # 0: chosen by plan()
    log_every: int = 10
    val_tokens: int = 32768
    row_tokens: Optional[int] = None  # tokens per training row when a stage's data is not seq_len long
    on_checkpoint: Callable[["TrainContext"], None] = lambda ctx: None
    on_progress: Callable[["TrainContext"], None] = lambda ctx: None
    # state
    step: int = 0
    total_steps: int = 0
    scheduler: Any = None
    last_loss: float = float("nan")
    last_aux: dict = field(default_factory=dict)
    last_val: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    stop_signal: Optional[str] = None
    extra_state: dict = field(default_factory=dict)
    _t0: float = field(default_factory=time.time)
    _window: tuple[float, int] = (0.0, 0)

    # ------------------------------------------------------------------ data

    @property
    def tokens_per_step(self) -> int:
        r = self.recipe
        return r.batch_size * (self.row_tokens or r.seq_len) * r.grad_accum * self.accelerator.num_processes

    def batches(self, step: int) -> list[dict]:
        r = self.recipe
        rank = self.accelerator.process_index
        device = self.accelerator.device
        out = []
        for micro in range(r.grad_accum):
            b = self.data.batch(r.seed, step, micro, rank, r.batch_size, r.seq_len, r.grad_accum, self.accelerator.num_processes)
            out.append({k: v.to(device) for k, v in b.items()})
        return out

    def train_only(self, module: torch.nn.Module) -> None:
        """Train `module`'s parameters alone (a stage that trains one part of the model, HMST's
        critic): every other parameter is frozen and the optimiser is rebuilt over these. Call
        it before `restore()`, so a resume loads the optimiser state into the same optimiser."""
        keep = {id(p) for p in module.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in keep)
        self.optimizer = self.accelerator.prepare_optimizer(make_optimizer(self.model, self.recipe))

    # ------------------------------------------------------------------ planning and resume

    def probe_flops(self, batches: list[dict]) -> float:
        """Measured FLOPs (all ranks) of forward+backward over `batches`. Weights, buffers,
        gradients and RNG are left exactly as they were; state a model keeps outside tensors
        (a Python-side memory store) must not change in a forward pass, or the architecture
        should use a stage runner that charges each real step instead of probing."""
        rng = ckpt.rng_state()
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}

        def work():
            for b in batches:
                loss, _ = self.wrapped(b)
                self.accelerator.backward(loss / len(batches))

        with self.accelerator.no_sync(self.wrapped):
            _, total = self.meter.measure(work, self.model, batches)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                b.copy_(buffers[name])
        ckpt.set_rng_state(rng)
        return total

    def plan(self, total_steps: int) -> None:
        self.total_steps = int(total_steps)
        if self.eval_every <= 0:  # auto: about five validations per run (validation is not free)
            self.eval_every = max(1, self.total_steps // 5)
        warmup = self.recipe.warmup if self.recipe.warmup is not None else max(1, round(0.05 * total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, warmup, self.recipe.min_lr_ratio)
        )

    def restore(self) -> dict:
        """Continue from RUN/state: returns the runner's extras saved with `checkpoint(extra)`."""
        saved = ckpt.read_trainer_state(self.run_dir)
        if saved is None:
            raise FileNotFoundError(f"{self.run_dir} has no checkpoint yet; start it again without --resume")
        self.plan(saved["total_steps"])
        state = ckpt.load_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler,
                                     getattr(self.accelerator, "scaler", None))
        self.step = state["step"]
        self.meter.load_state_dict(state["meter"])
        self.wall_seconds = state["wall_seconds"]
        self.last_loss = state.get("last_loss", float("nan"))
        self.last_val = state.get("last_val", {})
        self.extra_state = state.get("extra", {})
        self._t0 = time.time()
        if self.accelerator.is_main_process:  # only the main process writes the run directory
            MetricsLog(self.run_dir).truncate_after(self.step, stage=self.stage)
        return self.extra_state

    # ------------------------------------------------------------------ stepping

    @property
    def should_stop(self) -> bool:
        return self.meter.done or self.stop_signal is not None

    def train_step(self, after_update: Optional[Callable[[], tuple[float, dict]]] = None) -> float:
        """One optimiser step of the shared recipe; returns the mean loss of its micro-batches.
        `after_update` (a stage runner's) runs after the optimiser step, before the step is
        charged and checkpointed; it returns the FLOPs this step spent beyond
        `meter.flops_per_step` (work whose amount changes from step to step), summed over all
        ranks, and values to log with the step."""
        batches = self.batches(self.step)
        n = len(batches)
        losses, aux_sum = [], {}
        for i, b in enumerate(batches):
            sync = contextlib.nullcontext() if i == n - 1 else self.accelerator.no_sync(self.wrapped)
            with sync:
                loss, aux = self.wrapped(b)
                self.accelerator.backward(loss / n)
            losses.append(loss.detach())
            for k, v in aux.items():
                aux_sum[k] = aux_sum.get(k, 0.0) + float(v) / n
        mean = torch.stack(losses).mean()
        if self.accelerator.num_processes > 1:
            mean = self.accelerator.reduce(mean, reduction="mean")
        self.optimizer_step(float(mean))
        extra, logged = after_update() if after_update is not None else (0.0, {})
        self.after_step(float(mean), {**aux_sum, **logged}, flops=self.meter.flops_per_step + extra, tokens=self.tokens_per_step)
        return float(mean)

    def optimizer_step(self, loss: float) -> float:
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss} at step {self.step + 1}")
        grad_norm = self.accelerator.clip_grad_norm_(self.wrapped.parameters(), self.recipe.grad_clip)
        grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm) and getattr(self.accelerator, "scaler", None) is None:
            # with an fp16 loss scaler an inf gradient is a step the scaler skips, not divergence
            raise TrainingDiverged(f"gradient norm became {grad_norm} at step {self.step + 1}")
        self.last_aux["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_aux["grad_norm"] = grad_norm
        return grad_norm

    def after_step(self, loss: float, aux: dict, flops: float, tokens: int) -> None:
        """Charge the step to the budget, then log / validate / checkpoint when due."""
        self._agree_on_stop()
        self.meter.add(flops, tokens)
        self.step += 1
        self.last_loss = loss
        self.last_aux = {**{k: v for k, v in self.last_aux.items() if k in ("grad_norm", "lr")}, **{k: float(v) for k, v in aux.items()}}
        t_prev, tok_prev = self._window
        now = time.time()
        last = self.should_stop
        if self.step % self.log_every == 0 or last or self.step == 1:
            elapsed = self.wall_seconds + (now - self._t0)
            tok_s = (self.meter.tokens - tok_prev) / max(1e-9, elapsed - t_prev) if t_prev or tok_prev else self.meter.tokens / max(1e-9, elapsed)
            self._window = (elapsed, self.meter.tokens)
            self.log(kind="train", loss=loss, tok_per_s=tok_s, **self.last_aux)
        if self.eval_every and self.step % self.eval_every == 0 and not last:
            self.validate()
        if self.save_every and self.step % self.save_every == 0 and not last:
            self.checkpoint()
        self.on_progress(self)

    def _agree_on_stop(self) -> None:
        """A signal may reach one rank only; every rank must stop at the same step."""
        if self.accelerator.num_processes == 1:
            return
        flag = torch.tensor([1.0 if self.stop_signal else 0.0], device=self.accelerator.device)
        flag = self.accelerator.reduce(flag, reduction="sum")
        if float(flag) > 0 and self.stop_signal is None:
            self.stop_signal = "SIGTERM"  # stopped because another rank was signalled

    # ------------------------------------------------------------------ logging, validation, checkpoints

    @property
    def elapsed(self) -> float:
        return self.wall_seconds + (time.time() - self._t0)

    def log(self, **record: Any) -> None:
        if self.accelerator.is_main_process:
            base = {"step": self.step, "tokens": self.meter.tokens, "flops": self.meter.flops, "elapsed": round(self.elapsed, 3)}
            if self.stage is not None:
                base["stage"] = self.stage
            MetricsLog(self.run_dir).append({**base, **record})

    @torch.no_grad()
    def validate(self) -> dict:
        """Validation loss (nats/token) and bits per byte of the validation text: total nats over
        total target tokens (bytes), never a mean of batch means. With several ranks each scores
        every world_size-th batch and the three totals are summed over the ranks."""
        model = self.model
        was_training = model.training
        model.eval()
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        totals = torch.zeros(3, dtype=torch.float64)  # nats, target tokens, target bytes
        lengths = torch.as_tensor(self.byte_lengths)
        with self.accelerator.autocast():
            batches = self.data.val_batches(self.recipe.seq_len, self.recipe.batch_size, self.val_tokens)
            for i, b in enumerate(batches):
                if i % world != rank:
                    continue
                ids, labels = b["input_ids"].to(self.accelerator.device), b["labels"]
                mask = labels != IGNORE_INDEX
                lp = model.token_logprobs(ids, labels.to(ids.device)).double().cpu()
                totals += torch.stack([-lp[mask].sum(), mask.sum().double(), lengths[labels[mask]].sum().double()])
        if world > 1:
            totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum").cpu()
        model.train(was_training)
        nats, count, nbytes = totals.tolist()
        self.last_val = {"val_loss": nats / max(1, count), "val_bpb": nats / math.log(2) / max(1, nbytes)}
        self.log(kind="val", **self.last_val)
        return self.last_val

    def checkpoint(self, extra: Optional[dict] = None) -> None:
        if extra is not None:
            self.extra_state = extra
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            state = {
                "stage": self.stage,
                "step": self.step,
                "total_steps": self.total_steps,
                "meter": self.meter.state_dict(),
                "wall_seconds": self.elapsed,
                "last_loss": self.last_loss,
                "last_val": self.last_val,
                "extra": self.extra_state,
            }
            ckpt.save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, state,
                                 getattr(self.accelerator, "scaler", None))
            self.on_checkpoint(self)
        self.accelerator.wait_for_everyone()
