"""The hrm-codegen model: a causal Hierarchical Reasoning Model over tokens.

Two modules of equal width, L (fast) and H (slow), each a stack of post-norm transformer blocks
(parameter-free RMSNorm, RoPE, SwiGLU, bias-free causal attention through
`scaled_dot_product_attention(is_causal=True)`). Starting from fixed initial states z_H, z_L (one
frozen vector each, broadcast over positions), a segment runs h_cycles times:

    l_cycles times:  z_L <- L(z_L + z_H + x)        (x: the scaled token embedding)
    then once:       z_H <- H(z_H + z_L)

and the head reads z_H. Inference runs `segments` segments in a row, each starting from the
state the previous one left; training runs one segment per optimiser step with the state carried
between steps (deep supervision, `hmst_bench.train.deep_supervision`), where an optional Q-head (`q_logits`,
pooled over positions) learns when a sequence may halt (ACT). One-step gradient (the reference's approximation): every call but the
final L call and the final H call runs under `torch.no_grad()`, so activation memory does not grow
with the cycles; `full_bptt=True` backpropagates through all of them. Every call is causal, so the
whole recurrence is: position t never sees a later token, in any cycle.

The loss is softmax cross-entropy, or the reference's stablemax cross-entropy (`log_stablemax`);
with stablemax the model's distribution is the stablemax one, so `logits()` then returns
log_stablemax scores (already normalised: the shared log_softmax leaves them unchanged) and
scoring, evaluation and decoding all use the distribution that was trained.

Generation is the shared batched loop (`hmst_bench.generation`) on an exact KV cache kept per
module call (`decode_step`): every call is causal, so a new token changes no earlier position's
state in any call.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hmst_bench.arch import IGNORE_INDEX
from hmst_bench.modeling import Attention, SoftmaxLM, SwiGLU, new_caches, rope_at, rope_tables
from hmst_bench.train.deep_supervision import pooled_q, segment_loss


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


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Truncated LeCun-normal init of a [d_out, d_in] weight (std 1/sqrt(fan_in)), as the reference."""
    return trunc_normal_(weight.data, 1.0 / math.sqrt(weight.shape[1]))


class Block(nn.Module):
    """Post-norm: h <- norm(h + attn(h)); h <- norm(h + mlp(h))."""

    def __init__(self, config):
        super().__init__()
        self.attn = Attention(config.d_model, config.n_heads)
        self.mlp = SwiGLU(config.d_model, config.d_ff)
        for layer in (self.attn.qkv, self.attn.out, self.mlp.gate_up, self.mlp.down):
            lecun_normal_(layer.weight)
        self.eps = config.rms_norm_eps

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        h = rms_norm(h + self.attn(h, cos, sin, cache), self.eps)
        return rms_norm(h + self.mlp(h), self.eps)


class ReasoningModule(nn.Module):
    """A stack of blocks applied to (state + injection): the H or the L module."""

    def __init__(self, config, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(config) for _ in range(n_layers))

    def forward(self, state: torch.Tensor, injection: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                caches: Optional[list] = None) -> torch.Tensor:
        """`caches`: one dict per layer holding this call's keys and values (decoding only)."""
        h = state + injection
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None if caches is None else caches[i])
        return h


