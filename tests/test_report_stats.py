"""Comparison statistics (hmst_bench.report.stats and .scaling): each definition of
docs/metrics.md ("Comparisons") against a hand-computed example (the arithmetic is in the
comments) and against statsmodels / scipy; coverage of the paired CIs on simulated data with a
known difference; the Chinchilla-style fit on a noiseless curve; the compute multiplier."""

from __future__ import annotations

import math

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import stats as st
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from hmst_bench.report.scaling import (Multiplier, PowerLaw, compute_multiplier, fit_power_law,
                                       multiplier_ci)
from hmst_bench.report.stats import (Estimate, Paired, holm, mde, mean_ci, paired_bootstrap,
                                     paired_diff, seeds_ci)

Z975 = 1.959963984540054  # norm.ppf(0.975)
Z80 = 0.8416212335729143  # norm.ppf(0.8)


def _sm_se(x, groups=None) -> float:
    """statsmodels' SE of a mean: OLS on a constant, nonrobust or cluster-robust."""
    fit = sm.OLS(np.asarray(x, float), np.ones((len(x), 1)))
    if groups is None:
        return float(fit.fit().bse[0])
    codes = np.unique(np.asarray(groups), return_inverse=True)[1]
    return float(fit.fit(cov_type="cluster", cov_kwds={"groups": codes}).bse[0])


# --- mean_ci ---------------------------------------------------------------------------------


def test_mean_ci_hand_example():
    # x = 1 0 1 1 0 0: mean 0.5, deviations ±0.5, Σ dev² = 6 · 0.25 = 1.5,
    # var (ddof 1) = 1.5 / 5 = 0.3, se = sqrt(0.3 / 6) = sqrt(0.05) = 0.2236068
    x = [1, 0, 1, 1, 0, 0]
    e = mean_ci(x)
    assert isinstance(e, Estimate)
    assert (e.value, e.n, e.n_clusters, e.method) == (0.5, 6, None, "clt")
    assert e.se == pytest.approx(math.sqrt(0.05), rel=1e-12)
    # CI 0.5 ± 1.959964 · 0.2236068 = 0.5 ± 0.4382613 = [0.0617387, 0.9382613]
    assert (e.lo, e.hi) == pytest.approx((0.0617387, 0.9382613), abs=1e-7)

    # clusters A A B B C C: cluster sums of deviations (0.5 − 0.5, 0.5 + 0.5, −0.5 − 0.5) =
    # (0, 1, −1), Σ sums² = 2; SE² = G/(G−1) · 2 / n² = 3/2 · 2/36 = 1/12, se = 0.2886751
    c = mean_ci(x, clusters=list("AABBCC"))
    assert (c.value, c.n, c.n_clusters, c.method) == (0.5, 6, 3, "clt-clustered")
    assert c.se == pytest.approx(math.sqrt(1 / 12), rel=1e-12)
    assert (c.lo, c.hi) == pytest.approx((0.5 - Z975 * math.sqrt(1 / 12),
                                          0.5 + Z975 * math.sqrt(1 / 12)), rel=1e-12)


def test_mean_ci_matches_statsmodels():
    rng = np.random.default_rng(1)
    x = rng.normal(size=57) + np.repeat(rng.normal(size=7), [3, 5, 8, 13, 2, 20, 6])
    groups = np.repeat(["s%d" % i for i in range(7)], [3, 5, 8, 13, 2, 20, 6])
    assert mean_ci(x).se == pytest.approx(_sm_se(x), rel=1e-10)
    assert mean_ci(x, clusters=groups).se == pytest.approx(_sm_se(x, groups), rel=1e-10)
    # 0/1 scores, MMLU-like: 5 subjects of unequal size
    y = (rng.random(200) < 0.4).astype(float)
    g = rng.integers(0, 5, size=200)
    assert mean_ci(y, clusters=g).se == pytest.approx(_sm_se(y, g), rel=1e-10)


def test_every_item_its_own_cluster_is_the_clt_se():
    # G/(G−1) · Σ dev² / n² with G = n is Σ dev² / ((n−1) n) = var / n
    x = np.random.default_rng(2).random(30)
    assert mean_ci(x, clusters=np.arange(30)).se == pytest.approx(mean_ci(x).se, rel=1e-12)


