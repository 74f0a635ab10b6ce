"""FAVOR+ positive orthogonal random features, for the `use_prf` ablation of the HSM head.

    phi(x)_i = exp(omega_i . x - |x|^2 / 2) / sqrt(m),   omega_i ~ N(0, I_d), i = 1..m

gives E[phi(w) . phi(h)] = exp(w . h) with every feature positive (Choromanski et al., 2021), so
a node's "left" probability sigmoid(w.h + c) = e^c e^{w.h} / (1 + e^c e^{w.h}) can be estimated
from phi(w) . phi(h): the estimator's logit is log(phi(w) . phi(h)) + c, and the sibling gets
the complement, exactly as in the exact head. The exp(-|x|^2/2) factor already sits inside phi;
no extra correction is applied. Everything is computed in log space (logsumexp over features),
so large norms lose accuracy (the estimator's variance grows like exp(|w + h|^2)) but never
overflow. Rows of omega are drawn in orthogonal blocks of d (QR of a Gaussian matrix) and
rescaled to Gaussian norms, which keeps each row N(0, I) while lowering the variance.
"""

from __future__ import annotations

import math

import torch


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """[m, d]: blocks of d mutually orthogonal rows, each with a chi(d)-distributed norm."""
    blocks, left = [], m
    while left > 0:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
        blocks.append(q.t()[: min(left, d)])
        left -= d
    rows = torch.cat(blocks)
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (rows * norms).float()


def log_features(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """[..., m] log phi(x)."""
    m = omega.shape[0]
    return x @ omega.t() - 0.5 * (x * x).sum(-1, keepdim=True) - 0.5 * math.log(m)


def log_kernel(log_phi_a: torch.Tensor, log_phi_b: torch.Tensor) -> torch.Tensor:
    """log(phi(a) . phi(b)) from log-features, over the last axis (broadcasting the rest)."""
    return torch.logsumexp(log_phi_a + log_phi_b, dim=-1)
