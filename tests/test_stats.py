"""The shared statistics against independent references (scipy's paired t-test, Holm by its definition, closed forms)."""

import math

import numpy as np
import pytest
from scipy import stats as st

from dropgeom.experiments.stats import adjust, geometric_mean_ci, holm, mixed_slope, paired, within_group_permutation


def test_paired_matches_scipy_ttest_rel_and_interval():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 1.0, 12), rng.normal(0.3, 1.0, 12)
    c = paired(a, b)
    ref = st.ttest_rel(a, b)
    d = a - b
    assert c.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert c.estimate == pytest.approx(d.mean(), rel=1e-12)
    half = st.t.ppf(0.975, 11) * d.std(ddof=1) / math.sqrt(12)
    assert (c.lo, c.hi) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-12)
    assert c.effect_size == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-12)


def test_paired_log_ratio_is_scale_free_and_drops_bad_pairs():
    a, b = np.array([2.0, 4.0, 8.0, 3.0, float("nan")]), np.array([1.0, 1.5, 2.0, 2.5, 1.0])
    c1, c10 = paired(a, b, log=True), paired(10 * a, 10 * b, log=True)
    assert c1.n == 4 and c1.estimate == pytest.approx(np.log(a[:4] / b[:4]).mean())
    assert (c1.estimate, c1.lo, c1.hi, c1.p_value) == pytest.approx((c10.estimate, c10.lo, c10.hi, c10.p_value))
    g, lo, hi = c1.ratio()
    assert lo < g < hi and g == pytest.approx(math.exp(c1.estimate))
    with pytest.raises(ValueError, match="as many values"):
        paired([1, 2], [1])
    with pytest.raises(ValueError, match="difference, not a log-ratio"):
        paired([1, 2, 3], [0, 1, 1]).ratio()


def test_holm_by_definition():
    p = [0.01, 0.04, 0.03, 0.5]
    order = np.argsort(p)
    m = len(p)
    ref = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        ref[i] = running
    assert holm(p) == pytest.approx(list(ref))
    out = holm([0.2, float("nan")])
    assert out[0] == pytest.approx(0.2) and math.isnan(out[1])
    cs = adjust([paired([1.0, 2.0, 3.0], [0.0, 0.1, 0.0]), paired([0.5, -0.2, 0.1], [0.0, 0.0, 0.0])])
    assert [c.p_adjusted for c in cs] == pytest.approx(holm([c.p_value for c in cs]))


def test_geometric_mean_ci_positive_and_matches_log_scale_t():
    x = np.array([0.5, 2.0, 8.0, 1.0])
    g, lo, hi = geometric_mean_ci(x)
    logs = np.log(x)
    half = st.t.ppf(0.975, 3) * logs.std(ddof=1) / 2.0
    assert g == pytest.approx(math.exp(logs.mean()))
    assert (lo, hi) == pytest.approx((math.exp(logs.mean() - half), math.exp(logs.mean() + half)))
    assert lo > 0


def test_within_group_permutation_separates_within_from_between():
    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(8), 6)
    # between-group correlation only: y follows the group's x level, not x within the group
    x = g + 0.3 * rng.normal(size=g.size)
    y = -2.0 * g + rng.normal(size=g.size)
    assert abs(st.spearmanr(x, y).statistic) > 0.8  # pooled: strongly "significant"
    assert within_group_permutation(x, y, g, seed=1).p_value > 0.05
    # a real within-group dependence is found
    y2 = -3.0 * (x - g) + 0.3 * rng.normal(size=g.size) + 5 * g
    t = within_group_permutation(x, y2, g, seed=1)
    assert t.p_value < 0.01 and t.statistic < -0.5 and t.groups == 8


def test_mixed_slope_recovers_within_slope_not_between():
    rng = np.random.default_rng(7)
    g = np.repeat(np.arange(10), 8)
    level = rng.normal(size=10)[g] * 5
    x = level + rng.normal(size=g.size)
    y = 1.5 * (x - level) - 4.0 * level + 0.2 * rng.normal(size=g.size)
    t = mixed_slope(y, x, g)
    assert t.lo < 1.5 < t.hi and t.p_value < 1e-6
    with pytest.raises(ValueError, match="2 groups"):
        mixed_slope([1.0, 2.0, 3.0], [1.0, 2.0, 4.0], [0, 0, 0])


def test_paired_without_spread_has_no_test_and_is_never_significant():
    """Identical differences (two seeds giving the same ratio) are not certainty: no p-value, not counted by Holm.
    The old code returned p = 0 here, which the C1 rule would have counted as a significant seed-level effect."""
    c = paired([2.0, 4.0], [1.0, 2.0], log=True)
    assert c.n == 2 and math.isclose(c.ratio()[0], 2.0)
    assert math.isnan(c.p_value) and math.isnan(c.p_adjusted) and math.isnan(c.effect_size)
    fam = adjust([c, paired([1.0, 2.0, 3.5], [0.0, 0.0, 0.0])])
    assert math.isnan(fam[0].p_adjusted) and fam[1].p_adjusted == fam[1].p_value


def test_paired_identical_differences_up_to_rounding_have_no_test():
    """Identical differences whose mean is not exactly representable (0.1 three times: the mean is 0.1 + 1 ulp) left
    a rounding-level s_d of ~1e-17, so the old ``sd == 0`` check missed them and gave p ~ 1e-33 (significant); the
    same for log-ratios equal up to rounding (2.2/2 and 1.1/1)."""
    for c in (
        paired([0.1, 0.1, 0.1], [0.0, 0.0, 0.0]),
        paired([1.1, 2.2, 3.3, 1.1, 2.2], [1.0, 2.0, 3.0, 1.0, 2.0], log=True),
        paired([0.3] * 7, [0.0] * 7),
    ):
        assert math.isnan(c.p_value) and math.isnan(c.effect_size) and not c.significant(), c
        assert c.lo == c.hi == c.estimate
    assert paired([0.1, 0.1, 0.1 + 1e-9], [0.0, 0.0, 0.0]).p_value < 1e-6  # a real, tiny spread still has a test