def test_mean_ci_small_and_bad_inputs():
    one = mean_ci([0.7])
    assert one.value == 0.7 and math.isnan(one.se) and math.isnan(one.lo) and math.isnan(one.hi)
    single_cluster = mean_ci([1, 0, 1], clusters=["a", "a", "a"])
    assert single_cluster.n_clusters == 1 and math.isnan(single_cluster.se)
    with pytest.raises(ValueError):
        mean_ci([])
    with pytest.raises(ValueError):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError):
        mean_ci([1.0, 0.0], clusters=["a"])
    with pytest.raises(ValueError):
        mean_ci([1.0, 0.0], level=95)


# --- seeds_ci --------------------------------------------------------------------------------


def test_seeds_ci_hand_and_scipy():
    # val_loss 3.0 3.2 3.1: mean 3.1, sd 0.1, se 0.1/√3 = 0.0577350, t_{0.975, 2} = 4.302653,
    # half-width 0.2484138: [2.8515862, 3.3484138]
    e = seeds_ci([3.0, 3.2, 3.1])
    assert (e.n, e.n_clusters, e.method) == (3, None, "t")
    assert e.value == pytest.approx(3.1, rel=1e-15)
    assert e.se == pytest.approx(0.1 / math.sqrt(3), rel=1e-12)
    assert (e.lo, e.hi) == pytest.approx((2.8515862, 3.3484138), abs=1e-7)
    v = np.array([2.91, 3.05, 2.98, 3.11, 2.87])
    for level in (0.9, 0.95, 0.99):
        lo, hi = st.t.interval(level, len(v) - 1, loc=v.mean(), scale=st.sem(v))
        got = seeds_ci(v, level=level)
        assert (got.lo, got.hi) == pytest.approx((lo, hi), rel=1e-12)


def test_seeds_ci_single_seed():
    e = seeds_ci([3.3])
    assert e.value == 3.3 and e.method == "single-seed" and e.n == 1
    assert math.isnan(e.se) and math.isnan(e.lo) and math.isnan(e.hi)


# --- paired_diff -----------------------------------------------------------------------------


def test_paired_diff_hand_example():
    # a = 1 1 0 1 0 1, b = 1 0 0 0 1 0: d = 0 1 0 1 −1 1, mean 1/3; deviations −1/3 2/3 −1/3
    # 2/3 −4/3 2/3, Σ dev² = (1 + 4 + 1 + 4 + 16 + 4)/9 = 10/3, var = 10/3 / 5 = 2/3,
    # se = sqrt(2/3 / 6) = 1/3. Discordant: a right & b wrong at items 2, 4, 6 (3), a wrong &
    # b right at item 5 (1); exact McNemar p = 2 · P(Bin(4, 1/2) ≤ 1) = 2 · 5/16 = 0.625.
    r = paired_diff([1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 1, 0])
    assert isinstance(r, Paired)
    assert r.diff == pytest.approx(1 / 3, rel=1e-15)
    assert r.se == pytest.approx(1 / 3, rel=1e-12)
    assert (r.lo, r.hi) == pytest.approx((1 / 3 - Z975 / 3, 1 / 3 + Z975 / 3), rel=1e-12)
    assert (r.test, r.p, r.discordant, r.n, r.n_clusters) == ("mcnemar-exact", 0.625, (3, 1), 6,
                                                              None)
    # mde = (1.959964 + 0.841621) · 1/3 = 0.9338617
    assert r.mde == pytest.approx(0.9338617, abs=1e-7)


def _from_table(n11: int, n10: int, n01: int, n00: int) -> tuple[np.ndarray, np.ndarray]:
    """Aligned 0/1 scores with the given 2x2 counts (rows: a right/wrong, columns: b)."""
    a = np.array([1] * (n11 + n10) + [0] * (n01 + n00), float)
    b = np.array([1] * n11 + [0] * n10 + [1] * n01 + [0] * n00, float)
    return a, b


@pytest.mark.parametrize("table", [(5, 0, 0, 7), (2, 3, 1, 0), (10, 10, 2, 30), (0, 0, 5, 1),
                                   (4, 7, 7, 4), (50, 40, 25, 60), (1, 1, 0, 0), (0, 12, 0, 3)])
def test_exact_mcnemar_matches_statsmodels(table):
    n11, n10, n01, n00 = table
    a, b = _from_table(*table)
    r = paired_diff(a, b)
    expected = mcnemar(np.array([[n11, n10], [n01, n00]]), exact=True).pvalue
    assert r.test == "mcnemar-exact"
    assert r.discordant == (n10, n01)
    assert r.p == pytest.approx(expected, rel=1e-12)
    if n10 + n01 == 0:
        assert r.p == 1.0 and r.diff == 0.0


