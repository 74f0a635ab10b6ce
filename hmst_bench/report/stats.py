"""Error bars and paired tests for comparing an architecture with the baseline.

- `mean_ci`: a mean over items (an eval metric) with its 95% CI: the CLT standard error, or the
  cluster-robust one when items share a cluster (MMLU subjects), after Miller (2024), "Adding
  Error Bars to Evals".
- `seeds_ci`: a scalar per seed (val_loss) with a t-interval over seeds.
- `paired_diff`: architecture minus baseline on the same items, with exact McNemar, a paired t or
  a clustered z-test, and the minimum detectable effect (`mde`).
- `paired_bootstrap`: the same for statistics that are not means over items (ECE, AUROC).
- `holm`: Holm's step-down adjustment of a report's p-values.

numpy and scipy only. Definitions, with hand-computed examples: docs/metrics.md, "Comparisons".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from scipy import stats as _st

MDE_POWER = 0.8  # the power at which paired results quote their minimum detectable effect


@dataclass(frozen=True)
class Estimate:
    """A metric with its confidence interval. `n` counts items (or seeds); `n_clusters` is the
    number of distinct clusters when the SE is clustered, else None; `method` names the SE."""

    value: float
    se: float
    lo: float
    hi: float
    n: int
    n_clusters: Optional[int]
    method: str


@dataclass(frozen=True)
class Paired:
    """Architecture minus baseline on the same items: the difference, its SE and CI, a two-sided
    p-value from `test`, and the minimum detectable effect at 80% power. `discordant` is
    (a right & b wrong, a wrong & b right) when every score is 0/1."""

    diff: float
    se: float
    lo: float
    hi: float
    p: float
    test: str
    n: int
    mde: float
    n_clusters: Optional[int] = None
    discordant: Optional[tuple[int, int]] = None


# ---------------------------------------------------------------------------------------------
# helpers


def _z(level: float) -> float:
    """The two-sided normal critical value for a confidence level (1.959964 at 0.95)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(_st.norm.ppf(0.5 + level / 2.0))


def _scores(x: Any, name: str) -> np.ndarray:
    """A non-empty 1-D float64 array of finite values; anything else is a caller's bug."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _codes(clusters: Any, n: int) -> tuple[np.ndarray, int]:
    """Cluster labels (any hashable values, one per item) as integer codes 0..G-1, and G."""
    labels = np.asarray(clusters)
    if labels.ndim != 1 or labels.size != n:
        raise ValueError(f"clusters must hold one label per item ({n}), got shape {labels.shape}")
    try:
        _, codes = np.unique(labels, return_inverse=True)
    except TypeError:  # mixed label types numpy cannot sort: number them in order of appearance
        seen: dict = {}
        codes = np.array([seen.setdefault(lab, len(seen)) for lab in labels.tolist()])
    codes = codes.reshape(-1).astype(np.intp)
    return codes, int(codes.max()) + 1


def _se_of_mean(x: np.ndarray, codes: Optional[np.ndarray], g: Optional[int]) -> float:
    """The CLT standard error of mean(x), or its cluster-robust version.

    Unclustered: sqrt(var / n) with ddof = 1. Clustered: SE^2 = G/(G-1) · (1/n^2) · Σ_c (Σ_{i∈c}
    (x_i − mean))^2. The G/(G-1) factor is statsmodels' cluster correction for a regression on a
    constant (its (N-1)/(N-K) term is 1 for K = 1); with every item its own cluster the formula
    reduces to the unclustered one, so the two never disagree on unclustered data."""
    n = x.size
    dev = x - x.mean()
    if codes is None:
        if n < 2:
            return math.nan
        return math.sqrt(float(dev @ dev) / (n - 1) / n)
    assert g is not None
    if g < 2:  # one cluster carries no information about between-cluster variation
        return math.nan
    sums = np.bincount(codes, weights=dev, minlength=g)
    return math.sqrt(g / (g - 1) * float(sums @ sums) / (n * n))


def mde(se: float, level: float = 0.95, power: float = MDE_POWER) -> float:
    """Minimum detectable effect: the true difference a two-sided z-test at 1 - `level` detects
    with probability `power`, (z_{1-α/2} + z_power) · se; 2.801585 · se at the defaults."""
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    return (_z(level) + float(_st.norm.ppf(power))) * float(se)


# ---------------------------------------------------------------------------------------------
# one system


def mean_ci(scores: Sequence[float], clusters: Optional[Sequence[Any]] = None,
            level: float = 0.95) -> Estimate:
    """Mean of per-item scores with a normal CI, value ± z·se (not clipped to the score range).
    With `clusters` (a label per item) the SE is cluster-robust; fewer than 2 items (or 2
    clusters) give se, lo, hi = NaN."""
    x = _scores(scores, "scores")
    z = _z(level)
    if clusters is None:
        codes, g, method = None, None, "clt"
    else:
        codes, g = _codes(clusters, x.size)
        method = "clt-clustered"
    value = float(x.mean())
    se = _se_of_mean(x, codes, g)
    return Estimate(value, se, value - z * se, value + z * se, int(x.size), g, method)


def seeds_ci(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Mean over seeds with a t-interval on n - 1 degrees of freedom: few seeds make the normal
    interval far too narrow (t_{0.975, 2} = 4.30 against z = 1.96). One seed: NaN interval."""
    x = _scores(values, "values")
    _z(level)  # validates level
    n = int(x.size)
    value = float(x.mean())
    if n < 2:
        return Estimate(value, math.nan, math.nan, math.nan, n, None, "single-seed")
    se = float(x.std(ddof=1)) / math.sqrt(n)
    t = float(_st.t.ppf(0.5 + level / 2.0, n - 1))
    return Estimate(value, se, value - t * se, value + t * se, n, None, "t")


