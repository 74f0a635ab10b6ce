"""Building blocks for models that meet the contract (`hmst_bench.model.LanguageModel`).

- `RMSNorm`, `rope_tables` / `rope_at` / `apply_rope`, `causal_attention`, `Attention`, `SwiGLU`:
  root-mean-square norm, rotary position tables (per row in a left-padded batch) and their
  rotate-half application, causal scaled-dot-product attention that appends to and reads from a
  per-layer KV cache and masks left padding, and the bias-free attention and feed-forward layers
  hmst and hrm-codegen share;
- `hf_cache_arg` / `hf_cache_of`: pass a KV cache into a transformers model and read the
  extended one from its output under the installed transformers' name for it;
- `SoftmaxLM`: a base class for models with a full-vocabulary logits head; a subclass writes
  `logits(input_ids, keep=None)` and gets `loss`, `score`, `token_logprobs` and
  `next_token_logprobs`. Queries are cut to the window, or to `max_context_len` for a model that
  reads further through a memory.

Generation (sampling, stops, the batched loop) lives in `hmst_bench.generation`.
"""

from __future__ import annotations

import abc
from typing import Any, Optional

import torch
import torch.nn.functional as F

from hmst_bench.arch import IGNORE_INDEX
from hmst_bench.model import LanguageModel

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
    """x [B, H, T, hd] rotated by the tables of its positions: cos/sin [T, hd] (every row at the
    same positions) or [B, T, hd] (each row its own, as in a left-padded batch)."""
    if cos.ndim == 3:
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def rope_at(cos: torch.Tensor, sin: torch.Tensor, start: int, t: int, pad: Optional[torch.Tensor] = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables of columns start .. start + t - 1: [t, hd] each; with `pad` ([B] leading padding
    positions of each row), [B, t, hd] at each row's own positions (column - pad, padding at 0)."""
    if pad is None:
        if start + t > cos.shape[0]:
            raise ValueError(f"positions up to {start + t} exceed the model's window of {cos.shape[0]}")
        return cos[start : start + t], sin[start : start + t]
    positions = (torch.arange(start, start + t, device=pad.device)[None, :] - pad[:, None]).clamp_min(0)
    if int(positions.max()) >= cos.shape[0]:
        raise ValueError(f"positions up to {int(positions.max()) + 1} exceed the model's window of {cos.shape[0]}")
    return cos[positions], sin[positions]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
    """Causal attention of q [B, H, t, hd] over k, v [B, H, t, hd] (RoPE already applied). With
    `cache` (decoding), the keys and values of earlier positions are read from cache["k"/"v"] and
    these appended, so new position i attends to every cached position and to new positions <= i.
    cache["pad"] ([B], set by the model at the prefill of a left-padded batch) masks each row's
    leading padding keys; a padding query sees itself only, so no row is ever all masked."""
    past = 0
    pad = None if cache is None else cache.get("pad")
    if cache is not None:
        if "k" in cache:
            past = cache["k"].shape[2]
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
    t = q.shape[2]
    if pad is not None and bool(pad.any()):
        keys = torch.arange(past + t, device=q.device)
        queries = torch.arange(past, past + t, device=q.device)
        causal = keys[None, :] <= queries[:, None]
        real = keys[None, :] >= pad[:, None]  # [B, S]
        mask = causal[None] & (real[:, None, :] | (keys[None, None, :] == queries[None, :, None]))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if t == 1:  # one new position sees every cached one
        return F.scaled_dot_product_attention(q, k, v)
    # (is_causal aligns the mask top-left when t < keys, so build it: query i sees keys <= past + i)
    mask = torch.arange(past + t, device=q.device)[None, :] <= torch.arange(past, past + t, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(torch.nn.Module):
    """Bias-free multi-head causal self-attention with RoPE (hmst and hrm-codegen), reading and
    extending a per-layer KV cache when decoding. Weights are left to the owner to initialise."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = torch.nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = torch.nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        """x [B, t, d] at the positions cos/sin belong to ([t, hd] or per row [B, t, hd])."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, cache)
        return self.out(y.transpose(1, 2).reshape(b, t, d))

    def append_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: dict) -> None:
        """Append the keys and values of x [B, t, d] to `cache` without attending: what an early
        exit leaves in the layers it skips (CALM's propagation of the exited state upward)."""
        b, t, d = x.shape
        k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)[1:]
        k = apply_rope(k, cos, sin)
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v


class SwiGLU(torch.nn.Module):
    """Bias-free SwiGLU feed-forward, down(silu(gate) * up); weights left to the owner."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = torch.nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = torch.nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def new_caches(layers: int, pad: Optional[torch.Tensor]) -> list[dict]:
    """Empty per-layer KV caches for a prefill; `pad` (left padding per row) travels in each."""
    return [{} if pad is None else {"pad": pad} for _ in range(layers)]


class SoftmaxLM(LanguageModel):
    """Base for models whose head gives logits over the whole vocabulary.

    Subclasses set `self.max_seq_len` and implement `logits(input_ids, keep=None) -> [B, T, V]`,
    where `keep`, when given, is a slice of positions: only those need a head projection (the
    projection onto a large vocabulary is often the biggest single cost of scoring). They get
    `loss`, `score`, `token_logprobs` and `next_token_logprobs`; generation is the base class's
    (cache-free unless the subclass declares `kv_cache` and writes `decode_step`)."""

    @abc.abstractmethod
    def logits(self, input_ids: torch.Tensor, keep: Optional[slice] = None) -> torch.Tensor:
        """[B, T, V] scores whose log_softmax is the model's distribution (only `keep` columns)."""

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
        logp = torch.log_softmax(self.logits(input_ids, keep=span).float(), dim=-1)
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
            return torch.log_softmax(self.logits(window, keep=slice(last, last + 1))[:, -1].float(), dim=-1)
        self._check_window(input_ids)
        last = lengths.to(input_ids.device).long() - 1
        lo, hi = int(last.min()), int(last.max())
        logits = self.logits(input_ids, keep=slice(lo, hi + 1))
        picked = logits[torch.arange(len(last), device=logits.device), last - lo]
        return torch.log_softmax(picked.float(), dim=-1)
