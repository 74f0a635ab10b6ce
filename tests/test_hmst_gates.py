"""The gates of HMST's decoding step (`model.Gates`), which the meta-controller (issue 18) will
set per generated token: the exit block, the experts per MoE layer, and the episodic and semantic
memory reads. With every gate at "full" a step equals the plain model's exactly; each gate changes
the FLOPs a step spends, as torch's FLOP counter measures them (FAISS searches, which it cannot
see, come on top for the semantic gate)."""

from __future__ import annotations

import pytest
import torch

from hmst_bench.budget import count_flops
from hmst_bench_hmst.model import FULL, Gates, HMSTModel
from hmst_bench_hmst.plugin import HMSTConfig

V = 61


def build(**overrides) -> HMSTModel:
    torch.manual_seed(0)
    values = dict(vocab_size=V, max_seq_len=16, d_model=32, n_layers=4, n_heads=4, n_experts=4, top_k=2)
    return HMSTModel(HMSTConfig(**{**values, **overrides})).eval()


def _prompt(length: int) -> torch.Tensor:
    return torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(1))


def _step(model, prompt, gates, token=7):
    """(log-probs, FLOPs) of one decoding step after the prompt, under `gates`."""
    with torch.no_grad():
        _, state = model.decode_step(prompt, None)
        state = {**state, "gates": gates}
        return count_flops(lambda: model.decode_step(torch.full((prompt.shape[0], 1), token), state)[0])


@pytest.mark.parametrize("memory", [False, True])
def test_full_gates_are_the_plain_model(memory):
    model = build(memory=memory, memory_chunk=4) if memory else build(exit_layers="1,2")
    prompt = _prompt(40 if memory else 9)
    plain, plain_flops = _step(model, prompt, FULL)
    # the same decisions spelled out take the gated path and must not change a bit
    spelled = Gates(exit=None, top_k=2, episodic=True, semantic=True)
    gated, gated_flops = _step(model, prompt, spelled)
    assert torch.equal(gated, plain) and gated_flops == plain_flops


def test_each_gate_changes_the_flops_of_a_step():
    model = build(exit_layers="1,2")
    prompt = _prompt(9)
    _, full = _step(model, prompt, FULL)
    _, one_expert = _step(model, prompt, Gates(top_k=1))
    _, exit1 = _step(model, prompt, Gates(exit=1))
    _, exit2 = _step(model, prompt, Gates(exit=2))
    assert one_expert < full and exit1 < exit2 < full
    mem = build(memory=True, memory_chunk=4)
    long = _prompt(40)  # two windows written to memory before the third is read
    _, both = _step(mem, long, FULL)
    _, no_episodic = _step(mem, long, Gates(episodic=False))
    _, no_semantic = _step(mem, long, Gates(semantic=False))
    _, none = _step(mem, long, Gates(episodic=False, semantic=False))
    assert none < no_episodic < both and none < no_semantic < both


def test_an_exit_gate_the_model_does_not_have_is_refused():
    with pytest.raises(ValueError, match="not one of the model's exits"):
        _step(build(exit_layers="2"), _prompt(5), Gates(exit=1))
    with pytest.raises(ValueError, match="without memory"):
        _step(build(memory=True, memory_chunk=4), _prompt(5), Gates(exit=1))


@pytest.mark.parametrize("memory", [False, True])
def test_a_step_leaves_the_hidden_state_its_logits_came_from(memory):
    """What the meta-controller reads: the decoding pass's own final hidden state, no second pass."""
    model = build(memory=memory, memory_chunk=4) if memory else build(exit_layers="2")
    prompt = _prompt(20 if memory else 9)
    with torch.no_grad():
        logprobs, state = model.decode_step(prompt, None)
        last = state["last_hidden"]
        torch.testing.assert_close(torch.log_softmax(model.project(last).float(), -1), logprobs, rtol=1e-5, atol=1e-5)
        if not memory:  # an exited step: the exit's normed state
            out, exited = model.decode_step(torch.full((2, 1), 3), {**state, "gates": Gates(exit=2)})
            assert exited["exited_at"][-1] == 2
            torch.testing.assert_close(torch.log_softmax(model.project(exited["last_hidden"]).float(), -1), out,
                                       rtol=1e-5, atol=1e-5)
