"""HMST's meta-controller at work (policy.py, stage3.py, the controlled generation in model.py):

- a controlled episode: decisions per generated token from the hidden state of the pass that
  produced the latest token (no extra base pass), the chosen gates really applied (the steps'
  measured FLOPs follow the cost table), "full" decisions equal the plain model token for token;
- the cost table measured per gate, and rewards whose undiscounted sum is the seed's formula;
- `--stage 3` end to end through the CLI after stage 1 (with exits) and the critic stage: what
  it records, the base and critic untouched, budget respected, exact resume after a kill;
- `eval` of the result records the controller's gate rates and FLOPs per generated token;
- refusals, one line each.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import one_line_error, run_cli
from hmst_bench.budget import count_flops
from hmst_bench.generation import Sampling
from hmst_bench_hmst import policy
from hmst_bench_hmst.model import HMSTModel
from hmst_bench_hmst.plugin import HMSTConfig

V = 61
GREEDY = Sampling(0.0, 1.0, 0)


def build(**overrides) -> HMSTModel:
    torch.manual_seed(0)
    values = dict(vocab_size=V, max_seq_len=16, d_model=32, n_layers=4, n_heads=4, n_experts=4, top_k=2,
                  exit_layers="1,2", controller="on")
    return HMSTModel(HMSTConfig(**{**values, **overrides})).eval()


PROMPT = list(range(5, 12))


# ============================================================================== episodes


def test_full_decisions_equal_the_plain_model():
    model = build()
    plain = build(controller="none")
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("controller.")})
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        answer, episode = model.run_episode(PROMPT, 6, GREEDY, [], mode="full")
        assert answer == plain.generate(ids, 6)[0]
        _, state = plain.decode_step(ids, None)
        for k, token in enumerate(answer[:-1]):  # every step's log-probs, not just the argmax
            ref, state = plain.decode_step(torch.tensor([[token]]), state)
            assert torch.equal(episode.trace[k + 1][1], ref)
    assert episode.choices == [] and episode.latency == [1.0] * (len(answer) - 1)


def test_decisions_come_from_the_producing_pass_and_change_the_computation():
    model = build()
    costs = model.costs()  # measured once, before the episode
    calls = []
    original = model._decode_step
    model._decode_step = lambda *a, **k: calls.append(a[0].shape[1]) or original(*a, **k)
    with torch.no_grad():
        answer, episode = model.run_episode(PROMPT, 6, GREEDY, [], generator=torch.Generator().manual_seed(3),
                                            mode="sample")
    # one base call per decoding step (the prefill, then a token each): no second pass
    assert calls == [len(PROMPT)] + [1] * (len(answer) - 1) and len(episode.choices) == len(answer) - 1
    for k, choice in enumerate(episode.choices):  # each decision read the state the previous call left
        assert torch.equal(episode.inputs[k], episode.trace[k][0].reshape(-1).float())
    # the gates chosen are the gates run: replay each step under its gates
    model._decode_step = original
    seen = set()
    with torch.no_grad():
        _, state = model.decode_step(torch.tensor([PROMPT]), None)
        for k, choice in enumerate(episode.choices):
            gates = policy.to_gates(model.config, choice)
            lp, state = model._decode_step(torch.tensor([[answer[k]]]), {**state, "gates": gates})
            assert torch.equal(lp, episode.trace[k + 1][1])
            seen.add(costs.key(choice))
    assert len(seen) > 1  # the sampled policy tried several settings


def test_the_cost_table_is_measured_per_gate():
    model = build()
    costs = model.costs()
    assert costs.gates == ("exit", "experts")
    full = costs.step[(2, 1)]
    assert costs.latency(policy.full_choice(model.config), consulted=False) == 1.0
    assert costs.step[(0, 1)] < costs.step[(1, 1)] < full and costs.step[(2, 0)] < full
    assert costs.compute[(2, 0)] < costs.compute[(2, 1)] and costs.controller > 0
    mem = build(memory=True, memory_chunk=4, exit_layers="")
    table = mem.costs()
    assert table.gates == ("experts", "episodic", "semantic")
    assert len({table.step[k] for k in table.step}) == len(table.step)  # every combination costs differently
    # measured under an outer counter too (the stage charges it)
    mem._costs = None
    _, outer = count_flops(mem.costs)
    assert outer > 0


def test_rewards_sum_to_the_seeds_formula():
    model = build(critic=True)
    episode = policy.Episode(model, "greedy")
    episode.choices = [{"exit": 0}, {"exit": 1}, {"verify": 1}]
    episode.masks = [("exit", "experts"), ("exit", "experts"), ("verify",)]
    episode.latency, episode.compute = [0.5, 0.7], [0.2, 0.4]
    episode.verified, episode.critic_score = True, 0.25
    w = {"accuracy": 1.0, "latency": 0.3, "compute": 0.2, "calibration": 0.5}
    r = policy.rewards(episode, True, w)
    assert r[0] == pytest.approx(-(0.3 * 0.5 + 0.2 * 0.2) / 2) and r[1] == pytest.approx(-(0.3 * 0.7 + 0.2 * 0.4) / 2)
    calibration = 1 - (0.75 - 1) ** 2
    assert sum(r) == pytest.approx(1.0 - 0.3 * 0.6 - 0.2 * 0.3 + 0.5 * calibration)
    assert policy.calibration(False, None, False) == 0.0 and policy.calibration(False, None, True) == 1.0
    episode.abstained = True  # a right answer withheld scores no accuracy
    assert sum(policy.rewards(episode, True, w)) == pytest.approx(-0.3 * 0.6 - 0.2 * 0.3 + 0.5 * calibration)


# ============================================================================== end to end

CORPUS = "synthetic-facts:entities=60,repeat=10,qa=0.9"
STAGE1 = ("--arch", "hmst", "--size", "micro", "--seq-len", "64", "--lr", "3e-3", "--corpus", CORPUS,
          "--budget", "2e11", "--eval-every", "1000", "--set", "exit_layers=1", "--set", "early_exit_loss=1")
CRITIC = ("--stage", "critic", "--budget", "3e10", "--set", "critic_epochs=10")
STAGE3 = ("--stage", "3", "--budget", "4e9", "--set", "ppo_episodes=8")


def _env(home) -> dict:
    return {"HMST_BENCH_HOME": str(home)}


def _info(run) -> dict:
    return json.loads((run / "run.json").read_text())


def _metrics(run, kind):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == kind]


@pytest.fixture(scope="module")
def runs(bench_home, tmp_path_factory):
    """Stage 1 and the critic in C (kept pristine), then stage 3 in a copy, A."""
    root = tmp_path_factory.mktemp("stage3")
    c, a = root / "C", root / "A"
    run_cli("train", *STAGE1, "--out", str(c), env=_env(bench_home))
    run_cli("train", *CRITIC, "--out", str(c), env=_env(bench_home))
    shutil.copytree(c, a)
    run_cli("train", *STAGE3, "--out", str(a), env=_env(bench_home))
    return SimpleNamespace(c=c, a=a, info=_info(a))


def test_stage3_records_its_work_and_keeps_base_and_critic(runs):
    info = runs.info
    assert info["status"] == "complete" and info["stage"] == "3" and info["config"]["controller"] == "on"
    assert info["stages"]["critic"]["achieved_flops"] == _info(runs.c)["achieved_flops"]
    after, before = load_file(runs.a / "model.safetensors"), load_file(runs.c / "model.safetensors")
    assert {k for k in after if not k.startswith("controller.")} == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # base and critic frozen
    updates = _metrics(runs.a, "ppo")
    costs = _metrics(runs.a, "ppo_costs")
    assert len(updates) == info["steps"] > 1 and len(costs) == 1
    # everything charged: the cost table, then each rollout and update; nothing past the budget
    assert info["achieved_flops"] == pytest.approx(costs[0]["flops"] + sum(u["update_flops"] for u in updates))
    assert info["achieved_flops"] <= 4e9
    for u in updates:
        assert {"reward", "term_accuracy", "term_latency", "term_compute", "term_calibration", "v_loss", "clip_frac",
                "approx_kl", "entropy", "verify_rate"} <= set(u)
        assert any(k.startswith("rate_exit_") for k in u) and any(k.startswith("rate_experts_") for k in u)
    assert (runs.a / "controller_costs.json").exists()


def test_interrupted_stage3_resumes_exactly(runs, bench_home, tmp_path):
    from hmst_bench.train.loop import TrainSettings, train

    out = tmp_path / "B"
    shutil.copytree(runs.c, out)

    def stop_at(step):
        def check(ctx):
            if ctx.step == step:
                os.kill(os.getpid(), signal.SIGINT)  # the trainer turns it into a clean stop
        return check

    cut = train(TrainSettings(out=out, stage="3", budget="4e9", overrides={"ppo_episodes": 8}), progress=stop_at(2))
    assert cut["status"] == "interrupted" and cut["steps"] == 2
    resumed = json.loads(run_cli("train", "--resume", "--out", str(out), "--json", env=_env(bench_home)).stdout)
    assert resumed["status"] == "complete"
    for key in ("steps", "tokens", "achieved_flops", "final_train_loss"):
        assert resumed[key] == runs.info[key], key
    assert (out / "model.safetensors").read_bytes() == (runs.a / "model.safetensors").read_bytes()


def test_eval_records_gate_rates_and_flops_per_token(runs, bench_home, tmp_path):
    run_cli("eval", "--run", str(runs.a), "--suite", "factqa", "--limit", "8", "--out", str(tmp_path / "ev"),
            env=_env(bench_home))
    decoding = json.loads((tmp_path / "ev" / "factqa.json").read_text())["provenance"]["decoding"]
    assert decoding["controller"] == "on" and decoding["answers"] == 8 * 6  # greedy and 5 samples per question
    assert decoding["verify_decisions"] == 8  # only greedy answers are verified
    assert set(decoding["gate_rates"]) >= {"exit", "experts"}
    for rates in decoding["gate_rates"].values():
        assert sum(rates.values()) == pytest.approx(1.0)
    assert 0 < decoding["flops_per_generated_token"] and decoding["full_flops_per_generated_token"] > 0
    # the base alone (stage critic's run) records no decoding policy
    run_cli("eval", "--run", str(runs.c), "--suite", "factqa", "--limit", "8", "--out", str(tmp_path / "base"),
            env=_env(bench_home))
    assert "decoding" not in json.loads((tmp_path / "base" / "factqa.json").read_text())["provenance"]


def test_refusals_are_one_line(runs, bench_home, tmp_path):
    env = _env(bench_home)
    plain = tmp_path / "plain"  # no answered questions and no memory: nothing to learn from
    run_cli("train", "--arch", "hmst", "--size", "micro", "--seq-len", "64", "--corpus", "synthetic-facts",
            "--budget", "1e10", "--out", str(plain), env=env)
    before = {p: p.read_bytes() for p in plain.rglob("*") if p.is_file()}
    assert "needs training queries" in one_line_error(run_cli("train", "--stage", "3", "--out", str(plain), "--budget",
                                                         "1e10", env=env, check=False))
    assert {p: p.read_bytes() for p in plain.rglob("*") if p.is_file()} == before
    copy = tmp_path / "off"
    shutil.copytree(runs.c, copy)
    assert "without --set controller" in one_line_error(run_cli("train", "--stage", "3", "--out", str(copy), "--budget",
                                                           "1e10", "--set", "controller=off", env=env, check=False))
