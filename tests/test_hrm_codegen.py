"""The hrm-codegen architecture (issue 6, items 1, 2, 4 and the model side of 6): config
validation, stablemax by hand, the one-step gradient (only the last L and H calls build a graph,
gradients equal a manual construction, saved-activation bytes independent of the cycles, growing
with full_bptt), causality after all cycles and segments, the per-call KV cache on a multi-segment config,
measured FLOPs counting the no-grad cycles, and a CLI run scored by the lm-eval adapter (the
contract itself is tests/test_contract.py's)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from conftest import row_generators, run_cli, store_home
from hmst_bench import ConfigError
from hmst_bench_hrm_codegen.model import HRMCodeGen, log_stablemax
from hmst_bench_hrm_codegen.plugin import HRM_CODEGEN, HRMCodeGenConfig

V = 97


def build(seed=0, **overrides) -> HRMCodeGen:
    """A small model; one segment unless asked (the segment tests ask)."""
    values = dict(vocab_size=V, max_seq_len=32, d_model=32, n_heads=4, h_layers=1, l_layers=1, segments=1)
    values.update(overrides)
    torch.manual_seed(seed)
    return HRMCodeGen(HRMCodeGenConfig(**values)).eval()


def rand_ids(b, t, seed):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def batch_of(ids):
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


# ============================================================================== config


def test_sizes_match_dense_llama_shapes():
    from hmst_bench.arch import DENSE_SHAPES as DENSE

    for size, preset in HRM_CODEGEN.sizes.items():
        cfg = HRM_CODEGEN.make_config(size)
        dense = DENSE[size]
        assert cfg.h_layers + cfg.l_layers == dense["n_layers"] and cfg.h_layers == cfg.l_layers
        assert (cfg.d_model, cfg.n_heads, cfg.vocab_size, cfg.max_seq_len) == (
            dense["d_model"], dense["n_heads"], dense["vocab_size"], dense["max_seq_len"])
        assert cfg.context == cfg.max_seq_len


@pytest.mark.parametrize("bad, match", [
    (dict(loss="sparsemax"), "loss must be one of"),
    (dict(d_model=30, n_heads=4), "divisible"),
    (dict(h_cycles=0), "h_cycles"),
    (dict(window=300), "window"),
    (dict(full_bptt="yes"), "full_bptt"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        HRM_CODEGEN.make_config("micro", bad)


# ============================================================================== stablemax


def test_stablemax_by_hand():
    # s(0)=1, s(1)=2, s(-1)=1/2, s(3)=4, s(-3)=1/4: sum 7.75
    x = torch.tensor([[0.0, 1.0, -1.0, 3.0, -3.0]])
    want = torch.tensor([[1.0, 2.0, 0.5, 4.0, 0.25]], dtype=torch.float64) / 7.75
    assert torch.allclose(log_stablemax(x).exp(), want, rtol=0, atol=1e-15)
    assert log_stablemax(x).dtype == torch.float64


def test_stablemax_loss_by_hand():
    model = build(loss="stablemax")
    ids = rand_ids(1, 6, 0)
    raw = torch.tensor([[0.0, 1.0, -1.0]])  # one position, vocabulary of 3, by hand
    with torch.no_grad():
        model.raw_logits = lambda input_ids, keep=None: raw.expand(1, input_ids.shape[1], 3)  # type: ignore
        loss, _ = model.loss({"input_ids": ids[:, :2], "labels": torch.tensor([[1, -100]])})
        probs = model.next_token_logprobs(ids[:, :2]).exp()
    assert float(loss) == pytest.approx(-math.log(2 / 3.5), abs=1e-7)  # p = (1, 2, 0.5) / 3.5
    assert torch.allclose(probs, torch.tensor([[1 / 3.5, 2 / 3.5, 0.5 / 3.5]]), atol=1e-7)


def test_stablemax_model_scores_its_own_distribution():
    model = build(loss="stablemax")
    ids = rand_ids(2, 12, 1)
    with torch.no_grad():
        lp = model.token_logprobs(ids[:, :-1], ids[:, 1:])
        want = log_stablemax(model.raw_logits(ids[:, :-1])).gather(-1, ids[:, 1:, None]).squeeze(-1)
        loss, _ = model.loss(batch_of(ids))
    assert torch.allclose(lp.double(), want, atol=1e-6)
    assert float(loss) == pytest.approx(-float(want.mean()), abs=1e-6)


def test_softmax_loss_is_cross_entropy_and_tied_head_shares_the_embedding():
    model = build(tie_embeddings=True)
    assert model.lm_head is None
    ids = rand_ids(2, 12, 2)
    with torch.no_grad():
        loss, _ = model.loss(batch_of(ids))
        logits = model.hidden(ids[:, :-1]) @ model.embed.weight.T
    assert float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())), abs=1e-6)
    assert not any(n.endswith("init") for n, _ in model.named_parameters())  # the initial states are buffers
    assert {"H_init", "L_init"} <= set(model.state_dict())


# ============================================================================== one-step gradient


def call_log(model):
    """Record, per call of L and H, whether its output is part of the autograd graph."""
    log = []
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: log.append((name, out.requires_grad)))
             for name, m in (("L", model.L), ("H", model.H))]
    return log, hooks


@pytest.mark.parametrize("full_bptt", [False, True])
def test_only_the_last_l_and_h_calls_build_a_graph(full_bptt):
    model = build(h_cycles=3, l_cycles=2, full_bptt=full_bptt).train()
    log, hooks = call_log(model)
    model.loss(batch_of(rand_ids(2, 10, 3)))
    for h in hooks:
        h.remove()
    assert [n for n, _ in log] == ["L", "L", "H"] * 3
    graph = [g for _, g in log]
    assert graph == ([True] * 9 if full_bptt else [False] * 7 + [True, True])


def test_gradient_equals_a_manual_one_step_construction():
    model = build(h_cycles=2, l_cycles=3, seed=1).train().double()
    ids = rand_ids(2, 10, 4)
    batch = batch_of(ids)
    loss, _ = model.loss(batch)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    x_ids = batch["input_ids"]
    b, t = x_ids.shape
    cos, sin = model.rope_cos[:t].double(), model.rope_sin[:t].double()
    x = model.embed_scale * model.embed(x_ids)
    with torch.no_grad():  # 2 x 3 L calls and 2 H calls, minus the last of each
        zh, zl = model.H_init.expand(b, t, -1), model.L_init.expand(b, t, -1)
        for step in range(5):
            zl = model.L(zl, zh + x, cos, sin)
            if step == 2:
                zh = model.H(zh, zl, cos, sin)
    zl = model.L(zl.detach(), zh.detach() + x, cos, sin)
    zh = model.H(zh.detach(), zl, cos, sin)
    logits = model.lm_head(zh)
    manual = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    manual.backward()
    assert float(manual.detach()) == pytest.approx(float(loss.detach()), rel=1e-12)
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-10, atol=1e-12), n
    # and full BPTT's gradient differs (the early cycles contribute there)
    model.config = dataclasses.replace(model.config, full_bptt=True)
    model.zero_grad()
    model.loss(batch)[0].backward()
    assert not torch.allclose(got["L.layers.0.mlp.down.weight"], model.L.layers[0].mlp.down.weight.grad)


def saved_bytes(model, ids) -> int:
    """Bytes of every tensor autograd saves for backward during one training loss: exactly the
    activation memory the backward pass keeps alive (deterministic, unlike an allocator peak)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(batch_of(ids))
    return total


