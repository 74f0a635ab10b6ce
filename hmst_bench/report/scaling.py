"""Validation loss against achieved compute: scaling-law fits and the compute multiplier.

- `fit_power_law`: L(C) = E + A · C^-alpha fitted as in Chinchilla (Hoffmann et al. 2022,
  approach 3): a Huber loss on log-loss residuals, minimised by L-BFGS from a grid of starts.
- `compute_multiplier`: how much baseline compute reaches an architecture's loss, relative to the
  compute the architecture spent, read off the baseline's measured points (no fit needed).
- `multiplier_ci`: several seeds' multipliers as a geometric mean with a t-interval.

numpy and scipy only. Definitions, with hand-computed examples: docs/metrics.md, "Comparisons".
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
from scipy import optimize as _opt
from scipy import stats as _st

from hmst_bench.report.stats import Estimate

# Starting points of the fit, in the rescaled problem (compute / min compute, so the first point
# sits at x = 1): E as a fraction of the lowest loss, A as a fraction of the highest loss (at
# x = 1, A is the reducible loss there), alpha over the range seen for language models and beyond.
# Every grid point is scored, and L-BFGS runs from the best (e, a) of each alpha: scipy's L-BFGS-B
# calls multithreaded OpenBLAS on its 3x3 problem, and on a busy machine each iteration can cost
# milliseconds, so a run from all 120 points took half a minute where 6 runs take about a second.
_E_FRACTIONS = (0.05, 0.3, 0.6, 0.9)
_A_FRACTIONS = (0.01, 0.1, 0.5, 1.0, 5.0)
_ALPHAS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)

ArrayOrFloat = Union[float, np.ndarray]


@dataclass(frozen=True)
class PowerLaw:
    """L(C) = E + A · C^-alpha, fitted to `n_points` (compute, loss) points."""

    E: float
    A: float
    alpha: float
    n_points: int

    def __call__(self, compute: ArrayOrFloat) -> ArrayOrFloat:
        c = np.asarray(compute, dtype=np.float64)
        # A · C^-alpha through logs: A alone can overflow when alpha is large and C is ~1e20
        out = self.E + np.exp(math.log(self.A) - self.alpha * np.log(c))
        return float(out) if out.ndim == 0 else out


def _positive(x: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0.0):
        raise ValueError(f"{name} must be finite and positive")
    return arr


def _huber_objective(theta: np.ndarray, logx: np.ndarray, logl: np.ndarray,
                     delta: float) -> tuple[float, np.ndarray]:
    """Σ Huber_delta(log(E + A' x^-alpha) − log L) / delta², with its gradient in (e, a', alpha).

    The division by delta² makes a residual of delta cost 1/2: L-BFGS stops when a step gains
    less than ~2e-9 · max(|f|, 1), and on the raw scale (residuals ~1e-3, f ~1e-6) it would stop
    at once, far from the optimum."""
    e, a, alpha = theta
    u = a - alpha * logx
    pred = np.logaddexp(u, e)
    r = pred - logl
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    dr = np.where(small, r, delta * np.sign(r))  # d Huber / d r
    w = np.exp(u - pred)  # d pred / d a' = share of the reducible term in E + A' x^-alpha
    grad = np.array([np.sum(dr * (1.0 - w)), np.sum(dr * w), -np.sum(dr * w * logx)])
    scale = delta * delta
    return float(np.sum(loss)) / scale, grad / scale


def fit_power_law(compute: Sequence[float], loss: Sequence[float],
                  delta: float = 1e-3) -> PowerLaw:
    """Fit L(C) = E + A · C^-alpha by minimising Σ Huber_delta(log(E + A C^-alpha) − log L) over
    (log E, log A, alpha) with L-BFGS, keeping the best of several starts (Chinchilla's approach
    3): a grid of 120 starts is scored and L-BFGS runs from the best start of each of the 6
    alphas. Compute is divided by its minimum while fitting, and A converted back."""
    c = _positive(compute, "compute")
    l = _positive(loss, "loss")
    if c.size != l.size:
        raise ValueError(f"compute and loss must have the same length ({c.size} != {l.size})")
    distinct = int(np.unique(c).size)
    if distinct < 3:
        raise ValueError(f"fit_power_law needs at least 3 distinct compute values to fit E, A and "
                         f"alpha, got {distinct}")
    if not (math.isfinite(delta) and delta > 0.0):
        raise ValueError(f"delta must be finite and positive, got {delta}")

    c_min = float(c.min())
    logx = np.log(c / c_min)
    logl = np.log(l)
    lmin, lmax = float(l.min()), float(l.max())
    starts = []
    for alpha0 in _ALPHAS:
        grid = [np.array([math.log(fe * lmin), math.log(fa * lmax), alpha0])
                for fe, fa in itertools.product(_E_FRACTIONS, _A_FRACTIONS)]
        starts.append(min(grid, key=lambda x0: _huber_objective(x0, logx, logl, delta)[0]))
    best = None
    for x0 in starts:
        res = _opt.minimize(_huber_objective, x0, args=(logx, logl, delta), jac=True,
                            method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-8})
        if np.all(np.isfinite(res.x)) and math.isfinite(res.fun):
            if best is None or res.fun < best.fun:
                best = res
    if best is None:
        raise ValueError("fit_power_law found no finite fit from any starting point")
    e, a, alpha = (float(v) for v in best.x)
    # L = E + A' (C / c_min)^-alpha = E + (A' c_min^alpha) C^-alpha
    return PowerLaw(E=math.exp(e), A=math.exp(a + alpha * math.log(c_min)), alpha=alpha,
                    n_points=int(c.size))


@dataclass(frozen=True)
class Multiplier:
    """`value` = baseline_compute / the architecture's compute, where `baseline_compute` is what
    the baseline needs to reach the architecture's loss; `extrapolated` when that loss lies
    outside the baseline's measured range."""

    value: float
    baseline_compute: float
    extrapolated: bool


def _envelope(compute: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The baseline's lower envelope: points by compute, loss replaced by the running minimum,
    keeping only the first (cheapest) point of each level. The result strictly decreases in
    loss as compute grows, so every loss maps to one compute."""
    order = np.lexsort((loss, compute))  # by compute, lowest loss first among equal compute
    c, l = compute[order], np.minimum.accumulate(loss[order])
    keep = np.ones(c.size, dtype=bool)
    keep[1:] = l[1:] < l[:-1]  # a flat stretch (no improvement) keeps only its first point
    return c[keep], l[keep]


def compute_multiplier(baseline_compute: Sequence[float], baseline_loss: Sequence[float],
                       compute: float, loss: float) -> Multiplier:
    """How much more compute the baseline needs to reach `loss` than the architecture spent.

    The baseline's points (its lower envelope) are joined linearly in (log C, log L); C_b is where
    that curve reaches `loss` (a measured point's own compute when `loss` equals its loss), and
    value = C_b / compute. Outside the baseline's loss range the nearest segment's log-log slope
    is extended and `extrapolated` is True; value is NaN when there is no such segment (a single
    baseline point)."""
    bc = _positive(baseline_compute, "baseline_compute")
    bl = _positive(baseline_loss, "baseline_loss")
    if bc.size != bl.size:
        raise ValueError(f"baseline_compute and baseline_loss must have the same length "
                         f"({bc.size} != {bl.size})")
    c_arch = float(_positive([compute], "compute")[0])
    l_arch = float(_positive([loss], "loss")[0])
    c, l = _envelope(bc, bl)

    hit = np.flatnonzero(l == l_arch)
    if hit.size:  # on a measured point: its compute itself, so a run against itself gives 1.0
        cb = float(c[hit[0]])
        return Multiplier(cb / c_arch, cb, False)
    if c.size == 1:
        return Multiplier(math.nan, math.nan, True)

    extrapolated = not (l[-1] < l_arch < l[0])
    if l_arch > l[0]:
        i = 0  # worse than the baseline's cheapest point: extend the first segment
    elif l_arch < l[-1]:
        i = c.size - 2  # better than its best point: extend the last segment
    else:
        # l decreases, so the segment (i, i+1) with l[i+1] < l_arch < l[i]
        i = int(np.searchsorted(-l, -l_arch)) - 1
    lc0, lc1 = math.log(c[i]), math.log(c[i + 1])
    ll0, ll1 = math.log(l[i]), math.log(l[i + 1])
    if ll1 == ll0:  # cannot happen after the envelope; kept so a flat slope never divides by 0
        return Multiplier(math.nan, math.nan, True)
    t = (math.log(l_arch) - ll0) / (ll1 - ll0)
    cb = math.exp(lc0 + t * (lc1 - lc0))
    return Multiplier(cb / c_arch, cb, extrapolated)


def multiplier_ci(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Several seeds' multipliers: value = geometric mean, lo/hi = exp(mean log ± t · se_log) on
    n − 1 degrees of freedom (ratios are symmetric on a log scale: 2x and 0.5x are equally far
    from 1). `se` is on the multiplier's own scale by the delta method, value · se_log. One
    value: NaN se and interval, method "single-seed"."""
    v = _positive(values, "values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    logs = np.log(v)
    n = int(v.size)
    mean_log = float(logs.mean())
    value = math.exp(mean_log)
    if n < 2:
        return Estimate(value, math.nan, math.nan, math.nan, n, None, "single-seed")
    se_log = float(logs.std(ddof=1)) / math.sqrt(n)
    half = float(_st.t.ppf(0.5 + level / 2.0, n - 1)) * se_log
    return Estimate(value, value * se_log, math.exp(mean_log - half), math.exp(mean_log + half),
                    n, None, "geometric-t")
