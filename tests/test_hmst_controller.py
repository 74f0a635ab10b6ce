"""HMST's meta-controller module (plugins/hmst/hmst_bench_hmst/controller.py): its dimensions
follow the base in every preset (the seed's review found a controller built for 8 experts over a
base of 16), it is causal, and its cached step-by-step decisions equal one pass over the episode."""

from __future__ import annotations

import pytest
import torch

from hmst_bench_hmst.controller import N_STATE, Controller, gate_choices, width
from hmst_bench_hmst.plugin import HMST, SIZES


@pytest.mark.parametrize("size", list(SIZES))
def test_the_controller_follows_the_base_in_every_preset(size):
    layers = HMST.make_config(size).n_layers
    cfg = HMST.make_config(size, {"exit_layers": ",".join(str(e) for e in range(1, layers))})
    ctrl = Controller(cfg)
    assert ctrl.inp.in_features == cfg.d_model + N_STATE
    assert ctrl.width == width(cfg) == max(32, cfg.d_model // 4 // 32 * 32) and ctrl.n_layers == max(2, layers // 2)
    assert ctrl.policy["exit"].out_features == len(cfg.exits) + 1 == layers
    assert {g: h.out_features for g, h in ctrl.policy.items()} == gate_choices(cfg)
    assert sum(p.numel() for p in ctrl.parameters()) < 0.2 * sum(
        v for v in (cfg.d_model * cfg.vocab_size, 12 * cfg.d_model ** 2 * cfg.n_layers))  # small beside the base


def test_causal_and_cached_steps_equal_one_pass():
    torch.manual_seed(0)
    cfg = HMST.make_config("micro", {"exit_layers": "1"})
    ctrl = Controller(cfg).eval()
    hidden, state = torch.randn(2, 6, cfg.d_model), torch.rand(2, 6, N_STATE)
    with torch.no_grad():
        logits, value = ctrl(hidden, state)
        changed = hidden.clone()
        changed[:, 4:] += 1.0  # later points cannot change earlier decisions
        later, _ = ctrl(changed, state)
        caches, steps = ctrl.new_caches(), []
        for t in range(6):
            out, v = ctrl(hidden[:, t : t + 1], state[:, t : t + 1], caches, start=t)
            steps.append((out, v))
    for g in logits:
        torch.testing.assert_close(later[g][:, :4], logits[g][:, :4])
        torch.testing.assert_close(torch.cat([o[g] for o, _ in steps], dim=1), logits[g], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([v for _, v in steps], dim=1), value, rtol=1e-5, atol=1e-5)
