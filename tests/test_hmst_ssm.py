"""HMST's selective SSM (hmst_bench_hmst.ssm): parallel scan against the per-timestep loop,
recurrent decoding against the parallel path, state carry-over, gradients, causality,
initialisation, numerical safety on long sequences, one projection path, FLOP accounting
(the counter's matmuls and the analytic elementwise terms, both checked by hand), and the shared
optimiser never decaying A_log and D (their `_no_weight_decay` mark)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hmst_bench.budget import count_flops
from hmst_bench.train.context import Recipe, decays, make_optimizer
from hmst_bench_hmst.model import HMSTModel
from hmst_bench_hmst.plugin import HMST
from hmst_bench_hmst.ssm import (
    SelectiveSSM,
    extra_flops_of,
    inverse_softplus,
    parallel_scan,
    scan_ops,
    sequential_scan,
)

F64 = torch.float64


def _scan_inputs(B, L, lanes, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, L, *lanes, generator=g, dtype=dtype)  # decays in [0, 1)
    b = torch.randn(B, L, *lanes, generator=g, dtype=dtype)
    h0 = torch.randn(B, *lanes, generator=g, dtype=dtype)
    return a, b, h0


def _layer(d=8, N=4, seed=0, dtype=F64):
    torch.manual_seed(seed)
    return SelectiveSSM(d, d_state=N).to(dtype)


@pytest.mark.parametrize("L", [1, 2, 3, 7, 16, 33, 100])
@pytest.mark.parametrize("with_h0", [False, True])
def test_parallel_scan_matches_sequential(L, with_h0):
    a, b, h0 = _scan_inputs(2, L, (3, 4), seed=L)
    h0 = h0 if with_h0 else None
    par, seq = parallel_scan(a, b, h0), sequential_scan(a, b, h0)
    assert par.shape == seq.shape == a.shape
    assert torch.allclose(par, seq, rtol=0, atol=1e-10)


def test_layer_forward_matches_sequential_and_step():
    m = _layer()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 37, 8, generator=g, dtype=F64)
    s0 = torch.randn(2, 8, 4, generator=g, dtype=F64)
    for state0 in (None, s0):
        y, hT = m(x, state0=state0, return_state=True)
        y_seq, hT_seq = m(x, state0=state0, return_state=True, scan=sequential_scan)
        assert torch.allclose(y, y_seq, rtol=0, atol=1e-10) and torch.allclose(hT, hT_seq, rtol=0, atol=1e-10)
        state, ys = state0, []
        for t in range(x.shape[1]):
            y_t, state = m.step(x[:, t], state)
            ys.append(y_t)
        assert torch.allclose(torch.stack(ys, 1), y, rtol=0, atol=1e-10)
        assert torch.allclose(state, hT, rtol=0, atol=1e-10)


def test_state_carries_across_segments_and_into_step():
    m = _layer()
    x = torch.randn(3, 40, 8, dtype=F64)
    y_full, h_full = m(x, return_state=True)
    y1, h1 = m(x[:, :25], return_state=True)  # a segment's summary ...
    y2, h2 = m(x[:, 25:], state0=h1, return_state=True)  # ... continued by the next segment
    assert torch.allclose(torch.cat([y1, y2], 1), y_full, rtol=0, atol=1e-10)
    assert torch.allclose(h2, h_full, rtol=0, atol=1e-10)
    state = h1  # decoding continues exactly from forward's final state
    for t in range(25, 40):
        y_t, state = m.step(x[:, t], state)
        assert torch.allclose(y_t, y_full[:, t], rtol=0, atol=1e-10)
    assert torch.allclose(state, h_full, rtol=0, atol=1e-10)


def test_gradcheck_scan():
    a, b, h0 = _scan_inputs(1, 5, (2,), seed=3)
    inputs = tuple(t.clone().requires_grad_() for t in (a, b, h0))
    assert torch.autograd.gradcheck(parallel_scan, inputs)


def test_gradients_match_sequential():
    m = _layer()
    x = torch.randn(2, 19, 8, dtype=F64, requires_grad=True)
    grads = []
    for scan in (parallel_scan, sequential_scan):
        m.zero_grad()
        x.grad = None
        m(x, scan=scan).pow(2).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for gp, gs in zip(*grads):
        assert torch.allclose(gp, gs, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_causality_exact(dtype):
    m = _layer(dtype=dtype)
    x = torch.randn(2, 29, 8, dtype=dtype)
    y = m(x)
    for j in (0, 1, 14, 28):
        x2 = x.clone()
        x2[:, j] += torch.randn(2, 8, dtype=dtype)
        y2 = m(x2)
        assert torch.equal(y2[:, :j], y[:, :j])
        assert not torch.equal(y2[:, j], y[:, j])


def test_initialisation():
    torch.manual_seed(0)
    d, N = 40, 16
    m = SelectiveSSM(d, d_state=N, dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4)
    assert m.dt_rank == math.ceil(d / 16) == 3
    assert m.x_proj.weight.shape == (m.dt_rank + 2 * N, d) and m.x_proj.bias is None
    assert m.dt_proj.weight.shape == (d, m.dt_rank) and m.dt_proj.bias is not None
    expected_A = -torch.arange(1, N + 1, dtype=torch.float32).expand(d, N)
    assert torch.allclose(m.A, expected_A, rtol=1e-6, atol=0)
    assert torch.equal(m.D.detach(), torch.ones(d))
    dt = F.softplus(m.dt_proj.bias.detach().double())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert dt.std() > 0  # sampled, not constant
    # the floor applies when dt_min is below it
    m2 = SelectiveSSM(d, d_state=N, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4)
    assert torch.allclose(F.softplus(m2.dt_proj.bias.detach().double()), torch.full((d,), 1e-4, dtype=F64), rtol=1e-4)
    y = torch.tensor([1e-4, 1e-2, 1.0, 5.0], dtype=F64)
    assert torch.allclose(F.softplus(inverse_softplus(y)), y, rtol=1e-12)
    assert SelectiveSSM(64, dt_rank=7).dt_rank == 7


def test_long_sequence_large_dt_is_finite():
    torch.manual_seed(0)
    m = SelectiveSSM(16, d_state=8)
    with torch.no_grad():
        m.dt_proj.bias.fill_(20.0)  # dt ~ 20: decays exp(-20 * n) underflow towards 0
    x = (10 * torch.randn(1, 4096, 16)).requires_grad_()
    y, h = m(x, return_state=True)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    # small dt (slow decay, long memory) is finite too
    with torch.no_grad():
        m.dt_proj.bias.fill_(-20.0)
    assert torch.isfinite(m(x.detach())).all()


def test_one_projection_path():
    m = _layer()
    x = torch.randn(2, 6, 8, dtype=F64)
    dt, B, C = m.project(x)
    assert dt.shape == (2, 6, 8) and B.shape == C.shape == (2, 6, 4) and (dt > 0).all()
    for t in range(6):
        for seq_val, tok_val in zip((dt, B, C), m.project(x[:, t])):
            assert torch.allclose(seq_val[:, t], tok_val, rtol=1e-13, atol=1e-14)
    calls = []
    orig = m.project
    m.project = lambda v: calls.append(tuple(v.shape)) or orig(v)
    m(x)
    m.step(x[:, 0])
    assert calls == [(2, 6, 8), (2, 8)]


def test_scan_ops_by_hand():
    # L=4: level 1 P=2 -> 3*2 + 2*1 = 8; level 2 P=1 -> 3 + 0 = 3
    assert scan_ops(1) == 0 and scan_ops(2) == 3 and scan_ops(4) == 11
    assert scan_ops(3) == 11  # padded to 4
    assert scan_ops(5) == 13 + 8 + 3
    assert scan_ops(4, with_state0=True) == 13


def test_extra_flops_by_hand():
    # B=1, L=4, d=2, N=3: M = 8, K = 24
    # A: 2*2*3 = 12; dt bias 8; softplus 8; dt*A 24; exp 24; dt*x 8; *B 24;
    # scan 6 lanes * 11 = 66; D*x + y 16
    fwd = 12 + 8 + 8 + 24 + 24 + 8 + 24 + 66 + 16
    assert extra_flops_of(1, 4, 2, 3, backward=False) == fwd == 190
    assert extra_flops_of(1, 4, 2, 3) == 3 * fwd
    assert extra_flops_of(1, 4, 2, 3, backward=False, with_state0=True) == fwd + 2 * 6
    m = SelectiveSSM(2, d_state=3)
    assert m.extra_flops_of(1, 4) == 3 * fwd


class _ElementwiseCount(TorchDispatchMode):
    """Counts output elements of the elementwise arithmetic ops a forward executes."""

    OPS = {"mul", "add", "exp", "neg", "softplus"}

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.OPS:
            self.total += out.numel()
        return out


@pytest.mark.parametrize("L, with_state0", [(4, False), (7, True), (33, False)])
def test_extra_flops_equal_executed_elementwise_ops(L, with_state0):
    B, d, N = 2, 5, 3
    m = SelectiveSSM(d, d_state=N)
    x = torch.randn(B, L, d)
    s0 = torch.randn(B, d, N) if with_state0 else None
    with torch.no_grad(), _ElementwiseCount() as counter:
        m(x, state0=s0)
    assert counter.total == extra_flops_of(B, L, d, N, backward=False, with_state0=with_state0)


def test_counted_matmul_flops_by_hand():
    B, L, d, N = 2, 9, 32, 4
    m = SelectiveSSM(d, d_state=N)
    r = m.dt_rank
    x = torch.randn(B, L, d, requires_grad=True)
    _, fwd = count_flops(lambda: m(x))
    # x_proj, dt_proj, and the C . h contraction (einsum -> bmm)
    assert fwd == 2 * B * L * (d * (r + 2 * N) + r * d + d * N)
    _, total = count_flops(lambda: m(x).sum().backward())
    assert total == 3 * fwd


def in_group(group: dict, param: torch.nn.Parameter) -> bool:
    return any(p is param for p in group["params"])


def test_optimizer_never_decays_a_log_and_d():
    torch.manual_seed(0)
    model = HMSTModel(HMST.make_config("micro", {"memory": True})).to(F64)  # the mark survives .to()
    ssm = model.memory.ssm
    assert ssm.A_log.ndim == 2 and ssm.D.ndim == 1  # A_log is a matrix: only its mark keeps it out
    lr, wd = 1.0, 0.5  # 1 - lr * wd = 0.5: scaling by it and the shrink lr * wd * p are exact in binary
    optimizer = make_optimizer(model, Recipe(lr=lr, weight_decay=wd))  # what the trainer calls
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (wd, 0.0)
    assert in_group(no_decay, ssm.A_log) and in_group(no_decay, ssm.D)
    assert not in_group(decay, ssm.A_log) and not in_group(decay, ssm.D)
    assert in_group(decay, ssm.x_proj.weight) and decays(ssm.x_proj.weight)
    # zero gradients: Adam's step is lr * 0 / (0 + eps) = 0, so only AdamW's decoupled decay,
    # p <- p * (1 - lr * wd), moves a parameter
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - lr * wd) if in_group(decay, p) else before[name]
        assert torch.equal(p.detach(), expected), name
    assert torch.equal(ssm.A_log.detach(), before["memory.ssm.A_log"])
    assert torch.equal(ssm.D.detach(), before["memory.ssm.D"])
    x_proj = before["memory.ssm.x_proj.weight"]
    assert torch.equal(x_proj - ssm.x_proj.weight.detach(), lr * wd * x_proj)  # shrank by exactly lr * wd * value