def test_paired_t_matches_scipy():
    rng = np.random.default_rng(3)
    b = rng.normal(size=40)
    a = b + 0.3 + rng.normal(scale=0.8, size=40)
    r = paired_diff(a, b)
    t = st.ttest_rel(a, b)
    assert r.test == "paired-t" and r.discordant is None
    assert r.p == pytest.approx(t.pvalue, rel=1e-12)
    assert r.se == pytest.approx(st.sem(a - b), rel=1e-12)
    assert r.diff == pytest.approx(float(np.mean(a - b)), rel=1e-12)
    # scores in [0, 1] that are not all 0/1 (MC2) are not binary: the t-test
    assert paired_diff([0.3, 1.0, 0.0], [0.2, 0.0, 1.0]).test == "paired-t"


def test_paired_diff_degenerate():
    same = paired_diff([0.4, 0.5, 0.6], [0.4, 0.5, 0.6])
    assert (same.diff, same.se, same.p) == (0.0, 0.0, 1.0)
    shifted = paired_diff([1.5, 2.5, 3.5], [0.5, 1.5, 2.5])  # every difference exactly 1
    assert (shifted.diff, shifted.se, shifted.p) == (1.0, 0.0, 0.0)
    single = paired_diff([0.7], [0.2])
    assert math.isnan(single.se) and math.isnan(single.p) and math.isnan(single.mde)
    with pytest.raises(ValueError):
        paired_diff([1, 0, 1], [1, 0])


def test_paired_diff_clustered_is_a_z_test_on_the_clustered_se():
    rng = np.random.default_rng(4)
    g = np.repeat(np.arange(12), 10)
    b = rng.normal(size=120)
    a = b + 0.2 + np.repeat(rng.normal(scale=0.3, size=12), 10) + rng.normal(size=120)
    r = paired_diff(a, b, clusters=g)
    se = mean_ci(a - b, clusters=g).se
    assert (r.test, r.n, r.n_clusters) == ("clustered-z", 120, 12)
    assert r.se == pytest.approx(se, rel=1e-12)
    assert r.se == pytest.approx(_sm_se(a - b, g), rel=1e-10)
    assert r.p == pytest.approx(2 * st.norm.sf(abs(r.diff) / se), rel=1e-12)
    # 0/1 scores with clusters: the clustered test too, the discordant counts still reported
    ab, bb = (rng.random(120) < 0.6).astype(float), (rng.random(120) < 0.5).astype(float)
    rb = paired_diff(ab, bb, clusters=g)
    assert rb.test == "clustered-z"
    assert rb.discordant == (int(np.sum((ab == 1) & (bb == 0))), int(np.sum((ab == 0) & (bb == 1))))


# --- coverage of the paired CIs --------------------------------------------------------------

DRAWS = 1000


def _binary(rng):
    # cells (a, b) = (1,1) (1,0) (0,1) (0,0) with probabilities .5 .2 .1 .2: E[a − b] = .2 − .1
    cell = rng.choice(4, size=(DRAWS, 300), p=[0.5, 0.2, 0.1, 0.2])
    return (cell <= 1).astype(float), ((cell == 0) | (cell == 2)).astype(float), None, 0.1


def _continuous(rng):
    b = rng.normal(size=(DRAWS, 100))
    a = b + 0.2 + rng.exponential(1.0, size=(DRAWS, 100)) - 1.0  # skewed noise, mean 0
    return a, b, None, 0.2


def _clustered_continuous(rng):
    g, size = 60, 8
    shift = np.repeat(rng.normal(scale=0.4, size=(DRAWS, g)), size, axis=1)
    b = rng.normal(size=(DRAWS, g * size))
    a = b + 0.1 + shift + rng.normal(scale=0.5, size=(DRAWS, g * size))
    return a, b, np.repeat(np.arange(g), size), 0.1


def _clustered_binary(rng):
    g, size = 80, 5
    pb = np.repeat(rng.uniform(0.2, 0.8, size=(DRAWS, g)), size, axis=1)
    pa = pb + np.repeat(rng.uniform(-0.1, 0.3, size=(DRAWS, g)), size, axis=1)  # mean +0.1
    u = rng.random((DRAWS, g * size))
    return (u < pa).astype(float), (u < pb).astype(float), np.repeat(np.arange(g), size), 0.1


@pytest.mark.parametrize("simulate", [_binary, _continuous, _clustered_continuous,
                                      _clustered_binary])