def test_activation_memory_does_not_grow_with_cycles_one_step_and_does_with_full_bptt():
    ids = rand_ids(2, 17, 5)
    one_step = {c: saved_bytes(build(h_cycles=c, l_cycles=c).train(), ids) for c in (1, 2, 8)}
    full = {c: saved_bytes(build(h_cycles=c, l_cycles=c, full_bptt=True).train(), ids) for c in (1, 2, 8)}
    assert one_step[1] == one_step[2] == one_step[8] > 0
    assert full[1] == one_step[1]  # one cycle: nothing to cut
    assert full[1] < full[2] < full[8]
    # full BPTT keeps one L call's or H call's activations per call: 1+1 calls at c=1, c*c + c at c
    per_call = (full[2] - full[1]) / (6 - 2)
    assert full[8] - full[1] == pytest.approx(per_call * (72 - 2), rel=0.02)


# ============================================================================== contract


@pytest.mark.parametrize("segments", [1, 3])
def test_causality_after_all_cycles_and_segments(segments):
    model = build(h_cycles=3, l_cycles=2, segments=segments, act=True)
    x = rand_ids(1, 24, 6)
    t = torch.roll(x, -1, 1)
    for j in (0, 7, 15, 23):
        y = x.clone()
        y[0, j] = (x[0, j] + 1) % V
        with torch.no_grad():
            a, b = model.token_logprobs(x, t), model.token_logprobs(y, t)
        assert torch.equal(a[:, :j], b[:, :j]), j
        assert not torch.equal(a[:, j:], b[:, j:]), j


