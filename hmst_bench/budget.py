"""Training budgets: parsing `--budget`, measuring FLOPs, and the meter that stops training.

A budget is compute (`1e15`, `2.5e15`, `3e13flops`) or tokens (`20Mtok`, `500ktok`). FLOPs are
never estimated from a formula such as 6*N*D: they are counted by `torch.utils.flop_counter`
on the real model and a real batch (forward and backward, including passes run under
no_grad), plus any analytic terms the model declares through `extra_flops(batch)` for ops the
counter cannot see. The counter as shipped does not know the CPU kernel of
`scaled_dot_product_attention`, so it is registered here with the same formula torch uses for
the GPU kernels; otherwise attention would cost zero on CPU.

The counter is also blind to other heavy kernels (an LSTM on CPU runs as one
`aten.mkldnn_rnn_layer`, a GRU on CUDA as `aten._cudnn_rnn`, a plugin's custom op): every
measurement lists the executed ops that have no formula yet carry real arithmetic
(`uncounted_work`, rule below), so the trainer can warn or refuse instead of silently charging
less. A model whose `extra_flops` accounts for such ops names them in `extra_flops_covers`.

torch is imported lazily (parse_budget is used by the CLI before any model exists).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

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


# ----------------------------------------------------------------------------- ops the counter cannot see
#
# FlopCounterMode counts contractions only (matmuls, convolutions, attention) and by design
# ignores every op whose work is proportional to the tensors it reads and writes: elementwise
# math, reductions, softmax, normalisation, gathers, copies, views. Most ops therefore have no
# formula, and "no formula" alone means nothing. An executed op is reported as uncounted work
# when the counter has no formula for it and
#
#   1. it is an aten/prims op of a family whose work grows faster than its inputs and outputs
#      (many multiply-adds per element): its name has one of _HEAVY_TOKENS as a `_`-separated
#      word, or contains "attention". That covers fused recurrent kernels (`mkldnn_rnn_layer`,
#      `_cudnn_rnn`, `miopen_rnn`, `_lstm_mps`), convolution kernels without a formula
#      (`mkldnn_convolution`, `slow_conv3d`, `_conv_depthwise2d`), attention kernels not
#      registered, matmul variants (`addbmm`, `addmv`, `mv`, `dot`, `_int_mm`,
#      `_weight_int8pack_mm`, `_addmm_activation`, `_trilinear` of nn.Bilinear), linear algebra
#      (`linalg_*`, `cholesky`, `_linalg_svd`, ...), FFTs (`_fft_r2c`: Hyena/FNet-style mixing)
#      and `embedding_bag` (a sparse matrix product of bags with the table);
#      except the ops in _POINTWISE, which match by name but only do elementwise work
#      (`_thnn_fused_gru_cell` takes gates already computed by mm/addmm, which are counted) or
#      bookkeeping (`_cudnn_rnn_flatten_weight` copies weights);
#   2. or it is from any other namespace (a custom op registered with torch.library, a Triton
#      kernel, torchvision, quantized, mkldnn): the counter cannot know its cost, so the model
#      must say (declaring 0 in extra_flops is fine for a cheap elementwise custom op);
#      except the namespaces in _FREE_NAMESPACES: profiler markers, collective communication
#      and metadata primitives, which are not model arithmetic.
#
# Composite ops (aten.lstm, aten.gru, aten.linear, aten.einsum, ...) never appear: the counter
# sees what they decompose into. On CPU with torch 2.13 nn.GRU and nn.RNN run as mm/addmm
# (fully counted) while nn.LSTM runs as mkldnn_rnn_layer (reported); on CUDA all three run as
# _cudnn_rnn (reported).

_HEAVY_TOKENS = frozenset({
    "rnn", "lstm", "gru",  # recurrent layers whose kernels run the matmuls inside
    "conv", "conv1d", "conv2d", "conv3d", "convolution", "depthwise2d", "depthwise3d",
    "mm", "bmm", "addmm", "addbmm", "baddbmm", "addmv", "mv", "dot", "vdot", "matmul", "linear", "gemm",
    "bilinear", "trilinear", "tensordot", "einsum",
    "linalg", "cholesky", "triangular", "lu", "qr", "svd", "eig", "eigh", "geqrf", "orgqr", "ormqr", "inverse",
    "lstsq", "solve", "det", "slogdet", "logdet", "pinverse",
    "fft", "stft", "istft", "cdist", "pdist", "bag",
})
_POINTWISE = frozenset({
    "_thnn_fused_lstm_cell", "_thnn_fused_lstm_cell_backward", "_thnn_fused_lstm_cell_backward_impl",
    "_thnn_fused_gru_cell", "_thnn_fused_gru_cell_backward",
    "_thnn_differentiable_lstm_cell_backward", "_thnn_differentiable_gru_cell_backward",
    "_cudnn_rnn_flatten_weight", "_use_cudnn_rnn_flatten_weight", "lu_unpack",
})
# profiler markers, collectives, TorchScript's metadata primitives (prim.device): no model arithmetic
_FREE_NAMESPACES = frozenset({"profiler", "c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor", "prim"})


def uncounted_work(op: str) -> bool:
    """Whether an executed op without a FLOP formula (named `namespace.name`, e.g.
    `aten.mkldnn_rnn_layer`) carries arithmetic the budget would miss (rule above)."""
    namespace, _, name = op.partition(".")
    if namespace in _FREE_NAMESPACES:
        return False
    if namespace not in ("aten", "prims"):
        return True
    if name in _POINTWISE:
        return False
    words = set(name.strip("_").split("_"))
    return bool(words & _HEAVY_TOKENS) or "attention" in name


def covered_ops(model: Any, ops: Iterable[str]) -> set[str]:
    """The ops among `ops` that `model` declares its extra_flops accounts for: names or glob
    patterns in its `extra_flops_covers` (e.g. "aten.mkldnn_rnn_layer*"). A model that does not
    override `extra_flops`, or is not a `LanguageModel` at all, covers nothing."""
    from hmst_bench.model import LanguageModel

    inner = getattr(model, "module", model)  # unwrap DDP
    if not isinstance(inner, LanguageModel) or type(inner).extra_flops is LanguageModel.extra_flops:
        return set()  # declared ops are covered only by an extra_flops of the model's own
    patterns = inner.extra_flops_covers
    if isinstance(patterns, str):
        patterns = (patterns,)
    return {op for op in ops if any(fnmatch.fnmatchcase(op, str(p)) for p in patterns)}


_Counter = None


def _recording_counter():
    """FlopCounterMode that also keeps the name of every executed op it has no formula for.

    It overrides `_count_flops`, which the counter calls once per op it finally runs (after its
    own decompositions), so it sees exactly the ops that were counted or skipped; a dispatch mode
    of our own would also see composite ops the counter then decomposes and counts. `_count_flops`
    is private: tests/test_uncounted_flops.py fails if a torch upgrade stops calling it."""
    global _Counter
    if _Counter is None:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        class RecordingFlopCounter(FlopCounterMode):
            def __init__(self) -> None:
                super().__init__(display=False)
                self.without_formula: set[str] = set()

            def _count_flops(self, func_packet, out, args, kwargs):
                if func_packet not in self.flop_registry:
                    if isinstance(func_packet, torch._ops.OpOverloadPacket):
                        self.without_formula.add(str(func_packet))  # "aten.mkldnn_rnn_layer"
                    else:  # the counter passes a Triton kernel (JITFunction) for triton_kernel_wrapper ops
                        self.without_formula.add(f"triton.{getattr(func_packet, '__name__', type(func_packet).__name__)}")
                return super()._count_flops(func_packet, out, args, kwargs)

        _Counter = RecordingFlopCounter
    return _Counter


def count_flops(fn: Callable[[], Any], without_formula: Optional[set] = None) -> tuple[Any, int]:
    """Run `fn()` under FlopCounterMode; return (its result, FLOPs counted). If a set is given as
    `without_formula`, the names of the executed ops the counter has no formula for are added."""
    _register_cpu_attention()
    with _recording_counter()() as counter:
        result = fn()
    if without_formula is not None:
        without_formula.update(counter.without_formula)
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
    from hmst_bench.model import LanguageModel

    inner = getattr(model, "module", model)  # unwrap DDP
    return float(inner.extra_flops(batch)) if isinstance(inner, LanguageModel) else 0.0


@dataclass
class BudgetMeter:
    """Accumulates achieved FLOPs and tokens across steps, processes and resumes.

    Used by the shared loop and by every stage runner, so all architectures are charged alike.
    With data parallelism every rank holds the same totals: `measure` sums all ranks' counts.
    `uncounted_ops` gathers the ops seen by any measurement that carry arithmetic the counter
    cannot see and the model's extra_flops does not declare (`declared_ops`: those it does);
    `on_uncounted(new_ops)` is called the first time an op joins it (the trainer warns or refuses).
    Each rank records its own ops (ranks run the same model, so they see the same ones).
    """

    budget: Budget
    world_size: int = 1
    flops: float = 0.0
    tokens: int = 0
    steps: int = 0
    flops_per_step: Optional[float] = None
    uncounted_ops: set = field(default_factory=set)
    declared_ops: set = field(default_factory=set)
    on_uncounted: Optional[Callable[[list], None]] = field(default=None, repr=False, compare=False)

    def measure(self, fn: Callable[[], Any], model: Any = None, batches: Sequence[Any] = ()) -> tuple[Any, float]:
        """Run one unit of work under the counter, plus `model.extra_flops(b)` for each batch b it
        processed; returns (result, FLOPs summed over all data-parallel ranks). Every rank must
        call it at the same point: the sum is an all-reduce, so all ranks agree on the budget."""
        seen: set[str] = set()
        result, local = count_flops(fn, seen)
        if model is not None:
            local += sum(model_extra_flops(model, b) for b in batches)
        self.note_ops(seen, model)
        return result, self.sum_over_ranks(local)

    def note_ops(self, without_formula: Iterable[str], model: Any = None) -> list[str]:
        """Record executed ops without a formula (from `count_flops`); returns the uncounted ones
        new to this meter, after calling `on_uncounted` with them."""
        heavy = {op for op in without_formula if uncounted_work(op)}
        declared = covered_ops(model, heavy)
        self.declared_ops |= declared
        new = sorted(heavy - declared - self.uncounted_ops)
        self.uncounted_ops.update(new)
        if new and self.on_uncounted is not None:
            self.on_uncounted(new)
        return new

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
        return {"flops": self.flops, "tokens": self.tokens, "steps": self.steps, "flops_per_step": self.flops_per_step,
                "uncounted_ops": sorted(self.uncounted_ops), "declared_ops": sorted(self.declared_ops)}

    def load_state_dict(self, state: dict) -> None:
        self.flops = float(state["flops"])
        self.tokens = int(state["tokens"])
        self.steps = int(state["steps"])
        self.flops_per_step = state.get("flops_per_step")
        self.uncounted_ops = set(state.get("uncounted_ops", ()))  # absent in checkpoints older than the check
        self.declared_ops = set(state.get("declared_ops", ()))
