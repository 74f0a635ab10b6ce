"""Training budgets: parsing `--budget`, measuring FLOPs, and the meter that stops training.

A budget is compute (`1e15`, `2.5e15`, `3e13flops`) or tokens (`20Mtok`, `500ktok`). FLOPs are
never estimated from a formula such as 6*N*D: they are counted by `torch.utils.flop_counter`
on the real model and a real batch (forward and backward, including passes run under
no_grad), plus any analytic terms the model declares through `extra_flops(batch)` for ops the
counter cannot see. The counter as shipped does not know the CPU kernel of
`scaled_dot_product_attention`, so it is registered here with the same formula torch uses for
the GPU kernels; otherwise attention would cost zero on CPU.

torch is imported lazily (parse_budget is used by the CLI before any model exists).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

_TOKEN_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}
_FLOPS_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(flops?)?\s*$", re.I)
_TOKENS_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgbt]?)\s*tok(?:ens)?\s*$", re.I)


class BudgetError(ValueError):
    pass


@dataclass(frozen=True)
class Budget:
    """kind is "flops" or "tokens"; amount is the number of FLOPs or tokens."""

    kind: str
    amount: float
    text: str

    def steps_for(self, flops_per_step: float, tokens_per_step: int) -> int:
        """Optimizer steps until achieved >= budget (the first step at or past it is the last)."""
        per_step = flops_per_step if self.kind == "flops" else tokens_per_step
        n = max(1, math.ceil(self.amount / per_step))
        while n > 1 and (n - 1) * per_step >= self.amount:  # undo a division that rounded up
            n -= 1
        return n

    def reached(self, flops: float, tokens: int) -> bool:
        return (flops if self.kind == "flops" else tokens) >= self.amount

    def fraction(self, flops: float, tokens: int) -> float:
        return (flops if self.kind == "flops" else tokens) / self.amount


def parse_budget(text: str) -> Budget:
    """`1e15`, `3e13flops` -> FLOPs; `20Mtok`, `1.5Gtok` -> tokens. Raises BudgetError."""
    raw = str(text)
    m = _TOKENS_RE.match(raw)
    if m:
        amount = float(m.group(1)) * _TOKEN_SUFFIX[m.group(2).lower()]
        kind = "tokens"
    else:
        m = _FLOPS_RE.match(raw)
        if not m:
            raise BudgetError(
                f"cannot read budget {raw!r}: give FLOPs (1e15, 3e13flops) or tokens (20Mtok, 500ktok)"
            )
        amount, kind = float(m.group(1)), "flops"
    if not math.isfinite(amount) or amount <= 0:
        raise BudgetError(f"budget {raw!r} must be a positive number")
    return Budget(kind=kind, amount=amount, text=raw.strip())


# ----------------------------------------------------------------------------- FLOP counting

_cpu_sdpa_registered = False


def _register_cpu_attention() -> None:
    """Teach FlopCounterMode the CPU flash-attention kernels (forward and backward)."""
    global _cpu_sdpa_registered
    if _cpu_sdpa_registered:
        return
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = aten._scaled_dot_product_flash_attention_for_cpu
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd not in fc.flop_registry and fwd.default not in fc.flop_registry:

        @fc.register_flop_formula(fwd)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd not in fc.flop_registry and bwd.default not in fc.flop_registry:

        @fc.register_flop_formula(bwd)
        def _cpu_sdpa_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    _cpu_sdpa_registered = True


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run `fn()` under FlopCounterMode; return (its result, FLOPs counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_attention()
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())


def _sum_over_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def model_extra_flops(model: Any, batch: Any) -> float:
    """Analytic FLOPs a model declares for ops the counter cannot see (0 if it declares none)."""
    inner = getattr(model, "module", model)  # unwrap DDP
    extra = getattr(inner, "extra_flops", None)
    return float(extra(batch)) if callable(extra) else 0.0


@dataclass
class BudgetMeter:
    """Accumulates achieved FLOPs and tokens across steps, processes and resumes.

    Used by the shared loop and by every stage runner, so all architectures are charged alike.
    With data parallelism every rank holds the same totals: `measure` sums all ranks' counts.
    """

    budget: Budget
    world_size: int = 1
    flops: float = 0.0
    tokens: int = 0
    steps: int = 0
    flops_per_step: Optional[float] = None

    def measure(self, fn: Callable[[], Any], model: Any = None, batches: Sequence[Any] = ()) -> tuple[Any, float]:
        """Run one unit of work under the counter, plus `model.extra_flops(b)` for each batch b it
        processed; returns (result, FLOPs summed over all data-parallel ranks). Every rank must
        call it at the same point: the sum is an all-reduce, so all ranks agree on the budget."""
        result, local = count_flops(fn)
        if model is not None:
            local += sum(model_extra_flops(model, b) for b in batches)
        return result, self.sum_over_ranks(local)

    def sum_over_ranks(self, local: float) -> float:
        """`local` FLOPs of this rank summed over all data-parallel ranks (an all-reduce: every
        rank must call it at the same point)."""
        return _sum_over_ranks(float(local)) if self.world_size > 1 else float(local)

    def add(self, flops: float, tokens: int, steps: int = 1) -> None:
        self.flops += flops
        self.tokens += int(tokens)
        self.steps += steps

    @property
    def done(self) -> bool:
        return self.budget.reached(self.flops, self.tokens)

    @property
    def fraction(self) -> float:
        return min(1.0, self.budget.fraction(self.flops, self.tokens))

    def state_dict(self) -> dict:
        return {"flops": self.flops, "tokens": self.tokens, "steps": self.steps, "flops_per_step": self.flops_per_step}

    def load_state_dict(self, state: dict) -> None:
        self.flops = float(state["flops"])
        self.tokens = int(state["tokens"])
        self.steps = int(state["steps"])
        self.flops_per_step = state.get("flops_per_step")
