"""Selective state-space layer (Mamba-style) for HMST's episodic memory.

The recurrence, per channel d and state index n (A diagonal, real, negative):

    h_t = exp(dt_t * A) * h_{t-1} + (dt_t * B_t) * x_t
    y_t = C_t . h_t + D * x_t

dt, B and C depend on the input and come from one projection path (`SelectiveSSM.project`),
used alike by the parallel `forward` over [B, L, d] and by the recurrent `step` over [B, d],
so what a segment writes and what decoding reads are keyed identically.

Training path: `parallel_scan`, an odd-even (recursive-doubling) parallel prefix scan over the
associative operator (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2), in pure PyTorch. It has
ceil(log2 L) levels, each a handful of whole-tensor ops on half the previous length, so its total
arithmetic is O(L) (about 2.5x the sequential loop, see `scan_ops`) and there is no Python loop
over timesteps. It only multiplies decays in [0, 1] and adds: it never divides by cumulative
products nor exponentiates a positive sum, so long sequences with large dt underflow decays to 0
instead of overflowing. `sequential_scan` is the plain per-timestep reference loop.

FLOPs: the budget meter (torch FlopCounterMode) sees the two projections (x_proj, dt_proj) and
the C . h contraction (an einsum that runs as bmm). It does not see the elementwise work; the
model adds that through `extra_flops`, computed by `extra_flops_of` (see its docstring for the
exact list of ops covered).

`benchmark_scan` times parallel against sequential scan; `benchmarks/hmst.py` reports it.
Measured on 2 shared CPU threads at L=1024, N=16 (the reference loop is vectorised over the
B*d*N lanes of each contiguous time slice): 1.8x at B=2, d=64 and 0.5-0.8x at B=4, d=128, so
on CPU the parallel scan only wins where per-step Python overhead dominates (8x at B=1, d=16);
it is memory-bound there, and its log-depth form is meant for accelerators.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SelectiveSSM",
    "parallel_scan",
    "sequential_scan",
    "scan_ops",
    "extra_flops_of",
    "inverse_softplus",
    "benchmark_scan",
]


# ----------------------------------------------------------------------------- scans
# Layout for both scans: a, b are [B, L, *lanes] (time is dim 1, so each time slice is one
# contiguous block); h0 is [B, *lanes] or None. Result h is [B, L, *lanes] with
# h_t = a_t h_{t-1} + b_t and h_{-1} = h0 (0 if None).


def _fold_state0(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor]) -> torch.Tensor:
    """b with the initial state folded into its first step: b_0 <- a_0 h0 + b_0."""
    if h0 is None:
        return b
    first = a[:, :1] * h0.unsqueeze(1) + b[:, :1]
    return torch.cat([first, b[:, 1:]], dim=1)


def _odd_even_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inclusive scan h_t = a_t h_{t-1} + b_t (h_{-1} = 0) over dim 1, recursively.

    Pairs (2i, 2i+1) are combined into one element, the half-length sequence is scanned, and the
    even positions are filled in from the odd prefix before them. Every op is out of place, so
    autograd differentiates it directly. Causal by construction: h_t reads only positions <= t.
    """
    L = a.shape[1]
    if L == 1:
        return b
    if L % 2:  # pad with the identity element (a=1, b=0): later positions never affect earlier ones
        a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        b = torch.cat([b, torch.zeros_like(b[:, :1])], dim=1)
    a0, a1 = a[:, 0::2], a[:, 1::2]
    b0, b1 = b[:, 0::2], b[:, 1::2]
    h_odd = _odd_even_scan(a0 * a1, a1 * b0 + b1)  # h at 1, 3, 5, ...
    h_even = torch.cat([b0[:, :1], a0[:, 1:] * h_odd[:, :-1] + b0[:, 1:]], dim=1)  # h at 0, 2, 4, ...
    h = torch.stack([h_even, h_odd], dim=2).flatten(1, 2)
    return h[:, :L]