def test_greedy_and_sampled_generation_recompute_over_the_window():
    model = build(max_seq_len=16, window=12)
    assert model.max_seq_len == 12
    prompt = rand_ids(2, 9, 8)
    with torch.no_grad():
        out = model.generate(prompt, 8)
        seq = prompt
        for _ in range(8):  # by hand: argmax of the full forward over the last 12 tokens
            nxt = model.next_token_logprobs(seq[:, -12:]).argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        assert out == seq[:, 9:].tolist()
        a = model.generate(prompt, 6, temperature=1.0, top_k=5, generators=row_generators(prompt, 3))
        b = model.generate(prompt, 6, temperature=1.0, top_k=5, generators=row_generators(prompt, 3))
    assert a == b and all(len(r) == 6 for r in a)


@pytest.mark.parametrize("loss", ["softmax", "stablemax"])
def test_kv_cache_per_module_call_is_exact(loss):
    """Each call of each segment caches its own keys and values: with two segments of two H and
    two L cycles, left-padded cached decoding gives the distribution a full recomputation gives
    (the conformance suite's check, on this recurrence's config; the suite itself runs the default)."""
    from hmst_bench.conformance import Subject, check_kv_cache

    model = build(max_seq_len=20, h_cycles=2, l_cycles=2, segments=2, loss=loss, seed=5)
    with torch.no_grad():
        finding = check_kv_cache(model, Subject(build=None, vocab=model.config.vocab_size, dtype=torch.float32), 1e-5)
    assert finding.ok, finding.line()


def test_measured_flops_count_the_no_grad_cycles():
    from hmst_bench.budget import count_flops

    ids = rand_ids(2, 17, 9)

    def step(model):
        return count_flops(lambda: model.loss(batch_of(ids))[0].backward())[1]

    f11, f22 = step(build(h_cycles=1, l_cycles=1).train()), step(build(h_cycles=2, l_cycles=2).train())
    f33 = step(build(h_cycles=3, l_cycles=3).train())
    model = build().train()
    x = torch.randn(2, 16, 32)
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]
    with torch.no_grad():
        call = count_flops(lambda: model.L(x, x, cos, sin))[1]  # one forward L (or H) call
    assert call > 0
    # (2,2) adds 3 forward-only L calls and 1 forward-only H call to (1,1); (3,3) adds 8 + 2
    assert f22 - f11 == 4 * call
    assert f33 - f11 == 10 * call
    full = step(build(h_cycles=2, l_cycles=2, full_bptt=True).train())
    assert full > f22


# ============================================================================== end to end

BUDGET = 5e9


@pytest.fixture(scope="module")
def hrm_run(bench_home, tmp_path_factory):
    out = tmp_path_factory.mktemp("hrm-codegen") / "run"
    run_cli("train", "--arch", "hrm-codegen", "--size", "micro", "--budget", str(BUDGET), "--corpus", "synthetic-facts",
            "--seq-len", "64", "--out", str(out), env={"HMST_BENCH_HOME": str(bench_home)})
    return out


def test_trains_through_the_cli(hrm_run):
    from hmst_bench.train.rundir import load_run

    info = json.loads((hrm_run / "run.json").read_text())
    assert info["arch"] == "hrm-codegen" and info["status"] == "complete"
    assert info["achieved_flops"] >= info["budget_flops"] == BUDGET
    assert math.isfinite(info["val_loss"])
    run = load_run(hrm_run)
    ids = torch.tensor([run.tokenizer.encode("The city of", add_special_tokens=False)])
    with torch.no_grad():
        out = run.model.generate(ids, 5)
        by_hand = run.model.next_token_logprobs(ids).argmax(-1)
    assert len(out[0]) == 5 and out[0][0] == int(by_hand)


