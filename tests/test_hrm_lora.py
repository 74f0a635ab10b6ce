"""hrm-lora and lora (plugins/hrm_lora): HRM recurrence as PEFT LoRA adapters on a frozen
pretrained causal LM, and the plain LoRA baseline.

The bases are real transformers models saved with `save_pretrained`, never downloaded: a
dense-llama and a dense-gpt2 run's RUN/hf (trained here for seconds) and a tiny random Gemma.

- LoRA is really applied: at initialisation (B = 0) one cycle equals the base exactly, for each
  family; after one optimiser step the outputs change; only adapter parameters get gradients;
- the recurrence is causal after all cycles, cached decoding (a cache per call) equals one pass,
  and the one-step gradient builds a graph only for the last low and high calls (`full_bptt` for all);
- through the CLI: `--init-from` a dense run with no other flag, training writes the adapters in
  PEFT's format (round trip through `PeftModel.from_pretrained`), never the base (its folder
  byte-identical), resumes exactly, and `eval` reads the run;
- bad input is one line: a base that is not a model, an unknown family, rank 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal

import pytest
import torch

from conftest import one_line_error, run_cli
from hmst_bench.data.tokenizer import load_tokenizer
from hmst_bench_hrm_lora import model as hrm_model
from hmst_bench_hrm_lora.model import HRMLoRA, load_base
from hmst_bench_hrm_lora.plugin import HRMLoRAConfig, LoRAConfig

TRAIN = ("--size", "micro", "--seq-len", "32", "--corpus", "synthetic-facts", "--save-every", "0")


@pytest.fixture(scope="module")
def bases(bench_home, tmp_path_factory):
    """{family: folder} of three tiny bases with the project's tokenizer beside the weights."""
    root = tmp_path_factory.mktemp("bases")
    env = {"HMST_BENCH_HOME": str(bench_home)}
    out = {}
    for arch, family in (("dense-llama", "llama"), ("dense-gpt2", "gpt2")):
        run_cli("train", "--arch", arch, *TRAIN, "--budget", "5e9", "--out", str(root / arch), env=env)
        out[family] = root / arch / "hf"
    from transformers import GemmaConfig, GemmaForCausalLM

    tok = load_tokenizer(out["llama"])
    torch.manual_seed(0)
    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    gemma.save_pretrained(root / "gemma")
    tok.save_pretrained(root / "gemma")
    out["gemma"] = root / "gemma"
    return out


def _build(folder, cls=HRMLoRAConfig, **kw) -> HRMLoRA:
    tok = load_tokenizer(folder)
    return HRMLoRA(cls(vocab_size=len(tok), max_seq_len=32, base=str(folder), **kw), tok)


def _ids(n=2, t=12, vocab=100, seed=0):
    return torch.randint(4, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_one_cycle_at_initialisation_is_the_base(bases, family):
    base = load_base(str(bases[family])).eval()
    ids = _ids()
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        for cls, kw in ((LoRAConfig, {}), (HRMLoRAConfig, {"h_cycles": 1, "l_cycles": 1})):
            assert torch.equal(_build(bases[family], cls, **kw).eval().logits(ids), ref)
        # two cycles read the recurrence: a different function of the same weights
        assert not torch.allclose(_build(bases[family]).eval().logits(ids), ref)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_is_applied_and_only_adapters_train(bases, family):
    model = _build(bases[family]).train()
    ids = _ids()
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    before = model.logits(ids).detach()
    loss, _ = model.loss(batch)
    loss.backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded and all("lora_" in n for n in graded)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in dict(model.named_parameters()) if "lora_" in n}
    assert any(".low." in n for n in graded) and any(".high." in n for n in graded)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    assert not torch.allclose(model.logits(ids).detach(), before)


