"""The hrm-codegen model: a causal Hierarchical Reasoning Model over tokens.

Two modules of equal width, L (fast) and H (slow), each a stack of post-norm transformer blocks
(parameter-free RMSNorm, RoPE, SwiGLU, bias-free causal attention through
`scaled_dot_product_attention(is_causal=True)`). Starting from fixed initial states z_H, z_L (one
frozen vector each, broadcast over positions), a forward pass runs h_cycles times:

    l_cycles times:  z_L <- L(z_L + z_H + x)        (x: the scaled token embedding)
    then once:       z_H <- H(z_H + z_L)

and the head reads z_H. One-step gradient (the reference's approximation): every call but the
final L call and the final H call runs under `torch.no_grad()`, so activation memory does not grow
with the cycles; `full_bptt=True` backpropagates through all of them. Every call is causal, so the
whole recurrence is: position t never sees a later token, in any cycle.

The loss is softmax cross-entropy, or the reference's stablemax cross-entropy (`log_stablemax`);
with stablemax the model's distribution is the stablemax one, so `logits()` then returns
log_stablemax scores (already normalised: the shared log_softmax leaves them unchanged) and
scoring, evaluation and decoding all use the distribution that was trained.

Generation is the shared `SoftmaxLM` decode loop recomputing the whole cropped prefix per token
(see README: a KV cache cannot be exact because every cycle changes earlier positions' states).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hmst_bench.arch import IGNORE_INDEX
from hmst_bench.modeling import SoftmaxLM


def trunc_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std) truncated to +-2 std (the reference rescales so the std is exact; the
    difference does not matter here)."""
    return nn.init.trunc_normal_(t, mean=0.0, std=std, a=-2 * std, b=2 * std)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free RMSNorm computed in float32, returned in x's dtype."""
    h = x.float()
    return (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def stablemax_s(x: torch.Tensor) -> torch.Tensor:
    """s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0: positive, continuous, grows only linearly."""
    return torch.where(x < 0, 1.0 / (1.0 - x.clamp(max=0.0)), x + 1.0)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log(s(x) / sum s(x)) in float64 (as the reference computes it)."""
    s = stablemax_s(x.double())
    return torch.log(s) - torch.log(s.sum(dim=dim, keepdim=True))


def rope_tables(positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; rotate-half convention (as Llama and the reference)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Linear(nn.Module):
    """Bias-free linear layer, truncated LeCun-normal init (std 1/sqrt(fan_in))."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(trunc_normal_(torch.empty(d_out, d_in), 1.0 / math.sqrt(d_in)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = Linear(d_model, 3 * d_model)
        self.out = Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = Linear(d_model, 2 * d_ff)
        self.down = Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Post-norm: h <- norm(h + attn(h)); h <- norm(h + mlp(h))."""

    def __init__(self, config):
        super().__init__()
        self.attn = Attention(config.d_model, config.n_heads)
        self.mlp = SwiGLU(config.d_model, config.d_ff)
        self.eps = config.rms_norm_eps

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = rms_norm(h + self.attn(h, cos, sin), self.eps)
        return rms_norm(h + self.mlp(h), self.eps)


class ReasoningModule(nn.Module):
    """A stack of blocks applied to (state + injection): the H or the L module."""

    def __init__(self, config, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(config) for _ in range(n_layers))

    def forward(self, state: torch.Tensor, injection: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = state + injection
        for layer in self.layers:
            h = layer(h, cos, sin)
        return h


class HRMCodeGen(SoftmaxLM):
    def __init__(self, config, tokenizer=None):
        super().__init__()
        self.config = config
        self.max_seq_len = config.context  # what scoring and decoding read (the window)
        d = config.d_model
        self.embed_scale = math.sqrt(d)
        self.embed = nn.Embedding(config.vocab_size, d)
        trunc_normal_(self.embed.weight.data, 1.0 / self.embed_scale)  # x = scale * E[t] has unit RMS
        self.L = ReasoningModule(config, config.l_layers)
        self.H = ReasoningModule(config, config.h_layers)
        self.lm_head = None if config.tie_embeddings else Linear(d, config.vocab_size)
        # fixed initial states: drawn once, never trained, saved with the weights
        self.register_buffer("H_init", trunc_normal_(torch.empty(d), 1.0), persistent=True)
        self.register_buffer("L_init", trunc_normal_(torch.empty(d), 1.0), persistent=True)
        cos, sin = rope_tables(config.max_seq_len, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # ------------------------------------------------------------------ recurrence

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """z_H [B, T, d] after all cycles (the head's input)."""
        b, t = input_ids.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"{t} tokens exceed the model's window of {self.config.max_seq_len}")
        cfg = self.config
        x = self.embed_scale * self.embed(input_ids)
        cos, sin = self.rope_cos[:t].to(x.dtype), self.rope_sin[:t].to(x.dtype)
        z_h = self.H_init.to(x.dtype).expand(b, t, -1)
        z_l = self.L_init.to(x.dtype).expand(b, t, -1)
        early = nullcontext() if cfg.full_bptt else torch.no_grad()
        with early:  # every call but the last L and the last H
            for h_step in range(cfg.h_cycles):
                last_h = h_step == cfg.h_cycles - 1
                for l_step in range(cfg.l_cycles):
                    if last_h and l_step == cfg.l_cycles - 1:
                        break
                    z_l = self.L(z_l, z_h + x, cos, sin)
                if not last_h:
                    z_h = self.H(z_h, z_l, cos, sin)
        z_l = self.L(z_l, z_h + x, cos, sin)  # the one-step gradient goes through these two calls
        return self.H(z_h, z_l, cos, sin)

    def raw_logits(self, input_ids: torch.Tensor, keep: Optional[slice] = None) -> torch.Tensor:
        h = self.hidden(input_ids)
        if keep is not None:
            h = h[:, keep]
        return F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)

    # ------------------------------------------------------------------ contract

    def logits(self, input_ids: torch.Tensor, keep: Optional[slice] = None) -> torch.Tensor:
        """Scores whose log_softmax is the model's distribution: raw logits for softmax, and the
        (normalised) log_stablemax for stablemax, so the shared scoring and decoding are exact."""
        raw = self.raw_logits(input_ids, keep)
        return raw if self.config.loss == "softmax" else log_stablemax(raw).float()

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        raw = self.raw_logits(batch["input_ids"])
        labels = batch["labels"]
        if self.config.loss == "softmax":
            logits = raw if raw.dtype == torch.float64 else raw.float()  # float64 stays (exact tests)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
            return loss, {}
        live = labels != IGNORE_INDEX
        logp = log_stablemax(raw).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        loss = -(logp * live).sum() / live.sum().clamp_min(1)
        return (loss if raw.dtype == torch.float64 else loss.float()), {}
