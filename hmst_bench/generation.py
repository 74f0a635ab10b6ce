"""Batched generation shared by every architecture: sampling, stop conditions and the decode loop.

`LanguageModel.generate` calls `generate_rows`, which decodes a batch of prompts of different
lengths together and stops each row on its own:

- a model that declares `kv_cache` is prefilled once with the prompts left-padded (`pad` tells it
  how many leading positions of each row are padding, to be masked and not counted as positions)
  and then fed one token per row per step through its `decode_step`; a model whose cache cannot
  take padding (`kv_cache_pads = False`: HMST with memory, whose segments are aligned from a
  row's first token) decodes each group of equal-length prompts as its own batch;
- once a row would outgrow `context_len` (its positions would have to shift), or for a model
  without a cache, every step re-reads each live row's last `context_len` tokens through
  `next_token_logprobs(ids, lengths)`: exact for any model, O(n^2) per row.

Tokens are picked by `sample_next` (greedy at temperature <= 0, else temperature, top-k then top-p
from the model's exact distribution). With `generators` (one `torch.Generator` per row) a row's
samples depend only on its own generator, never on its batch mates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch


def _check_top_k(top_k) -> int:
    """top_k as an int; ValueError unless it is a whole number >= 0 (0 turns top-k off)."""
    try:
        k = int(top_k)
    except (TypeError, ValueError):
        k = None
    if k is None or isinstance(top_k, bool) or k != top_k or k < 0:
        raise ValueError(f"top_k must be a non-negative integer (0: off), got {top_k!r}")
    return k


def sampling_probs(logprobs: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """[B, V] float32 probabilities that `sample_next` draws from when temperature > 0:
    softmax(logprobs / temperature), filtered as transformers' samplers do, in this order:

    - top_k > 0: only tokens whose scaled log-prob is at least the k-th largest stay (a token
      tied with the k-th stays too, so a tie may keep more than k); 0, or k >= V, keeps all;
    - top_p < 1: of what remains, renormalised, the smallest set of most likely tokens whose
      probability reaches top_p (the most likely token is always kept).

    The result need not sum to one (`torch.multinomial` normalises)."""
    top_k = _check_top_k(top_k)
    if temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature} (temperature <= 0 is greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    scaled = logprobs.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly before each token
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs


def sample_next(logprobs: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generators: Optional[Sequence[Optional[torch.Generator]]] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of `logprobs` [B, V]: argmax at temperature <= 0 (top_k and top_p then
    change nothing), else a draw from `sampling_probs`: row b from generators[b] when given,
    else all rows from `generator` (or the global RNG)."""
    if temperature <= 0:
        _check_top_k(top_k)
        return logprobs.argmax(dim=-1)
    probs = sampling_probs(logprobs, temperature, top_p, top_k)
    if generators is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generators)])


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: temperature <= 0 is greedy; top_k 0 and top_p 1 are off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        _check_top_k(self.top_k)
        if self.temperature > 0 and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def normalise_stop(stop: Optional[Iterable]) -> list:
    """Token ids and id sequences become tuples; callables are kept as they are."""
    out = []
    for s in stop or ():
        if callable(s):
            out.append(s)
            continue
        seq = (int(s),) if isinstance(s, int) or (torch.is_tensor(s) and s.ndim == 0) else tuple(int(t) for t in s)
        if seq:
            out.append(seq)
    return out


def stop_length(tokens: list[int], stops: list) -> int:
    """How many trailing tokens to drop because a stop condition just fired (-1: none fired).
    A callable stop gets the row's new tokens and returns None/False, True (keep them all) or
    the number of trailing tokens to drop, e.g. a string-matching stop from an evaluator."""
    for s in stops:
        if callable(s):
            hit = s(tokens)
            if hit is None or hit is False:
                continue
            return 0 if hit is True else int(hit)
        elif len(tokens) >= len(s) and tuple(tokens[-len(s):]) == s:
            return len(s)
    return -1