def test_eval_through_the_cli(hrm_run, tmp_path):
    home = {"HMST_BENCH_HOME": str(store_home(tmp_path / "home", "truthfulqa"))}
    run_cli("eval", "--run", str(hrm_run), "--suite", "truthfulqa_mc1", "--limit", "2", env=home)
    record = json.loads((hrm_run / "eval" / "truthfulqa_mc1.json").read_text())
    assert 0.0 <= record["results"]["truthfulqa_mc1"]["acc,none"] <= 1.0
    assert record["provenance"]["limit"] == 2 and record["provenance"]["requests"]["total"] > 0


# ============================================================================== segments (inference)


def test_inference_runs_every_segment_from_the_carried_state():
    model = build(h_cycles=2, l_cycles=2, segments=3, seed=2).train()
    ids = rand_ids(2, 12, 11)
    log, hooks = call_log(model)
    loss, _ = model.loss(batch_of(ids))
    for h in hooks:
        h.remove()
    assert [n for n, _ in log] == ["L", "L", "H"] * 6  # 3 segments of 2 H cycles
    assert [g for _, g in log] == [False] * 16 + [True, True]  # detached carry: only the last calls
    # by hand: segment() three times, the state passed on
    x, cos, sin = model.inputs(ids[:, :-1])
    zh, zl = model.initial_state(x)
    with torch.no_grad():
        for _ in range(3):
            zh, zl = model.segment(x, zh, zl, cos, sin)
        assert torch.equal(model.hidden(ids[:, :-1]), zh)
        one = build(h_cycles=2, l_cycles=2, segments=1, seed=2)
        assert not torch.allclose(one.hidden(ids[:, :-1]), zh)  # the later segments change the result


def test_activation_memory_does_not_grow_with_segments():
    ids = rand_ids(2, 17, 13)
    assert saved_bytes(build(segments=1).train(), ids) == saved_bytes(build(segments=4).train(), ids)


def test_q_head_is_pooled_over_real_tokens_and_starts_at_continue():
    class Tok:
        pad_token_id = 0

    model = HRMCodeGen(HRMCodeGenConfig(vocab_size=V, max_seq_len=32, d_model=32, n_heads=4, h_layers=1, l_layers=1,
                                        segments=2), Tok())
    assert torch.equal(model.q_head.bias.data, torch.tensor([-5.0, -5.0]))  # halt == continue: no halting at first
    torch.nn.init.normal_(model.q_head.weight)
    z = torch.randn(2, 5, 32)
    ids = torch.tensor([[3, 4, 5, 0, 0], [3, 4, 5, 6, 7]])
    q = model.q_logits(z, ids)
    assert torch.allclose(q[0], model.q_head(z[0, :3].mean(0)), atol=1e-6)  # padding left out of the mean
    assert torch.allclose(q[1], model.q_head(z[1].mean(0)), atol=1e-6)
    assert build(segments=2, act=False).q_head is None and build(segments=1, act=True).q_head is None


# ============================================================================== deep supervision and ACT (the stage runner)

RUNNER = dict(size="micro", seq_len=16, batch_size=4, eval_every=1000, save_every=1000)


@pytest.fixture(scope="module")
def toy_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("hrm-corpus") / "corpus.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(300)))
    return path


def train_hrm(out, corpus, budget, progress=None, **overrides):
    from hmst_bench.train.loop import TrainSettings, train

    cfg = dict(h_cycles=1, l_cycles=2)
    cfg.update(overrides)
    return train(TrainSettings(arch="hrm-codegen", budget=str(budget), corpus=str(corpus), out=out, overrides=cfg,
                               **RUNNER), progress=progress)


def slot_log(seen):
    """A progress callback recording each step's carried slots (steps run, halted) per row."""

    def record(ctx):
        slots = ctx.extra_state["slots"][0]
        seen.append((slots["steps"].clone(), slots["halted"].clone()))

    return record


