"""HMST part 1, item 1: the MoE layer (balance and z losses by hand, renormalised top-k weights,
a naive per-token reference in float64, gradcheck, measured dispatched FLOPs), the MoE language
model (causality, one forward per query, exact KV-cached decoding inside and past the window,
greedy at temperature <= 0, active parameters), the presets, PAD vs EOS in a real batch, and
an end-to-end CLI run with an interrupted-then-resumed twin and greedy generation."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from hmst_bench import ConfigError
from hmst_bench.budget import count_flops
from hmst_bench_hmst.model import HMSTModel
from hmst_bench_hmst.moe import MoE
from hmst_bench_hmst.plugin import HMST, SIZES, HMSTConfig

V = 61


def build(seed=0, **overrides) -> HMSTModel:
    values = dict(vocab_size=V, max_seq_len=24, d_model=32, n_layers=2, n_heads=4, n_experts=4, top_k=2)
    values.update(overrides)
    torch.manual_seed(seed)
    return HMSTModel(HMSTConfig(**values)).eval()


def rand_ids(b, t, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# ============================================================================== MoE layer


def hand_router_layer():
    """d=2, 3 experts, top-2; router rows pick coordinates so the logits are easy to write."""
    layer = MoE(d_model=2, d_ff=4, n_experts=3, top_k=2).double()
    with torch.no_grad():
        layer.router.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    return layer


def test_balance_and_z_loss_by_hand():
    layer = hand_router_layer()
    x = torch.tensor([[math.log(4.0), math.log(2.0)], [0.0, math.log(3.0)]], dtype=torch.float64)
    # token 0: logits (ln4, ln2, 0) -> exp (4, 2, 1)/7 -> top-2 experts 0, 1
    # token 1: logits (0, ln3, 0)   -> exp (1, 3, 1)/5 -> top-2 expert 1, then 0 (tie with 2: lower index)
    _, stats = layer(x)
    p = torch.tensor([[4 / 7, 2 / 7, 1 / 7], [1 / 5, 3 / 5, 1 / 5]], dtype=torch.float64)
    top1 = int(layer.route(x)[2][1, 1])  # which of the tied experts torch.topk picked for token 1
    f = torch.tensor([1 / 4, 2 / 4, 0.0], dtype=torch.float64)
    f[top1] += 1 / 4
    assert torch.allclose(stats.load.double(), f)
    want_balance = 3 * float((f * p.mean(0)).sum())
    assert stats.balance_loss.item() == pytest.approx(want_balance, rel=1e-6)
    want_z = (math.log(7.0) ** 2 + math.log(5.0) ** 2) / 2
    assert stats.z_loss.item() == pytest.approx(want_z, rel=1e-6)
    # perfectly balanced uniform router: balance loss is exactly 1
    uniform = MoE(d_model=2, d_ff=4, n_experts=2, top_k=1).double()
    with torch.no_grad():
        uniform.router.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    _, s = uniform(torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64))
    # p = (e/(e+1/e), ...) for token 0, mirrored for token 1: mean P = (1/2, 1/2), f = (1/2, 1/2)
    assert s.balance_loss.item() == pytest.approx(1.0)


def test_router_is_float32_and_top_k_weights_sum_to_one():
    torch.manual_seed(0)
    layer = MoE(d_model=16, d_ff=32, n_experts=8, top_k=3)
    x = torch.randn(50, 16).bfloat16()
    logits, probs, top_e, weights = layer.route(x)
    assert logits.dtype == torch.float32 and weights.dtype == torch.float32
    assert torch.allclose(weights.sum(-1), torch.ones(50))
    assert torch.equal(top_e, probs.topk(3, dim=-1).indices)


def naive_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax router, top-k, renormalise, weighted sum of SwiGLU experts."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        p = torch.softmax(layer.router @ x[n], dim=-1)
        top_p, top_e = p.topk(layer.top_k)
        for w, e in zip((top_p / top_p.sum()).to(x.dtype), top_e.tolist()):
            gate, up = (x[n] @ layer.gate_up[e]).chunk(2)
            out[n] += w * ((F.silu(gate) * up) @ layer.down[e])
    return out


def test_moe_equals_naive_per_token_reference_in_float64():
    torch.manual_seed(1)
    layer = MoE(d_model=8, d_ff=12, n_experts=5, top_k=2, init_std=0.5).double()
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    y, stats = layer(x)
    assert y.shape == x.shape
    assert torch.allclose(y.reshape(-1, 8), naive_moe(layer, x.reshape(-1, 8)), rtol=0, atol=1e-12)
    assert stats.load.sum().item() == pytest.approx(1.0)


def test_gradcheck_of_the_layer():
    torch.manual_seed(2)
    layer = MoE(d_model=4, d_ff=6, n_experts=3, top_k=2, init_std=0.5).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    # gradcheck through the output and through the (differentiable) balance and z losses
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (x,))
    assert torch.autograd.gradcheck(lambda x: torch.stack([layer(x)[1].balance_loss, layer(x)[1].z_loss]), (x,))
    params = [layer.router, layer.gate_up, layer.down]
    loss = layer(x)[0].square().sum() + layer(x)[1].balance_loss + layer(x)[1].z_loss
    grads = torch.autograd.grad(loss, params)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("top_k", [1, 2])
def test_measured_flops_are_the_dispatched_ones(top_k):
    d, ff, e, n = 16, 24, 4, 40
    torch.manual_seed(3)
    layer = MoE(d_model=d, d_ff=ff, n_experts=e, top_k=top_k)
    x = torch.randn(n, d)
    _, flops = count_flops(lambda: layer(x))
    assert flops == 2 * n * d * e + 6 * n * top_k * d * ff  # router + only the dispatched token-slots


# ============================================================================== the model


def test_one_forward_per_query_and_encode_matches_logits():
    model = build()
    calls = []
    model.embed.register_forward_hook(lambda *a: calls.append(1))
    ids = rand_ids(2, 10, 6)
    with torch.no_grad():
        hidden = model.encode(ids)
        assert len(calls) == 1
        model.loss({"input_ids": ids, "labels": ids})
        assert len(calls) == 2
        model.token_logprobs(ids, ids)
        model.next_token_logprobs(ids)
        assert len(calls) == 4
        h2, logits, _ = model.forward_all(ids)
    assert torch.equal(hidden, h2) and torch.allclose(logits, model.project(hidden))


def test_loss_is_lm_plus_weighted_router_losses_and_aux_is_reported():
    model = build(balance_coef=0.5, z_loss_coef=0.25)
    ids = rand_ids(2, 12, 7)
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        loss, aux = model.loss({"input_ids": ids, "labels": labels})
        lm = F.cross_entropy(model.logits(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert float(aux["lm_loss"]) == pytest.approx(float(lm), rel=1e-6)
    assert float(loss) == pytest.approx(float(lm) + 0.5 * float(aux["balance_loss"]) + 0.25 * float(aux["z_loss"]), rel=1e-6)
    loads = [float(aux[f"load_e{i}"]) for i in range(4)]
    assert sum(loads) == pytest.approx(1.0) and float(aux["expert_load_max"]) == max(loads)


def test_positions_past_the_window_are_refused():
    model = build(max_seq_len=12)
    with pytest.raises(ValueError, match="window"):
        model.forward_all(rand_ids(1, 10), start=5)  # positions 5..14 > window of 12


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_zero_or_below_is_greedy(temperature):
    model = build()
    ids = rand_ids(3, 6, 10)
    with torch.no_grad():
        out = model.generate(ids, 1, temperature=temperature, top_k=5, top_p=0.5)
        want = model.next_token_logprobs(ids).argmax(-1)
    assert [o[0] for o in out] == want.tolist()


def test_active_params_count_top_k_of_n_experts_and_the_tied_head_once():
    for tie in (True, False):
        model = build(tie_embeddings=tie, moe_every=2)  # one MoE layer, one dense
        c = model.config
        expert = 3 * c.d_model * c.expert_d_ff
        total = sum(p.numel() for p in model.parameters())
        assert total == sum(p.numel() for p in set(model.parameters()))
        assert model.num_active_params() == total - (c.n_experts - c.top_k) * expert
        assert (model.head is None) == tie


# ============================================================================== config


def test_every_preset_builds_with_consistent_derived_fields():
    from hmst_bench.arch import DENSE_SHAPES as DENSE

    for size in SIZES:
        cfg = HMST.make_config(size)
        assert {k: getattr(cfg, k) for k in DENSE[size]} == DENSE[size]
        assert cfg.head_dim * cfg.n_heads == cfg.d_model
        assert cfg.expert_d_ff % cfg.ffn_multiple_of == 0 and cfg.expert_d_ff >= 8 * cfg.d_model // 3
        assert "head_dim" not in SIZES[size] and "expert_d_ff" not in SIZES[size]
    model = HMSTModel(HMST.make_config("micro"))  # the small ones really build
    assert model.num_active_params() < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("bad, match", [
    (dict(top_k=9), "top_k"),
    (dict(d_model=30, n_heads=4), "divisible"),
    (dict(moe_every=5), "moe_every"),
    (dict(balance_coef=-1.0), "balance_coef"),
    (dict(n_experts=0), "n_experts"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        HMST.make_config("micro", bad)


def test_plugin_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, hmst_bench_hmst.plugin; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# ============================================================================== end to end

BUDGET = 1e10
ARGS = ("--arch", "hmst", "--size", "micro", "--budget", str(BUDGET), "--corpus", "synthetic-facts", "--seq-len", "64",
        "--save-every", "5")


@pytest.fixture(scope="module")
def hmst_run(bench_home, tmp_path_factory):
    out = tmp_path_factory.mktemp("hmst") / "run"
    run_cli("train", *ARGS, "--out", str(out), env={"HMST_BENCH_HOME": str(bench_home)})
    return out


def test_pad_is_not_eos_and_eos_is_a_training_target(hmst_run):
    from hmst_bench.data.tokens import TokenData
    from hmst_bench.train.rundir import load_run

    tok = load_run(hmst_run).tokenizer
    assert tok.pad_token_id != tok.eos_token_id
    eos = tok.eos_token_id
    stream = torch.tensor([tok.bos_token_id, 5, 6, eos, tok.bos_token_id, 7, eos, 8, tok.pad_token_id], dtype=torch.int32)
    data = TokenData(stream.numpy(), stream.numpy(), tok.pad_token_id)
    batch = data._to_batch(stream[None].long())
    assert (batch["labels"] == eos).sum() == 2  # EOS is predicted
    assert batch["labels"][0, -1] == -100  # only PAD is ignored


def test_trains_through_the_cli(hmst_run):
    from hmst_bench.train.rundir import load_run

    info = json.loads((hmst_run / "run.json").read_text())
    assert info["arch"] == "hmst" and info["status"] == "complete" and info["stage"] == "1"
    assert info["achieved_flops"] >= info["budget_flops"] == BUDGET
    assert info["params_active"] < info["params_total"]
    assert math.isfinite(info["val_loss"])
    train_rows = [r for r in map(json.loads, (hmst_run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert train_rows and all(k in train_rows[-1] for k in ("lm_loss", "balance_loss", "z_loss", "expert_load_max", "load_e7"))
    run = load_run(hmst_run)
    ids = torch.tensor([run.tokenizer.encode("The city of", add_special_tokens=False)])
    with torch.no_grad():
        out = run.model.generate(ids, 5)
        by_hand = run.model.next_token_logprobs(ids).argmax(-1)
    assert len(out[0]) == 5 and out[0][0] == int(by_hand)


def test_interrupted_run_resumes_exactly(hmst_run, bench_home, tmp_path):
    from hmst_bench.train.loop import TrainSettings, train

    full = json.loads((hmst_run / "run.json").read_text())
    out = tmp_path / "cut"

    def interrupt_at_step_6(ctx):
        if ctx.step == 6:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler turns it into a clean stop

    cut = train(TrainSettings(arch="hmst", size="micro", budget=str(BUDGET), corpus="synthetic-facts", seq_len=64,
                              save_every=5, out=out), progress=interrupt_at_step_6)
    assert cut["status"] == "interrupted" and 0 < cut["steps"] < full["steps"]
    resumed = json.loads(run_cli("train", "--resume", "--out", str(out), "--json",
                                 env={"HMST_BENCH_HOME": str(bench_home)}).stdout)
    assert resumed["status"] == "complete" and resumed["stage"] == "1"
    assert resumed["steps"] == full["steps"] and resumed["final_train_loss"] == full["final_train_loss"]