class HRMCodeGen(SoftmaxLM):
    kv_cache = True

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
        self.lm_head = None
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
            lecun_normal_(self.lm_head.weight)
        self.pad_id = getattr(tokenizer, "pad_token_id", None)
        self.q_head = None
        if config.act and config.segments > 1:  # halting needs a choice; as the reference: says "continue" at first
            self.q_head = nn.Linear(d, 2)
            nn.init.zeros_(self.q_head.weight)
            nn.init.constant_(self.q_head.bias, -5.0)
        # fixed initial states: drawn once, never trained, saved with the weights
        self.register_buffer("H_init", trunc_normal_(torch.empty(d), 1.0), persistent=True)
        self.register_buffer("L_init", trunc_normal_(torch.empty(d), 1.0), persistent=True)
        cos, sin = rope_tables(config.max_seq_len, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # ------------------------------------------------------------------ recurrence

    def inputs(self, input_ids: torch.Tensor, start: int = 0, pad: Optional[torch.Tensor] = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, cos, sin): the scaled token embedding and the RoPE tables of columns
        start .. start + T - 1 (per row, less its left padding `pad`, when decoding a padded batch)."""
        x = self.embed_scale * self.embed(input_ids)
        cos, sin = rope_at(self.rope_cos, self.rope_sin, start, input_ids.shape[1], pad)
        return x, cos.to(x.dtype), sin.to(x.dtype)

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed (z_H, z_L) every sequence starts from, broadcast to x's shape."""
        return self.H_init.to(x.dtype).expand_as(x), self.L_init.to(x.dtype).expand_as(x)

    def carry_init(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The deep-supervision runner's initial state of a batch (hmst_bench.train.deep_supervision)."""
        like = torch.empty(*input_ids.shape, self.config.d_model, dtype=self.embed.weight.dtype, device=input_ids.device)
        return self.initial_state(like)

    def run_segment(self, input_ids: torch.Tensor, z_h: torch.Tensor, z_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, cos, sin = self.inputs(input_ids)
        return self.segment(x, z_h, z_l, cos, sin)

    def segment(self, x: torch.Tensor, z_h: torch.Tensor, z_l: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, caches=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One segment from (z_h, z_l): h_cycles x {l_cycles L calls, one H call}. Every call but
        the final L and the final H runs without gradients, unless full_bptt. `caches` (decoding):
        an iterator giving each module call, in order, its own per-layer key/value caches."""
        cfg = self.config
        L = self.L if caches is None else (lambda *a: self.L(*a, next(caches)))
        H = self.H if caches is None else (lambda *a: self.H(*a, next(caches)))
        early = nullcontext() if cfg.full_bptt else torch.no_grad()
        with early:
            for h_step in range(cfg.h_cycles):
                last_h = h_step == cfg.h_cycles - 1
                for l_step in range(cfg.l_cycles):
                    if last_h and l_step == cfg.l_cycles - 1:
                        break
                    z_l = L(z_l, z_h + x, cos, sin)
                if not last_h:
                    z_h = H(z_h, z_l, cos, sin)
        z_l = L(z_l, z_h + x, cos, sin)  # the one-step gradient goes through these two calls
        return H(z_h, z_l, cos, sin), z_l

    def hidden(self, input_ids: torch.Tensor, start: int = 0, caches=None, pad: Optional[torch.Tensor] = None,
               ) -> torch.Tensor:
        """z_H [B, T, d] after all `segments` segments from the initial state: the head's input at
        inference. As in training, the state passed from one segment to the next is detached.
        Decoding passes the tokens after column `start`, `caches` holding every call's earlier
        keys and the batch's left padding `pad`."""
        x, cos, sin = self.inputs(input_ids, start, pad)
        z_h, z_l = self.initial_state(x)
        with torch.no_grad():
            for _ in range(self.config.segments - 1):
                z_h, z_l = self.segment(x, z_h, z_l, cos, sin, caches)
        return self.segment(x, z_h, z_l, cos, sin, caches)[0]

    def head(self, z_h: torch.Tensor) -> torch.Tensor:
        return F.linear(z_h, self.embed.weight) if self.lm_head is None else self.lm_head(z_h)

    def q_logits(self, z_h: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return pooled_q(self.q_head, z_h, input_ids, self.pad_id)

    @staticmethod
    def _call_caches(store: list, layers: int, pad: Optional[torch.Tensor]):
        """Yield, call after call, that module call's per-layer caches (created on first use)."""
        i = 0
        while True:
            if i == len(store):
                store.append(new_caches(layers, pad))
            yield store[i]
            i += 1

    def decode_step(self, new_tokens: torch.Tensor, state, pad: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """Exact KV-cached decoding step. Every module call of every segment keeps its own keys and
        values: all calls are causal, so appending a token changes no earlier position's state in
        any call, and caching them per call is exact. The prefill's left padding is masked."""
        if state is None:
            state = {"caches": [], "col": 0, "pad": pad}
        slots = self._call_caches(state["caches"], max(self.config.h_layers, self.config.l_layers), state["pad"])
        raw = self.head(self.hidden(new_tokens, state["col"], slots, state["pad"])[:, -1:])
        logits = raw if self.config.loss == "softmax" else log_stablemax(raw)
        state = {**state, "col": state["col"] + new_tokens.shape[1]}
        return torch.log_softmax(logits[:, -1].float(), dim=-1), state

    def raw_logits(self, input_ids: torch.Tensor, keep: Optional[slice] = None) -> torch.Tensor:
        h = self.hidden(input_ids)
        return self.head(h if keep is None else h[:, keep])

    # ------------------------------------------------------------------ contract

    def logits(self, input_ids: torch.Tensor, keep: Optional[slice] = None) -> torch.Tensor:
        """Scores whose log_softmax is the model's distribution: raw logits for softmax, and the
        (normalised) log_stablemax for stablemax, so the shared scoring and decoding are exact."""
        raw = self.raw_logits(input_ids, keep)
        return raw if self.config.loss == "softmax" else log_stablemax(raw).float()

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        """Without a carried state: the loss of the model as inference runs it (all segments).
        With "z_h"/"z_l" in the batch: one segment from that state, as the deep-supervision runner
        trains (hmst_bench.train.deep_supervision.segment_loss, with ACT's Q losses)."""
        if "z_h" not in batch:
            return self.lm_loss(self.raw_logits(batch["input_ids"]), batch["labels"]), {}
        return segment_loss(self, batch)

    def lm_loss(self, raw: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the labelled positions (softmax or stablemax)."""
        if self.config.loss == "softmax":
            logits = raw if raw.dtype == torch.float64 else raw.float()  # float64 stays (exact tests)
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        live = labels != IGNORE_INDEX
        logp = log_stablemax(raw).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        loss = -(logp * live).sum() / live.sum().clamp_min(1)
        return loss if raw.dtype == torch.float64 else loss.float()