# ---------------------------------------------------------------------------------------------
# architecture against baseline


def _mcnemar_exact(right_wrong: int, wrong_right: int) -> float:
    """Two-sided exact McNemar: under H0 each discordant pair goes either way with probability
    1/2, so p = min(1, 2 · P(Binomial(n_d, 1/2) ≤ the smaller count)); 1 with no discordant pair."""
    n_d = right_wrong + wrong_right
    if n_d == 0:
        return 1.0
    return min(1.0, 2.0 * float(_st.binom.cdf(min(right_wrong, wrong_right), n_d, 0.5)))


def _degenerate_p(diff: float) -> float:
    """p-value when every difference is the same (se = 0): no evidence if they are all zero,
    certainty otherwise (scipy's t-test gives NaN or 0 there, with a warning)."""
    return 1.0 if diff == 0.0 else 0.0


def paired_diff(a: Sequence[float], b: Sequence[float], clusters: Optional[Sequence[Any]] = None,
                level: float = 0.95) -> Paired:
    """mean(a − b) over aligned items (a: architecture, b: baseline) with the (clustered) CLT SE of
    the differences, a normal CI and a two-sided p-value:

    - with clusters (at least 2): a z-test from the clustered SE, test "clustered-z", so the p-value
      and the CI always agree and neither ignores the clustering (this holds for 0/1 scores too:
      McNemar assumes independent items and would overstate the evidence);
    - else every score 0/1: exact McNemar on the discordant pairs, test "mcnemar-exact";
    - else a paired t-test (scipy.stats.ttest_rel), test "paired-t".
    """
    xa, xb = _scores(a, "a"), _scores(b, "b")
    if xa.size != xb.size:
        raise ValueError(f"a and b must be aligned: {xa.size} and {xb.size} items")
    d = xa - xb
    n = int(d.size)
    diff = float(d.mean())
    codes, g = (None, None) if clusters is None else _codes(clusters, n)
    se = _se_of_mean(d, codes, g)
    z = _z(level)

    binary = bool(np.all((xa == 0) | (xa == 1)) and np.all((xb == 0) | (xb == 1)))
    discordant = None
    if binary:
        discordant = (int(np.sum((xa == 1) & (xb == 0))), int(np.sum((xa == 0) & (xb == 1))))

    if codes is not None:
        test = "clustered-z"
        if math.isnan(se):
            p = math.nan
        elif se == 0.0:
            p = _degenerate_p(diff)
        else:
            p = float(2.0 * _st.norm.sf(abs(diff) / se))
    elif binary:
        test = "mcnemar-exact"
        p = _mcnemar_exact(*discordant)
    else:
        test = "paired-t"
        if n < 2:
            p = math.nan
        elif se == 0.0:
            p = _degenerate_p(diff)
        else:
            p = float(_st.ttest_rel(xa, xb).pvalue)
    return Paired(diff, se, diff - z * se, diff + z * se, p, test, n, mde(se, level), g, discordant)


