"""HMST's meta-controller: a small causal transformer that decides, before each generated token,
what the base model computes for it (`model.Gates`), and after the answer whether the critic
checks it. `policy.py` runs it inside decoding; stage 3 (`stage3.py`) trains it by PPO.

At decision point t it reads the base's final hidden state of the latest token (from the decoding
pass that produced it; `decode_step` leaves it in `state["last_hidden"]`) and a state vector
(`N_STATE` numbers: position in the window, memory fill, the critic's score so far, the share of
full-model compute spent so far), and gives, per gate, a categorical policy and one value:

    exit      one of the base's exits (`config.exits`) or "all blocks"
    experts   top-1 or the base's own top-k per MoE layer
    episodic  skip or read the episodic memory
    semantic  skip or read the semantic memory
    verify    accept, or have the critic check the answer (and possibly abstain)

Every size follows the base: width d_model / 4 (at least 32, a multiple of the head width 32),
max(2, n_layers / 2) blocks, and the exit head has len(config.exits) + 1 choices, so no
dimension is set by hand (the seed's review found a controller built for 8 experts over a base
of 16). The blocks are the shared pre-norm RMSNorm / RoPE attention / SwiGLU pieces, causal, with
a KV cache so an episode of many decisions costs one step each.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from hmst_bench.arch import swiglu_width
from hmst_bench.modeling import Attention, RMSNorm, SwiGLU, rope_at, rope_tables

N_STATE = 4  # position, memory fill, critic score so far, compute spent
HEAD_DIM = 32


def gate_choices(config) -> dict[str, int]:
    """How many choices each gate has for a base of this config."""
    return {"exit": len(config.exits) + 1, "experts": 2, "episodic": 2, "semantic": 2, "verify": 2}


def width(config) -> int:
    return max(HEAD_DIM, (config.d_model // 4) // HEAD_DIM * HEAD_DIM)


class _Block(nn.Module):
    def __init__(self, c: int, eps: float):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(c, eps), Attention(c, c // HEAD_DIM)
        self.ffn_norm, self.ffn = RMSNorm(c, eps), SwiGLU(c, swiglu_width(c, 32))

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.ffn(self.ffn_norm(x))


class Controller(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = width(config)
        self.config, self.width = config, c
        self.n_layers = max(2, config.n_layers // 2)
        self.inp = nn.Linear(config.d_model + N_STATE, c)
        self.blocks = nn.ModuleList(_Block(c, config.rms_norm_eps) for _ in range(self.n_layers))
        self.norm = RMSNorm(c, config.rms_norm_eps)
        self.policy = nn.ModuleDict({g: nn.Linear(c, n) for g, n in gate_choices(config).items()})
        self.value = nn.Linear(c, 1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=config.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        cos, sin = rope_tables(config.max_seq_len, HEAD_DIM, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, hidden: torch.Tensor, state: torch.Tensor, caches: Optional[list] = None, start: int = 0,
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """hidden [B, T, d_model] and state [B, T, N_STATE] at decision points start .. start+T-1
        -> ({gate: logits [B, T, choices]}, value [B, T]). Causal: point t reads points <= t
        (with `caches`, the earlier points of the episode from their cached keys and values)."""
        x = self.inp(torch.cat([hidden, state.to(hidden.dtype)], dim=-1))
        cos, sin = rope_at(self.rope_cos, self.rope_sin, start, x.shape[1])
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if caches is None else caches[i])
        x = self.norm(x)
        return {g: head(x) for g, head in self.policy.items()}, self.value(x).squeeze(-1)

    def new_caches(self) -> list[dict]:
        return [{} for _ in self.blocks]
