"""The mixture-of-experts feed-forward layer of HMST's base language model.

`n_experts` SwiGLU experts and a linear router. Each token goes to its `top_k` most probable
experts (router logits and softmax in float32, even under
autocast), with the chosen probabilities renormalised to sum
to 1 as its mixing weights. Routing is dropless (no capacity, no token is ever dropped) and is
done by gather/scatter, never by a Python loop over tokens:

1. the N * top_k (token, slot) pairs are sorted by expert, so each expert's tokens form one
   contiguous slice;
2. the tokens are gathered in that order (`index_select`);
3. each expert runs one matmul chain over its slice (a loop over the experts, not the tokens);
4. the outputs, times their weights, are added back to their tokens (`index_add`).

Only dispatched tokens are multiplied, so `torch.utils.flop_counter.FlopCounterMode` (the
budget meter) counts exactly the expert FLOPs that were spent: 6 * N * top_k * d_model * d_ff
for the experts plus 2 * N * d_model * n_experts for the router, per forward pass.

The layer also returns its routing statistics: the Switch-Transformer load-balance loss
`n_experts * sum_i f_i * P_i` (f_i: the fraction of the N * top_k assignments dispatched to
expert i; P_i: expert i's mean router probability; 1.0 when perfectly balanced), the router
z-loss `mean(logsumexp(logits)^2)`, and the per-expert load f. Both losses are returned
unscaled; the model multiplies them by their coefficients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterStats:
    """Routing statistics of one MoE forward pass (the losses keep their graph)."""

    balance_loss: torch.Tensor  # n_experts * sum_i f_i * P_i (differentiable through P)
    z_loss: torch.Tensor  # mean over tokens of logsumexp(router logits)^2
    load: torch.Tensor  # [n_experts] f_i: fraction of token-slot assignments per expert (no grad)


class MoE(nn.Module):
    def __init__(self, d_model: int, d_ff: int, n_experts: int = 8, top_k: int = 2, init_std: float = 0.02):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k ({top_k}) must be between 1 and n_experts ({n_experts})")
        self.d_model, self.d_ff, self.n_experts, self.top_k = d_model, d_ff, n_experts, top_k
        self.router = nn.Parameter(torch.randn(n_experts, d_model) * init_std)
        # one stacked tensor per projection: expert e's gate and up halves are gate_up[e]
        self.gate_up = nn.Parameter(torch.randn(n_experts, d_model, 2 * d_ff) * init_std)
        self.down = nn.Parameter(torch.randn(n_experts, d_ff, d_model) * (init_std / math.sqrt(2.0)))

    def params_per_expert(self) -> int:
        return 3 * self.d_model * self.d_ff

    def route(self, x: torch.Tensor, top_k: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (router logits [N, E], probs [N, E], top-k experts [N, k], their
        renormalised weights [N, k]), all in float32 whatever x's dtype and autocast say (float64
        when x is float64, so that float64 checks such as gradcheck are exact). `top_k`
        overrides the layer's k for this call (the meta-controller's expert gate)."""
        k = self.top_k if top_k is None else int(top_k)
        if not 1 <= k <= self.n_experts:
            raise ValueError(f"top_k ({k}) must be between 1 and n_experts ({self.n_experts})")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.router.to(dtype))
        probs = torch.softmax(logits, dim=-1)
        top_p, top_e = probs.topk(k, dim=-1)
        weights = top_p / top_p.sum(dim=-1, keepdim=True)
        return logits, probs, top_e, weights

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU expert e applied to x [n, d]."""
        gate, up = (x @ self.gate_up[e].to(x.dtype)).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down[e].to(x.dtype)

    def forward(self, x: torch.Tensor, top_k: Optional[int] = None) -> tuple[torch.Tensor, RouterStats]:
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        logits, probs, top_e, weights = self.route(x, top_k)

        # Sort the N*k (token, slot) pairs by expert: expert e's pairs become one slice.
        flat_e = top_e.reshape(-1)
        order = flat_e.argsort(stable=True)
        token_of = order // top_e.shape[1]  # the token each sorted pair belongs to
        counts = torch.bincount(flat_e, minlength=self.n_experts)
        xs = x.index_select(0, token_of)
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):  # a loop over experts, never over tokens
            outs.append(self.expert(e, xs[start : start + n]))
            start += n
        ys = torch.cat(outs, dim=0) * weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        y = torch.zeros_like(x).index_add(0, token_of, ys)

        load = (counts.float() / max(1, flat_e.numel())).detach()
        balance = self.n_experts * (load * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        return y.reshape(shape), RouterStats(balance, z, load)