def paired_bootstrap(a: Any, b: Any, statistic: Callable[[np.ndarray], float], n_boot: int = 2000,
                     seed: int = 0, clusters: Optional[Sequence[Any]] = None,
                     level: float = 0.95) -> Paired:
    """statistic(a) − statistic(b) for a statistic that is not a mean over items (ECE, AUROC).

    `a` and `b` are per-item arrays with the same number of rows (rows = items; columns such as
    (confidence, correct) are allowed). Each replicate draws n item indices with replacement, or
    G whole clusters with replacement when `clusters` is given, and applies the same draw to a and
    b, so the pairing is kept. se = sd of the replicate differences (ddof 1), CI = their percentile
    interval, p = 2 · min(share ≤ 0, share ≥ 0), floored at 1/(B + 1) and capped at 1. Replicates
    where the statistic is not finite (an AUROC on a one-class resample) are dropped and B counts
    the rest. Deterministic for a given seed (numpy's default Generator)."""
    xa, xb = np.asarray(a), np.asarray(b)
    if xa.ndim == 0 or xb.ndim == 0 or xa.shape[0] == 0 or xa.shape[0] != xb.shape[0]:
        raise ValueError("a and b must be non-empty per-item arrays with the same number of rows")
    if int(n_boot) < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot}")
    _z(level)  # validates level before the loop
    n = int(xa.shape[0])
    rng = np.random.default_rng(seed)

    if clusters is None:
        g = None

        def draw() -> np.ndarray:
            return rng.integers(0, n, size=n)
    else:
        codes, g = _codes(clusters, n)
        # each cluster's item indices, so a replicate can take clusters whole
        order = np.argsort(codes, kind="stable")
        members = np.split(order, np.cumsum(np.bincount(codes, minlength=g))[:-1])

        def draw() -> np.ndarray:
            return np.concatenate([members[k] for k in rng.integers(0, g, size=g)])

    diff = float(statistic(xa)) - float(statistic(xb))
    boot = np.empty(int(n_boot))
    for r in range(int(n_boot)):
        idx = draw()
        boot[r] = float(statistic(xa[idx])) - float(statistic(xb[idx]))
    boot = boot[np.isfinite(boot)]
    n_ok = int(boot.size)
    if n_ok < 2:
        return Paired(diff, math.nan, math.nan, math.nan, math.nan, "paired-bootstrap", n,
                      math.nan, g, None)
    se = float(boot.std(ddof=1))
    tail = (1.0 - level) / 2.0
    lo, hi = (float(q) for q in np.quantile(boot, [tail, 1.0 - tail]))
    share = min(float(np.mean(boot <= 0.0)), float(np.mean(boot >= 0.0)))
    p = min(1.0, max(2.0 * share, 1.0 / (n_ok + 1)))
    return Paired(diff, se, lo, hi, p, "paired-bootstrap", n, mde(se, level), g, None)


# ---------------------------------------------------------------------------------------------
# many comparisons


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm (1979) step-down adjusted p-values, in the input order.

    With the m non-NaN p-values sorted, p_(1) ≤ … ≤ p_(m): adj_(k) = max_{j ≤ k} min(1, (m − j + 1)
    · p_(j)). Rejecting where adj ≤ α controls the family-wise error at α under any dependence.
    NaN entries (comparisons that could not be made) stay NaN and do not count in m."""
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    ok = ~np.isnan(p)
    if np.any((p[ok] < 0.0) | (p[ok] > 1.0)):
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full(p.size, math.nan)
    vals = p[ok]
    m = vals.size
    if m:
        order = np.argsort(vals, kind="stable")
        scaled = np.minimum(1.0, (m - np.arange(m)) * vals[order])
        adjusted = np.empty(m)
        adjusted[order] = np.maximum.accumulate(scaled)
        out[ok] = adjusted
    return [float(v) for v in out]
