"""Budget parsing, FLOP counting (exact, hand-computed) and the stopping rule."""

import math

import pytest
import torch

from hmst_bench.budget import Budget, BudgetError, BudgetMeter, count_flops, parse_budget
from hmst_bench.model import LanguageModel


@pytest.mark.parametrize(
    "text, kind, amount",
    [
        ("1e9", "flops", 1e9),
        ("2.5e15", "flops", 2.5e15),
        ("3e13flops", "flops", 3e13),
        ("4e12 FLOPs", "flops", 4e12),
        ("1000000", "flops", 1e6),
        ("20Mtok", "tokens", 20e6),
        ("500ktok", "tokens", 5e5),
        ("1.5Gtok", "tokens", 1.5e9),
        ("4096tok", "tokens", 4096),
        ("2Btokens", "tokens", 2e9),
    ],
)
def test_parse_budget(text, kind, amount):
    b = parse_budget(text)
    assert (b.kind, b.amount) == (kind, amount)


@pytest.mark.parametrize("text", ["", "abc", "1e15xyz", "-1e9", "0", "20Mbytes", "nan", "inf"])
def test_parse_budget_rejects(text):
    with pytest.raises(BudgetError):
        parse_budget(text)


def test_steps_rule_first_step_at_or_past_budget():
    b = Budget("flops", 1000.0, "1000")
    assert b.steps_for(300.0, 1) == 4  # 1200 >= 1000 and 900 < 1000
    assert b.steps_for(250.0, 1) == 4  # exactly reaches it
    assert b.steps_for(2000.0, 1) == 1
    t = Budget("tokens", 10_000, "10ktok")
    assert t.steps_for(1e9, 4096) == 3


def test_linear_flops_exact():
    """nn.Linear(in, out) on [B, in]: forward 2*B*in*out; backward twice that (grad input + grad weight)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)

    def fwd_bwd():
        lin(x).sum().backward()

    _, flops = count_flops(fwd_bwd)
    assert flops == 2 * 4 * 16 * 8 * 3


def test_no_grad_passes_are_counted():
    lin = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16)

    def work():
        with torch.no_grad():
            lin(x)
            lin(x)

    _, flops = count_flops(work)
    assert flops == 2 * (2 * 4 * 16 * 8)


def test_cpu_sdpa_counts_like_the_matmuls_it_replaces():
    """Attention forward is Q@K^T and P@V: 4*B*H*T*T*D; backward is twice that (bmm grads: 8*B*H*T*T*D)... the
    formula torch uses for the GPU kernels gives forward 4*B*H*T*T*D and backward 10*B*H*T*T*D."""
    B, H, T, D = 2, 3, 16, 8
    q = torch.randn(B, H, T, D, requires_grad=True)
    k = torch.randn(B, H, T, D, requires_grad=True)
    v = torch.randn(B, H, T, D, requires_grad=True)
    f = torch.nn.functional.scaled_dot_product_attention

    _, fwd = count_flops(lambda: f(q, k, v, is_causal=True))
    assert fwd == 4 * B * H * T * T * D

    def fwd_bwd():
        f(q, k, v, is_causal=True).sum().backward()

    _, both = count_flops(fwd_bwd)
    assert both == 4 * B * H * T * T * D + 10 * B * H * T * T * D


class _Declares(LanguageModel):
    """A linear layer declaring 100 FLOPs per batch the counter cannot see (the scoring methods
    are not exercised here)."""

    max_seq_len = 2

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.lin(x)

    def extra_flops(self, batch):
        return 100.0

    def loss(self, batch):
        raise NotImplementedError

    token_logprobs = next_token_logprobs = loss


def test_meter_accumulates_and_adds_declared_extra_flops():
    meter = BudgetMeter(parse_budget("1000"))
    lin = _Declares()
    _, flops = meter.measure(lambda: lin(torch.ones(1, 2)), lin, batches=["b1", "b2"])
    assert meter.measure(lambda: lin(torch.ones(1, 2)), torch.nn.Linear(2, 2), batches=["b"])[1] == 8  # no model: none
    assert flops == 2 * 1 * 2 * 2 + 2 * 100
    _, flops = meter.measure(lambda: lin(torch.ones(1, 2)))
    assert flops == 2 * 1 * 2 * 2
    for _ in range(124):
        meter.add(flops, tokens=1)
    assert not meter.done and meter.flops == 992
    meter.add(flops, tokens=1)
    assert meter.done and math.isclose(meter.fraction, 1.0)
    state = meter.state_dict()
    other = BudgetMeter(parse_budget("1000"))
    other.load_state_dict(state)
    assert (other.flops, other.tokens, other.steps) == (meter.flops, meter.tokens, meter.steps)


def test_warmup_then_cosine_schedule_by_hand():
    from hmst_bench.train.context import lr_lambda

    f = lr_lambda(total_steps=10, warmup=2, min_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]  # linear warmup
    assert f(2) == 1.0  # cosine starts at the peak
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way: 0.55
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)  # floor, never below
