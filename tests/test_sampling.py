"""The shared sampler (`hmst_bench.generation`: `sampling_probs`, `sample_next`, `generate_rows`,
`LanguageModel.generate`): temperature, top-k and top-p on hand-computed distributions (top-k keeps
exactly the k largest, renormalised; top-k is applied before top-p; top_k=1 is greedy), seeded
sampling frequencies within binomial tolerance, agreement with transformers' own top-k/top-p
warpers, per-row generators (a row's sample does not depend on its batch mates) and stops."""

from __future__ import annotations

import math

import pytest
import torch

from hmst_bench.generation import Sampling, generate_rows, sample_next, sampling_probs
from hmst_bench.modeling import SoftmaxLM

N_DRAWS = 40_000  # one multinomial draw per row; binomial sd <= 0.5 / sqrt(N) = 0.0025


def frequencies(tokens: torch.Tensor, v: int) -> torch.Tensor:
    return torch.bincount(tokens.flatten(), minlength=v).double() / tokens.numel()


def assert_frequencies(tokens: torch.Tensor, want: torch.Tensor) -> None:
    """Every token's frequency within 5 binomial standard deviations (plus float slack) of its
    probability; a token of probability 0 is never drawn."""
    got = frequencies(tokens, len(want))
    want = want.double()
    sd = (want * (1 - want) / tokens.numel()).sqrt()
    assert (got[want == 0] == 0).all(), f"drew a token of probability 0: {got}"
    assert ((got - want).abs() <= 5 * sd + 1e-9).all(), f"{got} vs {want}"


# logits 2.0, 0.5, 1.5, -1.0, 1.0: the two largest are tokens 0 and 2, 0.5 apart
LOGITS = torch.tensor([2.0, 0.5, 1.5, -1.0, 1.0])
LOGPROBS = torch.log_softmax(LOGITS, -1)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_top_k_two_keeps_the_two_largest_renormalised(temperature):
    # renormalised over tokens 0 and 2: p0 = e^(2/T) / (e^(2/T) + e^(1.5/T)) = sigmoid(0.5 / T)
    p0 = 1 / (1 + math.exp(-0.5 / temperature))
    want = torch.tensor([p0, 0.0, 1 - p0, 0.0, 0.0])
    probs = sampling_probs(LOGPROBS[None], temperature, top_k=2)[0]
    assert torch.allclose(probs.double() / probs.sum(), want.double(), atol=1e-6)
    draws = sample_next(LOGPROBS.expand(N_DRAWS, -1), temperature, top_k=2, generator=torch.Generator().manual_seed(0))
    assert_frequencies(draws, want)


def test_top_k_zero_or_at_least_v_is_plain_temperature_sampling():
    want = torch.softmax(LOGITS / 0.7, -1)
    for k in (0, 5, 9):
        assert torch.allclose(sampling_probs(LOGPROBS[None], 0.7, top_k=k)[0], want, atol=1e-6)
    draws = sample_next(LOGPROBS.expand(N_DRAWS, -1), 0.7, generator=torch.Generator().manual_seed(1))
    assert_frequencies(draws, want)


def test_top_k_one_is_greedy():
    logprobs = torch.log_softmax(torch.randn(64, 50, generator=torch.Generator().manual_seed(2)) * 0.3, -1)
    greedy = sample_next(logprobs, 0.0)
    assert torch.equal(greedy, logprobs.argmax(-1))
    for temperature in (0.5, 1.0, 10.0):  # flat enough at T=10 that plain sampling strays
        got = sample_next(logprobs, temperature, top_k=1, generator=torch.Generator().manual_seed(3))
        assert torch.equal(got, greedy)
    plain = sample_next(logprobs, 10.0, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(plain, greedy)


def test_greedy_ignores_top_k_and_top_p():
    logprobs = torch.log_softmax(torch.randn(16, 30, generator=torch.Generator().manual_seed(4)), -1)
    for t in (0.0, -1.0):
        assert torch.equal(sample_next(logprobs, t, top_p=0.3, top_k=3), logprobs.argmax(-1))


def test_top_k_then_top_p_by_hand():
    # probabilities 0.30 0.25 0.20 0.15 0.06 0.04
    # top_k=3 -> 0.30 0.25 0.20, renormalised 0.4 0.3333 0.2667; top_p=0.7: mass before each
    # token 0, 0.4, 0.7333 -> tokens 0 and 1 stay -> 0.4/0.7333 = 6/11 and 5/11.
    # The other order (top-p first: mass before 0, .30, .55, .75 keeps 0, 1, 2) would keep three.
    p = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.06, 0.04])
    logprobs = p.log()
    want = torch.tensor([6 / 11, 5 / 11, 0, 0, 0, 0])
    probs = sampling_probs(logprobs[None], 1.0, top_p=0.7, top_k=3)[0]
    assert torch.allclose(probs.double() / probs.sum(), want.double(), atol=1e-6)
    only_p = sampling_probs(logprobs[None], 1.0, top_p=0.7)[0]
    assert (only_p > 0).tolist() == [True, True, True, False, False, False]
    draws = sample_next(logprobs.expand(N_DRAWS, -1), 1.0, top_p=0.7, top_k=3, generator=torch.Generator().manual_seed(5))
    assert_frequencies(draws, want)