def test_paired_ci_covers_the_true_difference(simulate):
    a, b, clusters, truth = simulate(np.random.default_rng(20240611))
    hits = 0
    for i in range(DRAWS):
        r = paired_diff(a[i], b[i], clusters=clusters)
        hits += r.lo <= truth <= r.hi
    assert 0.93 <= hits / DRAWS <= 0.97
    if clusters is not None and simulate is _clustered_continuous:
        # ignoring the clusters would be over-confident: the CLT interval covers far less
        naive = [paired_diff(a[i], b[i]) for i in range(200)]
        assert np.mean([r.lo <= truth <= r.hi for r in naive]) < 0.9


# --- paired_bootstrap ------------------------------------------------------------------------


def _mean(rows: np.ndarray) -> float:
    return float(np.mean(rows))


def test_paired_bootstrap_of_a_mean_agrees_with_paired_diff():
    rng = np.random.default_rng(5)
    b = rng.normal(size=2000)
    a = b + 0.05 + rng.normal(scale=0.5, size=2000)
    boot = paired_bootstrap(a, b, _mean, n_boot=2000, seed=0)
    clt = paired_diff(a, b)
    assert boot.test == "paired-bootstrap" and boot.n == 2000 and boot.discordant is None
    assert boot.diff == pytest.approx(clt.diff, rel=1e-12)
    assert boot.se == pytest.approx(clt.se, rel=0.1)
    assert boot.lo == pytest.approx(clt.lo, abs=0.25 * clt.se)
    assert boot.hi == pytest.approx(clt.hi, abs=0.25 * clt.se)
    assert boot.mde == pytest.approx(mde(boot.se), rel=1e-12)
    assert boot.p < 0.01 and clt.p < 0.01


def test_paired_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(6)
    # 2-D rows (confidence, correct), a statistic that is not a mean: |mean conf − accuracy|
    a = np.column_stack([rng.random(300), rng.random(300) < 0.5])
    b = np.column_stack([rng.random(300), rng.random(300) < 0.5])

    def gap(rows):
        return abs(float(rows[:, 0].mean() - rows[:, 1].mean()))

    first = paired_bootstrap(a, b, gap, n_boot=300, seed=7)
    assert first == paired_bootstrap(a, b, gap, n_boot=300, seed=7)
    assert first.se != paired_bootstrap(a, b, gap, n_boot=300, seed=8).se
    assert first.diff == pytest.approx(gap(a) - gap(b), rel=1e-12)


