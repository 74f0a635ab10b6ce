"""Reusable pieces for meeting the model contract (`hmst_bench.arch.LanguageModel`).

- `sample_next`: greedy / temperature / top-k / nucleus (top-p) choice from a log-distribution,
  drawing from `sampling_probs` (the filtered distribution itself, for tests and tools);
- `decode_loop`: the one generation loop every architecture shares (stop sequences, finished
  rows, max_new_tokens), driven by a per-architecture `step` function that may keep a KV cache;
- `RMSNorm`, `rope_tables` / `apply_rope` / `causal_attention`: root-mean-square norm, rotary position tables, their rotate-half
  application, and causal scaled-dot-product attention that can append to and read from a
  per-layer KV cache (one new token, a block of them, or a whole prompt), shared by the plugins
  that write their own transformer blocks;
- `hf_cache_arg` / `hf_cache_of`: pass a KV cache into a transformers model and read the
  extended one from its output under the installed transformers' name for it;
- `SoftmaxLM`: a base class for models with a full-vocabulary logits head; a subclass writes
  `logits(input_ids, keep=None)` and gets `loss`, `score`, `token_logprobs`, `next_token_logprobs`
  and an O(n^2) cache-free `generate`; it overrides `decode_step` to add a KV cache. Queries are
  cut to the window, or to `max_context_len` for a model that reads further through a memory.

Architectures whose head is not a softmax (a hierarchical softmax, say) implement the four
methods themselves and still reuse `decode_loop`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from hmst_bench.arch import IGNORE_INDEX

# step(new_tokens [B, n], state) -> (next-token log-probs [B, V], new state); state None at first
DecodeStep = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]


_HF_CACHE_NAME: Optional[str] = None


def _hf_cache_name() -> str:
    """The name transformers gives a model's KV cache, as argument and output field: `cache` since
    transformers renamed it (`past_key_values` then warns on every call and is removed in 5.40),
    `past_key_values` before. Read from the installed version's output class, not its number."""
    global _HF_CACHE_NAME
    if _HF_CACHE_NAME is None:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        _HF_CACHE_NAME = "cache" if "cache" in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"
    return _HF_CACHE_NAME


def hf_cache_arg(cache: Any) -> dict[str, Any]:
    """Keyword arguments handing `cache` (None: none yet) to a transformers model's forward."""
    return {} if cache is None else {_hf_cache_name(): cache}


def hf_cache_of(output: Any) -> Any:
    """The KV cache in a transformers model output (None when it was run without one)."""
    return output.get(_hf_cache_name())


class RMSNorm(torch.nn.Module):
    """Root-mean-square layer norm with a learned scale, computed in float32."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).to(x.dtype)


def rope_tables(positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [positions, head_dim] float32 for the rotate-half RoPE convention (Llama's),
    computed in float64 so long windows keep their precision."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd] rotated by the tables of its T positions, cos/sin [T, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
    """Causal attention of q [B, H, t, hd] over k, v [B, H, t, hd] (RoPE already applied). With
    `cache` (decoding), the keys and values of earlier positions are read from cache["k"/"v"] and
    these appended, so new position i attends to every cached position and to new positions <= i."""
    past = 0
    if cache is not None:
        if "k" in cache:
            past = cache["k"].shape[2]
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    t = q.shape[2]
    if t == 1:  # one new position sees every cached one
        return F.scaled_dot_product_attention(q, k, v)
    # (is_causal aligns the mask top-left when t < keys, so build it: query i sees keys <= past + i)
    mask = torch.arange(past + t, device=q.device)[None, :] <= torch.arange(past, past + t, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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

    The filters act on the distribution exactly as given, so a model that hands over its exact
    full distribution gets exact top-k / top-p sampling. The result need not sum to one
    (`torch.multinomial` normalises)."""
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


def sample_next(
    logprobs: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    top_k: int = 0,
) -> torch.Tensor:
    """Pick one token per row of `logprobs` [B, V]. temperature <= 0 is greedy (argmax; top_k
    and top_p then change nothing); otherwise draw from `sampling_probs` (temperature, then
    top-k, then top-p)."""
    if temperature <= 0:
        _check_top_k(top_k)
        return logprobs.argmax(dim=-1)
    probs = sampling_probs(logprobs, temperature, top_p, top_k)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _normalise_stop(stop: Optional[Iterable]) -> list:
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


def _stop_length(tokens: list[int], stops: list) -> int:
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