def test_ties_with_the_kth_stay():
    logprobs = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]]))
    probs = sampling_probs(logprobs, 1.0, top_k=2)[0]
    assert torch.allclose(probs / probs.sum(), torch.tensor([0.5, 0.25, 0.25, 0, 0]), atol=1e-6)


def test_agrees_with_transformers_warpers():
    """The filtered distribution equals transformers' TopK -> TopP warpers applied to the scaled
    scores, row by row, on random distributions."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(6)
    logprobs = torch.log_softmax(torch.randn(200, 40, generator=g) * 2, -1)
    for temperature, top_k, top_p in [(1.0, 5, 1.0), (0.7, 10, 0.8), (1.3, 3, 0.5), (1.0, 0, 0.9), (0.5, 20, 0.95)]:
        scores = logprobs / temperature
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        want = torch.softmax(scores, -1)
        got = sampling_probs(logprobs, temperature, top_p=top_p, top_k=top_k)
        got = got / got.sum(-1, keepdim=True)
        assert torch.equal(got > 0, want > 0), (temperature, top_k, top_p)
        assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None])
def test_bad_top_k_is_refused(bad):
    with pytest.raises(ValueError, match="top_k must be a non-negative integer"):
        sample_next(LOGPROBS[None], 1.0, top_k=bad)
    with pytest.raises(ValueError, match="top_k must be a non-negative integer"):
        FixedLM(LOGITS).generate(torch.zeros(1, 1, dtype=torch.long), 2, top_k=bad)


# ----------------------------------------------------------------------------- SoftmaxLM


class FixedLM(SoftmaxLM):
    """Logits that ignore the input: the same distribution at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.max_seq_len = 16
        self.bias = torch.nn.Parameter(logits.clone())

    def logits(self, input_ids, keep=None):
        t = input_ids.shape[1] if keep is None else len(range(*keep.indices(input_ids.shape[1])))
        return self.bias.expand(input_ids.shape[0], t, -1)


def test_softmax_lm_generate_top_k():
    model = FixedLM(LOGITS)
    prompt = torch.zeros(N_DRAWS // 4, 1, dtype=torch.long)
    with torch.no_grad():
        rows = generate_rows(model, prompt.tolist(), 4, Sampling(temperature=0.5, top_k=2),
                             generators=[torch.Generator().manual_seed(i) for i in range(len(prompt))])
        greedy = model.generate(prompt[:2], 3)
        k1 = model.generate(prompt[:2], 3, temperature=5.0, top_k=1)
    p0 = 1 / (1 + math.exp(-1.0))  # sigmoid(0.5 / 0.5)
    assert_frequencies(torch.tensor(rows), torch.tensor([p0, 0.0, 1 - p0, 0.0, 0.0]))
    assert greedy == k1 == [[0, 0, 0], [0, 0, 0]]


def test_a_row_samples_the_same_alone_and_in_any_batch():
    model = FixedLM(LOGITS)
    seeds = [11, 12, 13, 14]
    prompts = [[0], [1, 2], [3, 4, 0], [2]]
    gens = lambda idx: [torch.Generator().manual_seed(seeds[i]) for i in idx]  # noqa: E731
    with torch.no_grad():
        together = generate_rows(model, prompts, 6, Sampling(temperature=1.0, top_p=0.9), generators=gens(range(4)))
        alone = [generate_rows(model, [prompts[i]], 6, Sampling(temperature=1.0, top_p=0.9), generators=gens([i]))[0]
                 for i in range(4)]
        reordered = generate_rows(model, prompts[::-1], 6, Sampling(temperature=1.0, top_p=0.9), generators=gens([3, 2, 1, 0]))
    assert together == alone == reordered[::-1]
    assert len(set(map(tuple, together))) > 1  # the rows did not all draw the same tokens


def test_stop_sequences_are_dropped_and_callable_stops_keep_their_tokens():
    model = FixedLM(torch.tensor([0.0, 5.0, 0.0, 0.0, 0.0]))  # greedy: always token 1
    stop_after = lambda n: (lambda tokens: len(tokens) >= n)  # noqa: E731 - fires, keeping every token
    with torch.no_grad():
        rows = generate_rows(model, [[0], [0, 2]], 5, stop=[(1, 1, 1), stop_after(2)])
        assert rows == [[1, 1], [1, 1]]
        assert generate_rows(model, [[0], [2, 2]], 5, stop=[(1, 1)]) == [[], []]
        assert generate_rows(model, [[0]], 4) == [[1, 1, 1, 1]]