def parallel_scan(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t over dim 1 (h_{-1} = h0, or 0) by an O(L)-work parallel scan."""
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must be [B, L, ...] of one shape")
    return _odd_even_scan(a, _fold_state0(a, b, h0))


def sequential_scan(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: the same recurrence as `parallel_scan`, one Python iteration per timestep."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):
        h = a_t * h + b_t
        out.append(h)
    return torch.stack(out, dim=1)


def scan_ops(length: int, with_state0: bool = False) -> int:
    """Arithmetic ops per lane that `parallel_scan` executes on a sequence of `length`.

    One level on length L (padded to even, P = L/2 pairs): a0*a1 (P), a1*b0 + b1 (2P), then
    after the recursion a0*h_odd + b0 for the P-1 even positions past the first (2(P-1)).
    Folding a state0 in costs 2 more (a_0*h0 + b_0). The sequential loop would cost 2L.
    """
    ops, L = 0, int(length)
    while L > 1:
        P = (L + 1) // 2
        ops += 3 * P + 2 * (P - 1)
        L = P
    return ops + (2 if with_state0 else 0)


def extra_flops_of(
    batch: int,
    length: int,
    d_model: int,
    d_state: int,
    *,
    backward: bool = True,
    with_state0: bool = False,
) -> int:
    """Elementwise FLOPs of one `SelectiveSSM.forward` that FlopCounterMode does not count.

    Convention: 1 FLOP per elementwise arithmetic op or transcendental (exp, softplus) per
    element; backward = 2x forward (the same ratio the counter uses for matmuls). With
    M = batch*length*d_model and K = M*d_state, the forward covers exactly:

      A = -exp(A_log)              2*d_model*d_state (once per call)
      dt_proj bias add             M (a separate add, or inside addmm: the counter counts neither)
      softplus(dt)                 M
      dt * A                       K
      exp(dt * A)                  K
      dt * x                       M
      (dt * x) * B                 K
      scan (parallel_scan)         batch*d_model*d_state * scan_ops(length, with_state0)
      D * x, + y                   2M
      (state0 given: a_0 * h0 + b_0, 2*batch*d_model*d_state, inside scan_ops)

    Not covered here because the counter already counts them: the x_proj and dt_proj mm
    (x_proj has no bias; dt_proj's bias add is listed above) and the C . h contraction (einsum -> bmm, 2K).
    """
    M = batch * length * d_model
    K = M * d_state
    fwd = 2 * d_model * d_state + M + M + K + K + M + K + batch * d_model * d_state * scan_ops(length, with_state0) + 2 * M
    return fwd * (3 if backward else 1)


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y (y > 0): y + log(-expm1(-y))."""
    return y + torch.log(-torch.expm1(-y))


# ----------------------------------------------------------------------------- the layer


class SelectiveSSM(nn.Module):
    """Mamba-style selective SSM: input-dependent dt, B, C; S4D-real A; skip D.

    forward(x [B, L, d], state0=None, return_state=False) -> y [B, L, d] (, final state [B, d, N])
    step(x_t [B, d], state [B, d, N] or None) -> (y_t [B, d], new state [B, d, N])
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        dt_rank: Union[int, str] = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.d_model = int(d_model)
        self.d_state = int(d_state)
        self.dt_rank = math.ceil(self.d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor

        self.x_proj = nn.Linear(self.d_model, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_model, bias=True)
        # S4D-real: A[d, n] = -(n + 1), stored as A_log = log(n + 1).
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_model, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_model))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self._init_dt(dt_scale)

    def _init_dt(self, dt_scale: float) -> None:
        std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            u = torch.rand(self.d_model)
            dt = torch.exp(u * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
            dt = dt.clamp(min=self.dt_init_floor)
            self.dt_proj.bias.copy_(inverse_softplus(dt))
        self.dt_proj.bias._no_reinit = True

    @property
    def A(self) -> torch.Tensor:
        return -torch.exp(self.A_log)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one projection path: x [..., d] -> dt [..., d] (> 0), B [..., N], C [..., N]."""
        z = self.x_proj(x)
        dt_low, B, C = torch.split(z, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt_low))
        return dt, B, C

    def _discretise(self, x, dt, B):
        """(a, u) with a = exp(dt A) and u = (dt x) B; x, dt [..., d], B [..., N] -> [..., d, N]."""
        a = torch.exp(dt.unsqueeze(-1) * self.A)
        u = (dt * x).unsqueeze(-1) * B.unsqueeze(-2)
        return a, u

    def forward(
        self,
        x: torch.Tensor,
        state0: Optional[torch.Tensor] = None,
        return_state: bool = False,
        scan=parallel_scan,
    ):
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected x [B, L, {self.d_model}], got {tuple(x.shape)}")
        dt, B, C = self.project(x)
        a, u = self._discretise(x, dt, B)  # [B, L, d, N]
        h = scan(a, u, state0)  # [B, L, d, N]
        y = torch.einsum("bldn,bln->bld", h, C) + self.D * x
        if return_state:
            return y, h[:, -1]
        return y

    def step(self, x_t: torch.Tensor, state: Optional[torch.Tensor] = None):
        """One recurrent step: x_t [B, d], state [B, d, N] (None = zeros) -> (y_t, new state)."""
        dt, B, C = self.project(x_t)
        a, u = self._discretise(x_t, dt, B)  # [B, d, N]
        h = u if state is None else a * state + u
        y = torch.einsum("bdn,bn->bd", h, C) + self.D * x_t
        return y, h

    def init_state(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch, self.d_model, self.d_state, device=device, dtype=dtype or self.D.dtype)

    def extra_flops_of(self, batch: int, length: int, *, backward: bool = True, with_state0: bool = False) -> int:
        """`extra_flops_of` for this layer's sizes (elementwise FLOPs the counter cannot see)."""
        return extra_flops_of(batch, length, self.d_model, self.d_state, backward=backward, with_state0=with_state0)


# ----------------------------------------------------------------------------- benchmark


def benchmark_scan(batch: int = 2, length: int = 1024, d_model: int = 64, d_state: int = 16,
                   repeats: int = 5, backward: bool = False) -> dict:
    """Median seconds of parallel_scan vs sequential_scan on the same [B, L, d, N] float32 inputs."""
    import statistics
    import time

    g = torch.Generator().manual_seed(0)
    shape = (batch, length, d_model, d_state)
    a0 = torch.rand(shape, generator=g) * 0.5 + 0.5
    b0 = torch.randn(shape, generator=g)

    def timed(fn):
        times = []
        for _ in range(repeats + 1):
            a = a0.clone().requires_grad_(backward)
            b = b0.clone().requires_grad_(backward)
            t = time.perf_counter()
            h = fn(a, b)
            if backward:
                h.sum().backward()
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])

    par = timed(parallel_scan)
    seq = timed(sequential_scan)
    return {
        "batch": batch, "length": length, "d_model": d_model, "d_state": d_state,
        "backward": backward, "threads": torch.get_num_threads(),
        "parallel_s": par, "sequential_s": seq, "speedup": seq / par,
    }