def force_q(bias):
    """A progress callback pinning the Q-head to constant (halt, continue) logits after each step."""

    def pin(ctx):
        with torch.no_grad():
            ctx.model.q_head.weight.zero_()
            ctx.model.q_head.bias.copy_(torch.tensor(bias))

    return pin


def both(*callbacks):
    return lambda ctx: [cb(ctx) for cb in callbacks]


def test_act_never_exceeds_its_maximum_segments(toy_corpus, tmp_path):
    seen = []
    # the Q-head always says "continue": every sequence must still halt at `segments`
    train_hrm(tmp_path / "a", toy_corpus, "500tok", both(force_q([-20.0, 20.0]), slot_log(seen)), segments=3)
    assert len(seen) >= 9
    for steps, halted in seen[1:]:  # step 1 ran with the initial (untied) Q-head
        assert int(steps.max()) <= 3
        assert torch.equal(halted, steps == 3)


@pytest.mark.parametrize("explore", [0.0, 1.0])
def test_act_halts_early_when_q_says_so_unless_exploring(toy_corpus, tmp_path, explore):
    seen = []
    train_hrm(tmp_path / "b", toy_corpus, "500tok", both(force_q([20.0, -20.0]), slot_log(seen)),
              segments=4, halt_exploration_prob=explore)
    lengths = [int(s) for steps, halted in seen[2:] for s, h in zip(steps, halted) if h]
    assert lengths and max(lengths) <= 4
    if explore == 0.0:
        assert set(lengths) == {1}  # halt > continue: every sequence stops after one segment
    else:  # every sequence drew a minimum of 2..4 segments and halts exactly there
        assert min(lengths) >= 2 and len(set(lengths)) > 1


def test_budget_charges_every_segment_and_the_act_target_pass(toy_corpus, tmp_path):
    from hmst_bench.budget import count_flops
    from hmst_bench.train.rundir import load_run

    off = train_hrm(tmp_path / "off", toy_corpus, "1e8", segments=2, act=False)
    on = train_hrm(tmp_path / "on", toy_corpus, "1e8", segments=2, act=True)
    one = train_hrm(tmp_path / "one", toy_corpus, "1e8", segments=1)
    assert off["flops_per_step"] == one["flops_per_step"]  # a step is one segment either way
    # ACT adds one forward segment without gradients (its target) and the Q-head: a linear layer
    # d -> 2 on B pooled rows, 4*B*d FLOPs forward, 8*B*d backward, 4*B*d for the target's Q
    model = load_run(tmp_path / "on").model
    b, t, d = RUNNER["batch_size"], RUNNER["seq_len"], model.config.d_model
    ids = torch.zeros(b, t, dtype=torch.long)
    x, cos, sin = model.inputs(ids)
    with torch.no_grad():
        segment = count_flops(lambda: model.segment(x, *model.initial_state(x), cos, sin))[1]
    assert on["flops_per_step"] - off["flops_per_step"] == segment + 16 * b * d
    # every step is charged; a sequence's tokens count once, when it halts after its segments
    budget = 6 * off["flops_per_step"]
    six = train_hrm(tmp_path / "six", toy_corpus, budget, segments=2, act=False)
    assert six["steps"] == 6 and six["achieved_flops"] == budget
    assert six["tokens"] == 3 * b * t and six["flops_per_token"] == 2 * off["flops_per_step"] / (b * t)


def test_interrupted_deep_supervision_resumes_exactly(toy_corpus, tmp_path):
    import os
    import signal

    from hmst_bench.train.loop import TrainSettings, train

    full = train_hrm(tmp_path / "A", toy_corpus, "600tok", segments=3, halt_exploration_prob=0.5)

    def interrupt_at_step_5(ctx):
        if ctx.step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler turns it into a clean stop

    cut = train_hrm(tmp_path / "B", toy_corpus, "600tok", interrupt_at_step_5, segments=3, halt_exploration_prob=0.5)
    assert cut["status"] == "interrupted" and cut["steps"] == 5
    resumed = train(TrainSettings(out=tmp_path / "B", resume=True))
    assert resumed["status"] == "complete"
    assert (resumed["steps"], resumed["tokens"]) == (full["steps"], full["tokens"])
    assert resumed["final_train_loss"] == full["final_train_loss"] and resumed["val_loss"] == full["val_loss"]