def test_paired_bootstrap_resamples_whole_clusters():
    sizes = np.array([3, 5, 1, 7, 4])
    g = np.repeat(np.arange(5), sizes)
    rng = np.random.default_rng(8)
    # column 0 carries the cluster id, so the statistic can see what each replicate drew
    a = np.column_stack([g, rng.random(g.size)])
    b = np.column_stack([g, rng.random(g.size)])
    seen = []

    def checked_mean(rows):
        counts = np.bincount(rows[:, 0].astype(int), minlength=5)
        assert np.all(counts % sizes == 0)  # every cluster drawn k times brings k · its size
        assert np.sum(counts // sizes) == 5  # G clusters per replicate
        seen.append(counts // sizes)
        return float(rows[:, 1].mean())

    r = paired_bootstrap(a, b, checked_mean, n_boot=200, seed=1, clusters=g)
    assert r.n == g.size and r.n_clusters == 5
    assert any(np.any(k == 0) for k in seen)  # some clusters were left out of some replicates


def test_paired_bootstrap_p_floor_and_hand_interval():
    # a = b + 1 on every item: every replicate difference is exactly 1 > 0, so the share ≤ 0 is
    # 0 and p = 1/(B + 1) = 1/200; the percentile interval is [1, 1] and se 0
    b = np.linspace(0, 1, 50)
    r = paired_bootstrap(b + 1.0, b, _mean, n_boot=199, seed=0)
    assert r.p == pytest.approx(1 / 200, rel=1e-12)
    assert (r.lo, r.hi) == pytest.approx((1.0, 1.0), rel=1e-12) and r.se == pytest.approx(0.0)
    same = paired_bootstrap(b, b, _mean, n_boot=50, seed=0)
    assert same.p == 1.0 and same.diff == 0.0


# --- holm and mde ----------------------------------------------------------------------------


def test_holm_hand_example():
    # p = .01 .04 .03 .005, m = 4; sorted .005 .01 .03 .04 times 4 3 2 1 = .02 .03 .06 .04,
    # running maximum .02 .03 .06 .06; back in input order: .03 .06 .06 .02
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)


@pytest.mark.parametrize("pvalues", [
    [0.01, 0.04, 0.03, 0.005],
    [0.02, 0.02, 0.02, 0.5],            # ties
    [0.2, 0.01, 0.01, 0.3, 0.04, 0.04],  # ties in the middle
    [0.9, 0.6, 0.7],                     # capped at 1
    [0.0, 1.0, 0.5],
    [0.03],
    [0.01, float("nan"), 0.04, float("nan"), 0.02],
    list(np.random.default_rng(9).random(25) ** 3),
])
def test_holm_matches_statsmodels(pvalues):
    p = np.asarray(pvalues, float)
    got = np.asarray(holm(pvalues))
    ok = ~np.isnan(p)
    assert np.array_equal(np.isnan(got), ~ok)
    expected = multipletests(p[ok], method="holm")[1]
    assert got[ok] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_holm_edge_cases():
    assert holm([]) == []
    assert all(math.isnan(v) for v in holm([float("nan")] * 2))
    with pytest.raises(ValueError):
        holm([0.5, 1.2])


def test_mde_hand_value():
    # (z_0.975 + z_0.8) · se = (1.959964 + 0.841621) · 0.01 = 0.02801585
    assert mde(0.01) == pytest.approx(0.02801585, abs=1e-8)
    assert mde(0.01) == pytest.approx((Z975 + Z80) * 0.01, rel=1e-12)
    # at 90% power and 99% confidence: (2.575829 + 1.281552) · 0.02 = 0.07714762
    assert mde(0.02, level=0.99, power=0.9) == pytest.approx(0.07714762, abs=1e-8)


# --- fit_power_law ---------------------------------------------------------------------------


def test_fit_power_law_recovers_a_noiseless_curve():
    # L(1e12) = 1.7 + 400 · 1e12^-0.3 = 1.7 + 400 · 10^-3.6 = 1.7 + 0.1004755 = 1.8004755
    truth = PowerLaw(E=1.7, A=400.0, alpha=0.3, n_points=5)
    assert truth(1e12) == pytest.approx(1.8004755, abs=1e-7)
    c = np.logspace(10, 14, 5)
    fit = fit_power_law(c[::-1], truth(c)[::-1])  # order does not matter
    assert fit.n_points == 5
    assert fit.E == pytest.approx(1.7, rel=1e-3)
    assert fit.A == pytest.approx(400.0, rel=1e-3)
    assert fit.alpha == pytest.approx(0.3, rel=1e-3)
    out = fit(c)
    assert isinstance(out, np.ndarray) and out == pytest.approx(truth(c), rel=1e-6)
    assert isinstance(fit(1e12), float)


def test_fit_power_law_refuses_too_few_points_and_bad_values():
    with pytest.raises(ValueError, match="at least 3 distinct compute values") as err:
        fit_power_law([1e12, 1e13], [2.0, 1.9])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="at least 3 distinct"):
        fit_power_law([1e12, 1e12, 1e13, 1e13], [2.0, 2.01, 1.9, 1.91])
    with pytest.raises(ValueError):
        fit_power_law([1e12, 1e13, 0.0], [2.0, 1.9, 1.8])
    with pytest.raises(ValueError):
        fit_power_law([1e12, 1e13, 1e14], [2.0, float("nan"), 1.8])


# --- compute_multiplier and multiplier_ci ----------------------------------------------------

BASE_C = np.array([1e17, 3e17, 1e18, 3e18, 1e19])
BASE_L = 2.0 + 40.0 * BASE_C ** -0.08  # 3.7 … 3.1, with an irreducible term (not a pure power)


def test_a_run_against_itself_is_exactly_one():
    for c, l in zip(BASE_C, BASE_L):
        m = compute_multiplier(BASE_C, BASE_L, c, l)
        assert m == Multiplier(1.0, float(c), False)


def test_hand_example_interpolates_in_log_log():
    # baseline (1e18, 3.0), (4e18, 2.5); the architecture reaches 2.7 at 1e18:
    # t = ln(2.7/3) / ln(2.5/3) = −0.1053605 / −0.1823216 = 0.5778829,
    # C_b = 1e18 · 4^0.5778829 = 1e18 · e^0.8011158 = 2.2280257e18, value 2.2280257
    m = compute_multiplier([1e18, 4e18], [3.0, 2.5], 1e18, 2.7)
    assert m.value == pytest.approx(2.2280257, abs=1e-7)
    assert m.baseline_compute == pytest.approx(2.2280257e18, rel=1e-7)
    assert not m.extrapolated


