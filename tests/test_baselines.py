"""What is the dense baselines' own (the contract itself is tests/test_contract.py's, for every
architecture): the loss, sampling and top-k through transformers' KV cache without deprecated
arguments, and saved copies that load in transformers and in lm-eval's HFLM with identical numbers."""

import dataclasses

import pytest
import torch

from conftest import no_deprecations, row_generators
from hmst_bench.data.corpora import load_corpus
from hmst_bench.data.tokenizer import save_tokenizer, train_tokenizer
from hmst_bench.plugins import get_registry
from hmst_bench.train.rundir import load_weights, save_weights

ARCHS = ["dense-llama", "dense-gpt2"]


@pytest.fixture(scope="module")
def tok():
    corpus = load_corpus("synthetic-facts")
    return train_tokenizer(corpus.split["train"], 512, cache_key=corpus.fingerprint)


def build(arch, tok, **overrides):
    spec = get_registry().arch(arch)
    cfg = dataclasses.replace(spec.make_config("micro", {"max_seq_len": 32, **overrides}), vocab_size=len(tok))
    torch.manual_seed(0)
    model = spec.build(cfg, tok).eval()
    with torch.no_grad():  # larger random weights make the distributions far from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def ids(*rows):
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_matches_token_logprobs(arch, tok):
    model = build(arch, tok)
    x = torch.randint(3, len(tok), (2, 16), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(x, -1, 1)
    labels[0, :5] = -100
    loss, aux = model.loss({"input_ids": x, "labels": labels})
    lp = model.token_logprobs(x, labels)
    assert torch.allclose(loss, -lp[labels != -100].mean(), atol=1e-5)
    assert aux == {}


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_uses_no_deprecated_transformers_api(arch, tok):
    """Cached generation hands transformers its KV cache under the current name (`cache`, not
    `past_key_values`, which warns on every call and goes in transformers 5.40): nothing is warned
    or logged, inside the window, across it and past it."""
    model = build(arch, tok)
    prompt = torch.randint(3, len(tok), (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), no_deprecations():
        out = model.generate(prompt, max_new_tokens=20)
    assert [len(row) for row in out] == [20, 20]


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_stop_and_top_p(arch, tok):
    model = build(arch, tok)
    prompt = ids([5, 6, 7, 8])
    with torch.no_grad():
        greedy = model.generate(prompt, 8)[0]
        a = model.generate(prompt, 8, temperature=1.0, generators=row_generators(prompt, 0))
        b = model.generate(prompt, 8, temperature=1.0, generators=row_generators(prompt, 0))
        tiny_p = model.generate(prompt, 8, temperature=1.0, top_p=1e-6, generators=row_generators(prompt, 5))
        stopped = model.generate(prompt, 8, stop=[greedy[2]])[0]
        stopped_seq = model.generate(prompt, 8, stop=[greedy[1:3]])[0]
    assert a == b
    assert tiny_p[0] == greedy  # nucleus of one token is greedy
    assert stopped == greedy[: greedy.index(greedy[2])]
    first = next(i for i in range(len(greedy)) if greedy[i : i + 2] == greedy[1:3])
    assert stopped_seq == greedy[:first]  # the stop sequence itself is removed


@pytest.mark.parametrize("arch", ARCHS)
def test_top_k_sampling(arch, tok):
    """top_k through the KV-cached generate: one step from one prompt over many rows draws only
    the two most likely tokens of the full softmax, in proportion to their renormalised
    probabilities; top_k=1 is greedy at any temperature; over several steps every token is in the
    top 3 of the cache-free distribution after its prefix."""
    import math

    model = build(arch, tok)
    prompt = ids([5, 6, 7, 8])
    rows = 4000
    with torch.no_grad():
        full = model.next_token_logprobs(prompt)[0].double()
        top = full.topk(2)
        drawn = torch.tensor(model.generate(prompt.expand(rows, -1), 1, temperature=0.8, top_k=2,
                                            generators=row_generators(prompt.expand(rows, -1), 3)))[:, 0]
        greedy = model.generate(prompt, 8)[0]
        k1 = model.generate(prompt, 8, temperature=5.0, top_k=1, generators=row_generators(prompt, 4))[0]
        k3 = model.generate(prompt, 8, temperature=5.0, top_k=3, generators=row_generators(prompt, 4))[0]
        seq, in_top3 = prompt, []
        for token in k3:
            in_top3.append(token in model.next_token_logprobs(seq)[0].topk(3).indices.tolist())
            seq = torch.cat([seq, torch.tensor([[token]])], 1)
    want = (top.values / 0.8).softmax(0)  # by hand: e^(lp_i/T) renormalised over the two
    assert torch.isin(drawn, top.indices).all()
    for token, p in zip(top.indices.tolist(), want.tolist()):
        assert abs(float((drawn == token).double().mean()) - p) <= 5 * math.sqrt(p * (1 - p) / rows)
    assert k1 == greedy and k3 != greedy and all(in_top3)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_and_hf_copy(arch, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build(arch, tok)
    save_weights(tmp_path, model, {"note": "test"})
    model.export(tmp_path)
    save_tokenizer(tok, tmp_path)
    again = build(arch, tok)
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    load_weights(again, tmp_path / "model.safetensors")
    x = torch.randint(3, len(tok), (2, 12), generator=torch.Generator().manual_seed(4))
    t = torch.roll(x, -1, 1)
    with torch.no_grad():
        assert torch.equal(model.token_logprobs(x, t), again.token_logprobs(x, t))
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert torch.allclose(hf(input_ids=x).logits, model.hf(input_ids=x).logits, atol=1e-6)


def test_lm_eval_hflm_scores_the_saved_copy_identically(tok, tmp_path):
    from lm_eval.models.huggingface import HFLM

    model = build("dense-llama", tok)
    model.export(tmp_path)
    lm = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=1, max_length=32)
    ctx = tok.encode("Githstin Datoth was born in", add_special_tokens=False)
    cont = tok.encode(" Vyndum in 1821.", add_special_tokens=False)
    (ll, _), = lm._loglikelihood_tokens([(("c", "x"), ctx, cont)], disable_tqdm=True)
    seq = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = model.token_logprobs(seq[:, :-1], seq[:, 1:])
    ours = float(lp[0, len(ctx) - 1 :].sum())
    assert ll == pytest.approx(ours, abs=1e-4)


def test_callable_stop_drops_what_it_asks(tok):
    model = build("dense-llama", tok)
    prompt = ids([5, 6, 7, 8])
    with torch.no_grad():
        greedy = model.generate(prompt, 8)[0]
        # stop once 3 tokens exist, dropping the last one (as a string-matching stop would)
        got = model.generate(prompt, 8, stop=[lambda toks: 1 if len(toks) == 3 else None])[0]
        kept = model.generate(prompt, 8, stop=[lambda toks: len(toks) == 2])[0]
    assert got == greedy[:2] and kept == greedy[:2]