@torch.no_grad()
def decode_loop(
    step: DecodeStep,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Optional[Iterable] = None,
    generator: Optional[torch.Generator] = None,
    top_k: int = 0,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` per row, each token chosen by `sample_next` (greedy at
    temperature <= 0, else sampled after top-k then top-p filtering); a row ends right after it
    produces a stop sequence (a token id or a sequence of ids), which is removed from the
    returned tokens, or when a callable stop fires (see `_stop_length`). `top_k` comes last so
    that callers passing the older arguments by position keep working."""
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a non-empty [B, T] tensor")
    top_k = _check_top_k(top_k)  # a bad value fails before any model work
    stops = _normalise_stop(stop)
    batch = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    logprobs, state = step(input_ids, None)
    for _ in range(max_new_tokens):
        nxt = sample_next(logprobs, temperature, top_p, generator, top_k)
        for b in range(batch):
            if done[b]:
                continue
            out[b].append(int(nxt[b]))
            drop = _stop_length(out[b], stops)
            if drop >= 0:
                del out[b][len(out[b]) - drop :]
                done[b] = True
        if all(done):
            break
        logprobs, state = step(nxt[:, None], state)
    return out


class SoftmaxLM(torch.nn.Module):
    """Base for models whose head gives logits over the whole vocabulary.

    Subclasses set `self.max_seq_len` and implement `logits(input_ids) -> [B, T, V]`, or better
    `logits(input_ids, keep=None)`, where `keep`, when given, is a slice of positions: only those
    need a head projection (the projection onto a large vocabulary is often the biggest single
    cost of scoring). A `logits` without `keep` works too; its output is sliced afterwards."""

    max_seq_len: int

    @property
    def context_len(self) -> int:
        """The most tokens one query may hold: the attention window, unless the model reads
        further through a memory and sets `max_context_len` (HMST with its memory on)."""
        return int(getattr(self, "max_context_len", None) or self.max_seq_len)

    def logits(self, input_ids: torch.Tensor, keep: Optional[slice] = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement logits(input_ids, keep=None)")

    def _logits_at(self, input_ids: torch.Tensor, keep: slice) -> torch.Tensor:
        takes_keep = type(self).__dict__.get("_logits_takes_keep")  # cached per class, not inherited
        if takes_keep is None:
            takes_keep = "keep" in inspect.signature(self.logits).parameters
            type(self)._logits_takes_keep = takes_keep
        return self.logits(input_ids, keep=keep) if takes_keep else self.logits(input_ids)[:, keep]

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        logits = self.logits(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        return loss, {}

    def _check_window(self, input_ids: torch.Tensor) -> None:
        if input_ids.shape[1] > self.context_len:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed the model's context of {self.context_len}; "
                f"score longer text in windows (loglikelihood_rolling does)"
            )

    def score(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [B, T], is-argmax [B, T]) of `targets`; positions whose target is -100 get
        log-prob 0 and count as argmax, and the head runs only over the columns some row needs."""
        self._check_window(input_ids)
        logprobs = torch.zeros(targets.shape, dtype=torch.float32, device=input_ids.device)
        greedy = torch.ones(targets.shape, dtype=torch.bool, device=input_ids.device)
        live_cols = (targets != IGNORE_INDEX).any(dim=0).nonzero()
        if live_cols.numel() == 0:
            return logprobs, greedy
        span = slice(int(live_cols[0]), int(live_cols[-1]) + 1)
        logp = torch.log_softmax(self._logits_at(input_ids, span).float(), dim=-1)
        wanted = targets[:, span].to(logp.device)
        live = wanted != IGNORE_INDEX
        got = logp.gather(-1, wanted.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        logprobs[:, span] = got.masked_fill(~live, 0.0)
        greedy[:, span] = (logp.argmax(dim=-1) == wanted) | ~live
        return logprobs, greedy

    def token_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.score(input_ids, targets)[0]

    def next_token_logprobs(self, input_ids: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, V] after each row's last token. With `lengths`, rows are right-padded and row b's
        distribution is the one after its first lengths[b] tokens (an evaluator's batch of
        contexts of different lengths: one pass, the head run only where needed)."""
        if lengths is None:
            window = input_ids[:, -self.context_len :]
            last = window.shape[1] - 1
            return torch.log_softmax(self._logits_at(window, slice(last, last + 1))[:, -1].float(), dim=-1)
        self._check_window(input_ids)
        last = lengths.to(input_ids.device).long() - 1
        lo, hi = int(last.min()), int(last.max())
        logits = self._logits_at(input_ids, slice(lo, hi + 1))
        picked = logits[torch.arange(len(last), device=logits.device), last - lo]
        return torch.log_softmax(picked.float(), dim=-1)

    def decode_step(self, new_tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Cache-free step: re-encode the last `max_seq_len` tokens every time (O(n^2))."""
        seq = new_tokens if state is None else torch.cat([state, new_tokens], dim=1)
        return self.next_token_logprobs(seq), seq

    def generate(self, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, generator=None, top_k=0):
        return decode_loop(self.decode_step, input_ids, max_new_tokens, temperature, top_p, stop, generator, top_k)