def prompts_of(input_ids: torch.Tensor, lengths: Optional[torch.Tensor]) -> list[list[int]]:
    """Each row's real tokens: all of it, or its first lengths[b] (rows right-padded)."""
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a non-empty [B, T] tensor")
    rows = input_ids.tolist()
    if lengths is None:
        return rows
    lengths = [int(n) for n in lengths]
    if len(lengths) != len(rows) or min(lengths) < 1 or max(lengths) > input_ids.shape[1]:
        raise ValueError(f"lengths must give 1..{input_ids.shape[1]} tokens for each of the {len(rows)} rows")
    return [row[:n] for row, n in zip(rows, lengths)]


def left_padded(rows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, max_len] ids with each row at the right end, [B] count of padding positions). The
    padding id is 0: a model masks those positions, so their value never matters."""
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
    pad = torch.tensor([width - len(r) for r in rows], dtype=torch.long)
    return ids.to(device), pad.to(device)


def right_padded(rows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, max_len] ids with each row at the left end, [B] lengths). The padding repeats the
    row's last token: positions past a row's length are never read, and a padding id there would
    make transformers warn that an attention mask is missing."""
    width = max(len(r) for r in rows)
    ids = torch.empty((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        ids[b, len(row):] = row[-1]
    return ids.to(device), torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)


class _Cache:
    """The KV-cached path of one `generate_rows` call: one state for the whole batch (finished
    rows keep being fed, so the batch never has to be rebuilt), abandoned for good once a live
    row would pass the window."""

    def __init__(self, model: Any, seqs: list[list[int]], device):
        self.model, self.device = model, device
        ids, pad = left_padded(seqs, device)
        self.logprobs, self.state = model.decode_step(ids, None, pad=pad if model.kv_cache_pads else None)

    def step(self, tokens: list[int]) -> torch.Tensor:
        new = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        self.logprobs, self.state = self.model.decode_step(new, self.state)
        return self.logprobs


@torch.no_grad()
def generate_rows(model: Any, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                  stop: Optional[Iterable] = None,
                  generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> list[list[int]]:
    """Up to `max_new_tokens` new tokens for each prompt (see the module docstring). A row ends
    right after it produces a stop sequence (a token id or a sequence of ids), which is removed
    from its tokens, or when a callable stop fires (`stop_length`)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if generators is not None and len(generators) != len(prompts):
        raise ValueError(f"{len(generators)} generators for {len(prompts)} rows: give one per row")
    if model.kv_cache and not model.kv_cache_pads and len(set(map(len, prompts))) > 1:
        return _by_length(model, prompts, max_new_tokens, sampling, stop, generators)
    stops = normalise_stop(stop)
    device = next(iter(model.parameters())).device
    seqs = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    longest = max(map(len, seqs))  # every row, finished or not, advances one cached position per step
    cache = _Cache(model, seqs, device) if model.kv_cache and longest <= model.context_len else None
    for step in range(max_new_tokens):
        if cache is not None:
            logprobs = cache.logprobs if step == 0 else cache.step([s[-1] for s in seqs])
            rows = list(range(len(seqs)))
        else:
            window = [seqs[b][-model.context_len:] for b in live]
            logprobs = model.next_token_logprobs(*right_padded(window, device))
            rows = live
        picked = sample_next(logprobs, sampling.temperature, sampling.top_p, sampling.top_k,
                             None if generators is None else [generators[b] for b in rows]).tolist()
        chosen = dict(zip(rows, picked))
        for b in list(live):
            out[b].append(chosen[b])
            seqs[b].append(chosen[b])
            drop = stop_length(out[b], stops)
            if drop >= 0:
                del out[b][len(out[b]) - drop:]
                live.remove(b)
        if not live:
            break
        if cache is not None and longest + step + 1 > model.context_len:
            cache = None  # a row's next position would leave the window: re-read the last window from here on
    return out


def _by_length(model: Any, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling, stop,
               generators) -> list[list[int]]:
    """`generate_rows` on each group of equal-length prompts, for a cache that cannot take padding."""
    groups: dict[int, list[int]] = {}
    for b, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(b)
    out: list[list[int]] = [[] for _ in prompts]
    for rows in groups.values():
        gens = None if generators is None else [generators[b] for b in rows]
        for b, tokens in zip(rows, generate_rows(model, [prompts[b] for b in rows], max_new_tokens, sampling, stop, gens)):
            out[b] = tokens
    return out