def test_causal_after_all_cycles(bases):
    model = _build(bases["llama"], h_cycles=3, l_cycles=2).eval()
    ids = _ids(t=16)
    changed = ids.clone()
    changed[:, 10:] = 7
    with torch.no_grad():
        a, b = model.logits(ids), model.logits(changed)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.equal(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("full_bptt", [False, True])
def test_one_step_gradient_builds_a_graph_only_for_the_last_calls(bases, monkeypatch, full_bptt):
    model = _build(bases["llama"], h_cycles=3, l_cycles=2, full_bptt=full_bptt).train()
    log = []
    plain = hrm_model.run_blocks

    def logged(family, base, h, blocks, kwargs):
        out = plain(family, base, h, blocks, kwargs)
        log.append(("L" if blocks == model.low_blocks else "H", out.requires_grad))
        return out

    monkeypatch.setattr(hrm_model, "run_blocks", logged)
    ids = _ids()
    model.loss({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})[0].backward()
    assert [n for n, _ in log] == ["L", "L", "H"] * 3
    assert [g for _, g in log] == ([True] * 9 if full_bptt else [False] * 7 + [True, True])


@pytest.mark.parametrize("family, segments", [("llama", 1), ("gpt2", 1), ("gemma", 1), ("llama", 2)])
def test_cached_decoding_equals_the_whole_text(bases, family, segments):
    """Each call of the recurrence (of every segment) keeps its own cache: a prefill then one token
    at a time gives the log-probs of one pass over the whole text, at every position."""
    model = _build(bases[family], h_cycles=2, l_cycles=3, segments=segments).eval()
    ids = _ids(t=14)
    with torch.no_grad():
        whole = torch.log_softmax(model.logits(ids).float(), dim=-1)
        logprobs, state = model.decode_step(ids[:, :6], None)
        steps = [logprobs]
        for t in range(6, 14):
            logprobs, state = model.decode_step(ids[:, t : t + 1], state)
            steps.append(logprobs)
    torch.testing.assert_close(torch.stack(steps, dim=1), whole[:, 5:], atol=1e-5, rtol=1e-5)


def test_segments_chain_from_zero_with_the_state_detached(bases):
    """Inference with segments = 3 is three runner segments from carry_init, each from the state
    the previous one left (what deep supervision trains, one segment per step); the Q-head exists
    only with ACT and more than one segment, and says "continue" at first."""
    model = _build(bases["llama"], h_cycles=2, l_cycles=2, segments=3).eval()
    ids = _ids(t=10)
    with torch.no_grad():
        z_h, z_l = model.carry_init(ids)
        assert not z_h.any() and z_h.shape == (*ids.shape, model.base.config.hidden_size)
        for _ in range(3):
            z_h, z_l = model.run_segment(ids, z_h, z_l)
        torch.testing.assert_close(model.hidden(ids), z_h, atol=0, rtol=0)
        one = _build(bases["llama"], h_cycles=2, l_cycles=2, segments=1).eval()
        assert not torch.allclose(one.hidden(ids), z_h)  # the later segments change the result
        q = model.q_logits(z_h, ids)
    assert q.shape == (2, 2) and torch.equal(q, torch.full((2, 2), -5.0))
    assert _build(bases["llama"], segments=2, act=False).q_head is None and _build(bases["llama"]).q_head is None


def test_deep_supervision_trains_with_act_and_resumes_exactly(bases, bench_home, tmp_path):
    """`--set segments=2` trains through the shared deep-supervision runner (hrm-codegen's): ACT's
    Q losses and halting are logged, the Q-head is saved beside the adapters, and an interrupted
    run resumes to the same bytes (the carried slots are in the checkpoint)."""
    from hmst_bench.train.loop import TrainSettings, train

    dense = bases["llama"].parent
    env = {"HMST_BENCH_HOME": str(bench_home)}
    args = ("--set", "segments=2", "--set", "halt_exploration_prob=0.5", "--budget", "3e10")
    full = json.loads(run_cli("train", "--arch", "hrm-lora", "--init-from", str(dense), *args, "--save-every", "0",
                              "--out", str(tmp_path / "A"), "--json", env=env).stdout)
    assert full["status"] == "complete"
    rows = [json.loads(line) for line in (tmp_path / "A" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "q_loss" in r]
    assert steps and all(0 <= r["halted"] <= 1 for r in steps)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "A" / "model.safetensors")
    assert {"q_head.weight", "q_head.bias"} <= set(weights) and all("lora_" in k or "q_head" in k for k in weights)
    out = tmp_path / "B"

    def stop(ctx):
        if ctx.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    sets = {"segments": 2, "halt_exploration_prob": 0.5}
    cut = train(TrainSettings(arch="hrm-lora", init_from=dense, budget="3e10", save_every=1, out=out, overrides=sets),
                progress=stop)
    assert cut["status"] == "interrupted"
    resumed = json.loads(run_cli("train", "--resume", "--out", str(out), "--json", env=env).stdout)
    assert resumed["steps"] == full["steps"] and resumed["final_train_loss"] == full["final_train_loss"]
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "A" / "model.safetensors").read_bytes()


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_trains_resumes_and_saves_adapters_in_peft_format(bases, bench_home, tmp_path):
    from peft import PeftModel

    from hmst_bench.train.loop import TrainSettings, train

    base = bases["llama"]
    dense = base.parent  # the dense run whose RUN/hf is the base: --init-from needs no other flag
    before = _digest(base)
    env = {"HMST_BENCH_HOME": str(bench_home)}
    full = json.loads(run_cli("train", "--arch", "hrm-lora", "--init-from", str(dense), "--budget", "3e10", "--save-every",
                              "0", "--out", str(tmp_path / "A"), "--json", env=env).stdout)
    assert full["status"] == "complete" and full["steps"] > 4
    info = json.loads((tmp_path / "A" / "run.json").read_text())
    assert info["config"]["base"] == str(base.resolve()) and info["init_from"]["as_base"]
    assert info["corpus_spec"] == "synthetic-facts" and info["config"]["max_seq_len"] == 32  # the dense run's
    assert _digest(base) == before  # the base is only read
    # the adapters, in PEFT's format, load onto the base and hold the run's weights
    run = tmp_path / "A"
    peft = PeftModel.from_pretrained(load_base(str(base)), str(run / "adapters" / "low"), adapter_name="low")
    peft.load_adapter(str(run / "adapters" / "high"), adapter_name="high")
    from safetensors.torch import load_file

    weights = load_file(run / "model.safetensors")
    assert weights and all("lora_" in k for k in weights)  # the run stores adapters, not the base
    mine = peft.state_dict()
    for k, v in weights.items():
        assert torch.equal(mine[k[len("peft."):]], v), k
    # interrupted after 3 steps, then resumed: the same adapters to the byte
    out = tmp_path / "B"

    def stop(ctx):
        if ctx.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    cut = train(TrainSettings(arch="hrm-lora", init_from=dense, budget="3e10", save_every=1, out=out), progress=stop)
    assert cut["status"] == "interrupted"
    resumed = json.loads(run_cli("train", "--resume", "--out", str(out), "--json", env=env).stdout)
    assert resumed["steps"] == full["steps"] and resumed["final_train_loss"] == full["final_train_loss"]
    assert (out / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    # the evaluator reads the run (base from its config, adapters from the run)
    run_cli("eval", "--run", str(run), "--suite", "factqa", "--limit", "4", "--out", str(tmp_path / "ev"), env=env)
    assert (tmp_path / "ev" / "factqa.json").exists()


def test_bad_input_is_one_line(bases, bench_home, tmp_path):
    env = {"HMST_BENCH_HOME": str(bench_home)}
    common = ("--arch", "hrm-lora", *TRAIN, "--budget", "1e10", "--tokenizer", str(bases["llama"]))
    assert "not a transformers model folder" in one_line_error(
        run_cli("train", *common, "--set", f"base={tmp_path}", "--out", str(tmp_path / "a"), env=env, check=False))
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    tok = load_tokenizer(bases["llama"])
    GPTNeoForCausalLM(GPTNeoConfig(vocab_size=len(tok), hidden_size=16, num_layers=2, num_heads=2,
                                   attention_types=[[["global"], 2]], max_position_embeddings=32,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "neo")
    assert "known: llama" in one_line_error(
        run_cli("train", *common, "--set", f"base={tmp_path / 'neo'}", "--out", str(tmp_path / "b"), env=env, check=False))
    assert "low_rank" in one_line_error(
        run_cli("train", *common, "--set", f"base={bases['llama']}", "--set", "low_rank=0", "--out", str(tmp_path / "c"),
                env=env, check=False))
    for out in ("a", "b", "c"):
        assert not (tmp_path / out / "run.json").exists()
