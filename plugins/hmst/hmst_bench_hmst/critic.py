"""HMST's critic: a small model of its own that scores how likely an answer is wrong, from what
the base model computed while reading the prompt and the answer.

Features of one (prompt, answer), all from one pass of the base over prompt + answer (`features`):

- the final hidden states of the positions that produced the answer's tokens (the prompt's last
  token, then every answer token but the last), mean-pooled. Under the causal mask each of them
  has read only the prompt and the answer so far; padding is never pooled. (Position 0, or the
  prompt's first token, would summarise nothing about the answer.)
- the answer tokens' log-probabilities: mean, minimum and first; the mean entropy of those
  next-token distributions; log(1 + answer length in tokens);
- with memory on: whether the semantic memory returned anything, and the mean and maximum over
  those positions of the best hit's similarity (the reader's scaled query-entry inner product,
  `DocMemory.hit_log`); zeros without memory, so the input width is the same either way.

One forward pass per query: while a model with a critic generates greedily (without memory),
its decoding calls leave their final hidden states and log-probabilities in a trace, from which
`from_trace` builds these features for every answer it produced; `hallucination_scores`, which
receives text from the evaluator, finds each answer's features by its token ids and reads the
answer again (`features`, one pass over prompt + answer) only for answers it did not generate in
this process (an answer from lm-eval's cache, a row that left the KV cache's window, a re-encoded
answer whose tokens differ, or a model with memory, whose hits the trace does not keep). The two
agree up to float rounding (tested); the model reports how many came from each.

`Critic`: LayerNorm -> Linear(d + 8, d / 2) -> GELU -> Dropout(0.1) -> Linear(d / 2, 1); its
sigmoid is P(the answer is wrong). Every width follows the base's d_model. Its `threshold`
buffer (saved with the weights) is the score above which verification withholds an answer,
chosen by the critic stage on its validation split (`choose_threshold`); NaN until then.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hmst_bench.generation import right_padded

N_SCALARS = 8  # log-prob mean, min, first; mean entropy; log(1 + length); has hits; hit sim mean, max


class Critic(nn.Module):
    def __init__(self, config):
        super().__init__()
        width = max(8, config.d_model // 2)
        self.net = nn.Sequential(nn.LayerNorm(config.d_model + N_SCALARS), nn.Linear(config.d_model + N_SCALARS, width),
                                 nn.GELU(), nn.Dropout(0.1), nn.Linear(width, 1))
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B] logits of P(wrong)."""
        return self.net(features).squeeze(-1)


@torch.no_grad()
def features(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, d + N_SCALARS] float32 critic inputs (see the module docstring) for token-id rows.
    A row longer than the model's context keeps its last `context_len` tokens (the prompt is cut
    on the left, as the evaluator cuts it)."""
    rows, spans = [], []
    for p, a in zip(prompts, answers):
        p, a = list(p), list(a)[: model.context_len - 1]
        p = p[-(model.context_len - len(a)):] if len(p) + len(a) > model.context_len else p
        if not p:
            raise ValueError("every prompt needs at least one token")
        rows.append(p + a)
        spans.append((len(p) - 1, max(1, len(a))))  # producing positions: len(p) - 1 .. + max(1, n) - 1
    ids = right_padded(rows, model.embed.weight.device)[0]
    hidden, logits, hits = _read(model, ids)
    out = []
    for b, ((start, n), row) in enumerate(zip(spans, rows)):
        at = slice(start, start + n)
        best = hits[b, at] if hits is not None else None
        out.append(_assemble(hidden[b, at], torch.log_softmax(logits[b, at].float(), dim=-1),
                             row[start + 1 : start + 1 + n], best))
    return torch.stack(out).float()


def from_trace(trace: list, row: int, answer: Sequence[int], d_model: int) -> Optional[torch.Tensor]:
    """The same features from the decoding pass itself: `trace` holds, per cached decoding call of
    a batch, (final hidden state [B, d] the call's log-probs came from, those log-probs [B, V]);
    the answer's producing positions are calls 0 .. n - 1 (the prefill, then each answer token
    fed but the last). None when the trace is too short (the decoding left its cache); a model
    with memory is not traced (the trace does not keep its semantic hits)."""
    n = max(1, len(answer))
    if len(trace) < n:
        return None
    hidden = torch.stack([trace[k][0][row] for k in range(n)])
    if hidden.shape[-1] != d_model:
        raise ValueError(f"trace width {hidden.shape[-1]} is not the model's {d_model}")
    return _assemble(hidden, torch.stack([trace[k][1][row] for k in range(n)]).float(), answer, None)


def _assemble(hidden: torch.Tensor, logp: torch.Tensor, answer: Sequence[int], best: Optional[torch.Tensor]) -> torch.Tensor:
    """One row of features from the producing positions' hidden states [n, d] and log-probs
    [n, V], the answer's tokens, and the best semantic-hit similarity per position (or None)."""
    pooled = hidden.float().mean(dim=0)
    entropy = float(-(logp.exp() * logp).sum(-1).mean())
    if len(answer):
        lp = logp[: len(answer)].gather(-1, torch.tensor(list(answer), device=logp.device)[:, None]).squeeze(-1)
        stats = [float(lp.mean()), float(lp.min()), float(lp[0])]
    else:  # an empty answer: the pass produced only the stop
        stats = [0.0, 0.0, 0.0]
    found = best is not None and bool(torch.isfinite(best).any())
    mem = [1.0, float(best[torch.isfinite(best)].mean()), float(best[torch.isfinite(best)].max())] if found else [0.0] * 3
    scalars = torch.tensor(stats + [entropy, math.log1p(len(answer))] + mem, device=pooled.device)
    return torch.cat([pooled, scalars])


def _read(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(hidden [B, T, d], logits [B, T, V], best semantic-hit similarity [B, T] or None) of one
    pass; with memory, the text is read in segments as everywhere else (`HMSTModel.segments`)."""
    if model.memory is None:
        h, logits, _ = model.forward_all(ids)
        return h, logits, None
    mem = model.new_memory(ids.shape[0])
    mem.hit_log = []
    hs, ls, best = [], [], []
    for _, h, logits, _ in model.segments(ids, mem=mem):
        hs.append(h)
        ls.append(logits)
        seg = mem.hit_log.pop() if mem.hit_log else None
        best.append(seg if seg is not None else torch.full(h.shape[:2], float("-inf"), device=h.device))
        mem.hit_log.clear()
    return torch.cat(hs, dim=1), torch.cat(ls, dim=1), torch.cat(best, dim=1)


def bce(model, x: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """The critic's training loss: binary cross-entropy of its logits against `wrong` (0/1)."""
    return F.binary_cross_entropy_with_logits(model.critic(x).float(), wrong.float())


def choose_threshold(scores: Sequence[float], wrong: Sequence[bool]) -> float:
    """The verification threshold for validation answers' critic `scores` (in (0, 1)): the value
    that maximises (correct answers kept) - (wrong answers kept), an answer being kept when its
    score is at most the threshold; among equally good thresholds, the highest (withhold least).
    Candidates: 0 (withhold everything), each score, and 1 (keep everything)."""
    pairs = sorted(zip(scores, wrong))
    candidates = [(0, 0.0), (sum(-1 if w else 1 for w in wrong), 1.0)]
    value = 0
    for i, (s, w) in enumerate(pairs):  # keep the answers scoring at most s
        value += -1 if w else 1
        if i + 1 == len(pairs) or pairs[i + 1][0] != s:  # equal scores are kept or withheld together
            candidates.append((value, float(s)))
    return max(candidates)[1]