def test_a_baseline_that_needs_twice_the_compute_gives_two():
    # the architecture's curve is the baseline's at twice the compute: L_arch(C) = L_base(2C)
    for c, l in zip(BASE_C, BASE_L):  # on the baseline's measured points: exactly 2
        assert compute_multiplier(BASE_C, BASE_L, c / 2, l).value == 2.0
    # between points, on a pure power law (straight in log-log, so interpolation is exact)
    base_l = 5.0 * BASE_C ** -0.05
    for c in (2e17, 7e17, 4e18):
        m = compute_multiplier(BASE_C, base_l, c, 5.0 * (2 * c) ** -0.05)
        assert m.value == pytest.approx(2.0, rel=1e-12) and not m.extrapolated


def test_outside_the_baseline_range_is_extrapolated():
    base_l = 5.0 * BASE_C ** -0.05
    better = compute_multiplier(BASE_C, base_l, 1e19, 5.0 * 4e19 ** -0.05)
    assert better.extrapolated and better.value == pytest.approx(4.0, rel=1e-12)
    worse = compute_multiplier(BASE_C, base_l, 1e17, 5.0 * 2.5e16 ** -0.05)
    assert worse.extrapolated and worse.value == pytest.approx(0.25, rel=1e-12)
    lone = compute_multiplier([1e18], [3.0], 1e18, 2.9)
    assert lone.extrapolated and math.isnan(lone.value)
    assert compute_multiplier([1e18], [3.0], 5e17, 3.0).value == 2.0


def test_a_noisy_baseline_is_read_on_its_lower_envelope():
    # losses 3.0 2.6 2.8 2.2 (the third run came out worse than the second): the envelope is
    # (1e18, 3.0) (2e18, 2.6) (8e18, 2.2), the 4e18 point dropped as a flat stretch at 2.6.
    # A loss of 2.6 is reached at 2e18, not ambiguously also near 4e18; 2.4 lies on the
    # segment 2e18 → 8e18: t = ln(2.4/2.6) / ln(2.2/2.6) = 0.4791, C_b = 2e18 · 4^0.4791
    c = [4e18, 1e18, 8e18, 2e18]  # unsorted on purpose
    l = [2.8, 3.0, 2.2, 2.6]
    assert compute_multiplier(c, l, 1e18, 2.6).value == 2.0
    t = math.log(2.4 / 2.6) / math.log(2.2 / 2.6)
    m = compute_multiplier(c, l, 1e18, 2.4)
    assert m.value == pytest.approx(2.0 * 4.0 ** t, rel=1e-12) and not m.extrapolated
    # the dropped point's own loss (2.8) is read between 1e18 and 2e18, not at 4e18
    assert compute_multiplier(c, l, 1e18, 2.8).baseline_compute < 2e18


def test_multiplier_ci_hand_and_scipy():
    # 2, 4, 8: logs ln2 · (1, 2, 3), mean 2 ln2 → geometric mean 4; sd of logs ln2, se_log
    # ln2/√3 = 0.4001887, t_{0.975,2} = 4.302653, half 1.7218724:
    # [e^(1.3862944 − 1.7218724), e^(1.3862944 + 1.7218724)] = [0.7149242, 22.379993];
    # se = 4 · 0.4001887 = 1.6007548
    e = multiplier_ci([2.0, 4.0, 8.0])
    assert (e.n, e.method) == (3, "geometric-t")
    assert e.value == pytest.approx(4.0, rel=1e-12)
    assert e.se == pytest.approx(1.6007548, abs=1e-7)
    assert (e.lo, e.hi) == pytest.approx((0.7149242, 22.379993), rel=1e-7)
    v = np.array([1.8, 2.1, 1.95, 2.3])
    lo, hi = st.t.interval(0.95, 3, loc=np.log(v).mean(), scale=st.sem(np.log(v)))
    got = multiplier_ci(v)
    assert (got.lo, got.hi) == pytest.approx((math.exp(lo), math.exp(hi)), rel=1e-12)
    one = multiplier_ci([2.0])
    assert one.value == 2.0 and one.method == "single-seed" and math.isnan(one.lo)
    with pytest.raises(ValueError):
        multiplier_ci([2.0, -1.0])
