"""HMST's early exit (CALM, LayerSkip): exits after chosen blocks reading the final norm and LM
head, the early-exit training loss, and cached decoding under the softmax-margin rule.

- with the rule off (exit_margin 0, or a margin no token reaches) decoding equals the full model
  token for token and log-prob for log-prob;
- with a rule every token meets, each decoded token's log-probs are exactly the exit head over the
  first e blocks run on the whole text without a cache: the blocks below an exit never see a
  propagated state, so this is the exact reference; the skipped blocks' caches hold keys and
  values computed from the exited state (CALM);
- the loss: LM loss + weight x sum_e (e / L) CE_e / sum_e (e / L), by hand;
- bad exits are one line.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from hmst_bench import ConfigError
from hmst_bench.modeling import rope_at
from hmst_bench_hmst.model import HMSTModel
from hmst_bench_hmst.plugin import HMSTConfig

V = 61
BASE = dict(vocab_size=V, max_seq_len=32, d_model=32, n_layers=4, n_heads=4, n_experts=4, top_k=2)


def build(**overrides) -> HMSTModel:
    torch.manual_seed(0)
    return HMSTModel(HMSTConfig(**{**BASE, **overrides})).eval()


def decode(model, prompt: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, dict]:
    """The log-probs after the prompt and after each of `tokens` fed one by one, and the state."""
    logprobs, state = model.decode_step(prompt, None)
    out = [logprobs]
    for t in tokens:
        logprobs, state = model.decode_step(torch.tensor([[t]] * prompt.shape[0]), state)
        out.append(logprobs)
    return torch.stack(out, dim=1), state


def test_rule_off_equals_the_full_model_token_for_token():
    full, exits = build(), build(exit_layers="1,2,3")
    prompt = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    assert full.generate(prompt, 12) == exits.generate(prompt, 12)
    tokens = full.generate(prompt[:1], 10)[0]
    reference, _ = decode(full, prompt[:1], tokens)
    for margin in (0.0, 1.0):  # off, and a margin no softmax over 61 tokens reaches here
        exits.config.exit_margin = margin
        got, state = decode(exits, prompt[:1], tokens)
        assert torch.equal(got, reference)
        assert state["exited_at"] == [4] * len(tokens)  # every step ran all four blocks


def _truncated_logprobs(model, ids: torch.Tensor, blocks: int) -> torch.Tensor:
    cos, sin = rope_at(model.rope_cos, model.rope_sin, 0, ids.shape[1])
    h = model.embed(ids)
    for layer in model.layers[:blocks]:
        h, _ = layer(h, cos, sin)
    return torch.log_softmax(model.exit_logits(h).float(), dim=-1)


@pytest.mark.parametrize("first_exit", [1, 2])
def test_an_exited_token_is_the_exit_head_over_the_blocks_below(first_exit):
    model = build(exit_layers=f"{first_exit},3", exit_margin=1e-9)  # every token exits at the first exit
    prompt = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(2))
    tokens = [int(t) for t in torch.randint(0, V, (9,), generator=torch.Generator().manual_seed(3))]
    got, state = decode(model, prompt, tokens)
    assert state["exited_at"] == [first_exit] * len(tokens)
    with torch.no_grad():
        ref = _truncated_logprobs(model, torch.cat([prompt, torch.tensor([tokens])], dim=1), first_exit)
    # step k (k >= 1) fed tokens[k - 1], at column 6 + k - 1; the prefill ran all blocks
    torch.testing.assert_close(got[0, 1:], ref[0, 6:], rtol=1e-5, atol=1e-5)
    # the skipped blocks' caches grew by one state per token, computed from the exited one
    caches = state["caches"]
    assert all(c["k"].shape[2] == 6 + len(tokens) for c in caches)
    last = model.layers[first_exit].attn
    with torch.no_grad():
        ids = torch.cat([prompt, torch.tensor([tokens])], dim=1)
        cos, sin = rope_at(model.rope_cos, model.rope_sin, 0, ids.shape[1])
        h = model.embed(ids)
        for layer in model.layers[:first_exit]:
            h, _ = layer(h, cos, sin)
        x = model.layers[first_exit].attn_norm(h[:, -1:])
        cache = {}
        last.append_kv(x, cos[-1:], sin[-1:], cache)
    torch.testing.assert_close(caches[first_exit]["v"][:, :, -1:], cache["v"], rtol=1e-5, atol=1e-5)


def test_a_batch_exits_only_when_every_row_is_confident():
    model = build(exit_layers="2", exit_margin=0.0)
    prompt = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(4))
    _, state = model.decode_step(prompt, None)
    with torch.no_grad():
        h = model.embed(prompt)
    # margins of the three rows at exit 2 for their next token decide together: require the
    # smallest one, then a hair more, and the step runs all blocks
    token = torch.tensor([[1], [2], [3]])
    probe = _truncated_logprobs(model, torch.cat([prompt, token], dim=1), 2)[:, -1].exp()
    top = probe.topk(2, dim=-1).values
    margins = top[:, 0] - top[:, 1]
    del h
    for margin, depth in ((float(margins.min().detach()) * 0.999, 2), (float(margins.min().detach()) * 1.001, 4)):
        model.config.exit_margin = margin
        _, after = model.decode_step(token, {**state, "caches": [dict(c) for c in state["caches"]]})
        assert after["exited_at"][-1] == depth


def test_early_exit_loss_by_hand():
    model = build(exit_layers="1,3", early_exit_loss=0.5)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    labels = ids.roll(-1, dims=1)
    loss, aux = model.loss({"input_ids": ids, "labels": labels})
    with torch.no_grad():
        ce = {e: F.cross_entropy(_truncated_logprobs(model, ids, e).flatten(0, 1), labels.flatten()) for e in (1, 3)}
    expected = aux["lm_loss"] + model.config.balance_coef * aux["balance_loss"] + model.config.z_loss_coef * aux["z_loss"]
    expected = expected + 0.5 * (1 / 4 * ce[1] + 3 / 4 * ce[3]) / (1 / 4 + 3 / 4)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux["exit1_loss"], ce[1], rtol=1e-5, atol=1e-5)
    plain = build()  # same weights, no exits: the loss is unchanged when the exits' weight is 0
    off = build(exit_layers="1,3")
    assert torch.equal(plain.loss({"input_ids": ids, "labels": labels})[0], off.loss({"input_ids": ids, "labels": labels})[0])


@pytest.mark.parametrize("bad, match", [
    (dict(exit_layers="4"), "not a block to exit after; choose among 1..3"),
    (dict(exit_layers="0"), "not a block to exit after"),
    (dict(exit_layers="one"), "comma-separated"),
    (dict(exit_layers="1", exit_margin=1.5), "exit_margin"),
    (dict(early_exit_loss=0.3), "need exits"),
    (dict(exit_layers="1", memory=True, max_seq_len=32, memory_chunk=8), "without memory"),
])
def test_bad_exits_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        HMSTConfig(**{**BASE, **bad})


def test_cli_refuses_an_unknown_exit_layer_in_one_line(tmp_path):
    proc = run_cli("train", "--arch", "hmst", "--size", "micro", "--set", "exit_layers=7", "--budget", "1e10",
                   "--out", str(tmp_path / "r"), check=False)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "exit_layers: 7" in lines[0], proc.stderr
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