def test_peak_memory_is_the_same_at_2_and_8_cycles():
    """The resident set's rise during a training step, measured by the OS (see hmst_bench/memory_probe.py):
    one-step gradient equal at 2 and 8 H cycles; full BPTT visibly larger already at 2."""
    from hmst_bench.memory_probe import training_peak_bytes

    base = dict(vocab_size=1024, max_seq_len=256, d_model=256, n_heads=4, h_layers=1, l_layers=1, l_cycles=2, segments=1)
    two, eight = (training_peak_bytes("hrm-codegen", {**base, "h_cycles": c}, batch=4, seq_len=256) for c in (2, 8))
    bptt = training_peak_bytes("hrm-codegen", {**base, "h_cycles": 2, "full_bptt": True}, batch=4, seq_len=256)
    assert two > 16 * 2**20
    assert eight == pytest.approx(two, rel=0.05)
    assert bptt > 1.5 * two


@pytest.fixture(scope="module")
def mbpp_store(tmp_path_factory):
    return store_home(tmp_path_factory.mktemp("mbpp-home"), "mbpp")


def test_overfits_eight_mbpp_problems(mbpp_store, monkeypatch):
    """The fine-tuning objective (prompt tokens masked, as --corpus mbpp-train) on 8 MBPP-train
    problems: the micro model learns their solutions until the training loss is near zero."""
    from hmst_bench.data.examples import encode_examples
    from hmst_bench.data.tokenizer import train_tokenizer
    from hmst_bench.eval import store
    from hmst_bench.eval.code import mbpp_completion, mbpp_prompt

    monkeypatch.setenv("HMST_BENCH_HOME", str(mbpp_store))
    rows = store.rows("mbpp", "full", "train")[:8]
    pairs = [(mbpp_prompt(r), mbpp_completion(r)) for r in rows]
    tok = train_tokenizer([p + c for p, c in pairs], 1024)  # 833: every merge these texts allow
    data = encode_examples(pairs, pairs, tok)
    seq = 352  # the longest example is 321 tokens: none cropped
    data.check_seq_len(seq)
    assert data.describe()["examples"]["train"] == {**data.describe()["examples"]["train"], "cropped": 0, "skipped": 0}
    batch = data.batch(0, 0, 0, 0, 8, seq)
    live = batch["labels"] != -100
    assert int(live.sum()) > 8 * 20 and not bool(live[:, 0].any())  # completions only
    torch.manual_seed(0)
    model = HRMCodeGen(HRMCodeGenConfig(vocab_size=len(tok), max_seq_len=seq, d_model=64, n_heads=4, h_layers=1,
                                        l_layers=1, segments=1), tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(150):
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    last = float(loss.detach())
    assert first > 5.0 and last < 0.05, (first, last)  # from about ln(833) = 6.7 to near zero


def test_deep_supervision_on_two_processes_matches_one(toy_corpus, tmp_path):
    """torchrun with 2 CPU ranks x batch 4 against 1 process x batch 8: the same rows, the same
    exploration draws (drawn per global row), so the same halting, tokens and losses."""
    import os
    import subprocess
    import sys

    args = ["train", "--arch", "hrm-codegen", "--size", "micro", "--corpus", str(toy_corpus), "--seq-len", "16",
            "--budget", "1500tok", "--set", "h_cycles=1", "--set", "segments=3", "--set", "halt_exploration_prob=0.5",
            "--eval-every", "1000", "--json"]
    single = json.loads(run_cli(*args, "--batch-size", "8", "--out", str(tmp_path / "one")).stdout)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "hmst_bench.cli"]
    proc = subprocess.run([*torchrun, *args, "--batch-size", "4", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout)
    assert two["training"]["world_size"] == 2 and two["status"] == "complete"
    assert (two["steps"], two["tokens"]) == (single["steps"], single["tokens"])
    assert two["flops_per_step"] == pytest.approx(single["flops_per_step"], rel=1e-9)
    assert two["final_train_loss"] == pytest.approx(single["final_train_loss"], rel=1e-3)
