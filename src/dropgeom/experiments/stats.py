"""Statistics shared by every claim: paired comparisons, intervals, multiple-comparison correction, grouped tests.

One module, so that C1, C2 and C3 decide by the same rules (docs/theory.md, section "Statistics of the verdicts").
Everything here wraps ``scipy.stats`` and ``statsmodels``; nothing is hand-written except the bookkeeping.

- :func:`paired` compares two measurements made on the same seeds (paired differences or, for positive
  quantities, paired log-ratios): mean, Student-t interval, two-sided p-value and the effect size
  :math:`d_z = \\bar d / s_d` (Cohen's d for paired data).
- :func:`holm` adjusts a family of p-values (Holm 1979, ``statsmodels.stats.multitest.multipletests``), so that
  the family-wise error rate of a claim's tests is at most ``alpha``.
- :func:`geometric_mean_ci` gives a positive quantity's interval on the log scale (never a negative lower bound).
- :func:`within_group_permutation` and :func:`mixed_slope` test a dependence *within* groups (settings), so that a
  correlation carried by differences between groups is not mistaken for an effect (no pseudo-replication).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a = np.exp(rng.normal(1.0, 0.1, size=8)); b = np.exp(rng.normal(0.0, 0.1, size=8))
    >>> c = paired(a, b, log=True)
    >>> round(c.estimate), c.p_value < 1e-6, c.lo > 0
    (1, True, True)
    >>> [round(p, 3) for p in holm([0.01, 0.04, 0.03])]
    [0.03, 0.06, 0.06]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

__all__ = [
    "Comparison",
    "paired",
    "holm",
    "adjust",
    "geometric_mean_ci",
    "within_group_permutation",
    "centred_ranks",
    "mixed_slope",
    "GroupedTest",
    "finite",
    "mean_ci",
    "spearman",
]


def _floats(values: Sequence[Any], name: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in values], dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a sequence of numbers: {err}") from None
    return arr


@dataclass(frozen=True)
class Comparison:
    """A paired comparison ``a`` vs ``b`` over matched units (seeds).

    ``estimate`` is the mean paired difference (or mean log-ratio ``log(a/b)`` when ``log``), ``lo``/``hi`` its
    two-sided Student-t interval at ``level``, ``p_value`` the paired t-test's two-sided p-value, ``p_adjusted`` the
    p-value after the claim's multiple-comparison correction (equal to ``p_value`` until :func:`adjust` is applied),
    ``effect_size`` Cohen's :math:`d_z` and ``n`` the number of finite pairs.
    """

    name: str
    estimate: float
    lo: float
    hi: float
    p_value: float
    p_adjusted: float
    effect_size: float
    n: int
    log: bool = False
    level: float = 0.95

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether the (adjusted) p-value is below ``alpha``."""
        return bool(math.isfinite(self.p_adjusted) and self.p_adjusted < alpha)

    @property
    def sign(self) -> int:
        """+1 / -1 for a significant effect up / down at 5% (adjusted), 0 otherwise."""
        if not self.significant():
            return 0
        return 1 if self.estimate > 0 else -1

    def ratio(self) -> Tuple[float, float, float]:
        """For a log comparison: the geometric-mean ratio ``a/b`` and its interval (``exp`` of the log scale)."""
        if not self.log:
            raise ValueError(f"comparison {self.name!r} is a difference, not a log-ratio")
        return math.exp(self.estimate), math.exp(self.lo), math.exp(self.hi)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def paired(a: Sequence[Any], b: Sequence[Any], *, log: bool = False, name: str = "", level: float = 0.95) -> Comparison:
    r"""Paired comparison of ``a`` and ``b`` (same length, entry ``i`` of each from the same seed).

    With ``log=True`` the unit of analysis is :math:`d_i = \log(a_i / b_i)` (for positive quantities such as
    curvatures, so that the comparison is a ratio and does not depend on the quantity's scale); otherwise
    :math:`d_i = a_i - b_i`. Pairs with a non-finite member (or, with ``log``, a non-positive one) are dropped.
    With fewer than two pairs, or differences without spread (``s_d = 0`` up to the rounding of ``d``), there is no
    test: the p-values and ``d_z`` are NaN (never significant, and left out of a Holm family).

    .. math::  \bar d \pm t_{n-1,\,(1+\mathrm{level})/2}\, s_d/\sqrt n,\qquad d_z = \bar d / s_d

    Raises:
        ValueError: if ``a`` and ``b`` differ in length or ``level`` is not in (0, 1).
        TypeError: if an entry is not a number.

    Example:
        >>> c = paired([2.0, 3.0, 4.0, 5.0], [1.0, 1.9, 3.2, 3.9])
        >>> round(c.estimate, 3), c.n
        (1.0, 4)
    """
    from scipy import stats

    x, y = _floats(a, "a"), _floats(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired comparison needs as many values in a as in b, got {x.size} and {y.size}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    ok = np.isfinite(x) & np.isfinite(y)
    if log:
        ok &= (x > 0) & (y > 0)
    d = np.log(x[ok] / y[ok]) if log else (x[ok] - y[ok])
    n = int(d.size)
    nan = float("nan")
    if n == 0:
        return Comparison(name, nan, nan, nan, nan, nan, nan, 0, log, level)
    mean = float(d.mean())
    if n == 1:
        return Comparison(name, mean, -math.inf, math.inf, nan, nan, nan, 1, log, level)
    sd = float(d.std(ddof=1))
    # the rounding of d itself: log(x/y) is exact to a few eps absolute, x - y to a few eps of max(|x|, |y|)
    scale = float(np.abs(d).max()) + (1.0 if log else float(np.abs(x[ok]).max() + np.abs(y[ok]).max()))
    if sd <= 16 * np.finfo(float).eps * scale:
        # No spread: the t statistic is 0/0 or +-inf and the test says nothing about the seeds' variability (identical
        # differences mean duplicated seeds or a saturated quantity, not certainty); no p-value, never significant.
        # Identical differences can leave a rounding-level s_d (three times 0.1: the mean is 0.1 + 1 ulp, s_d ~ 1e-17,
        # p ~ 1e-33), hence a tolerance, not s_d == 0.
        return Comparison(name, mean, mean, mean, nan, nan, nan, n, log, level)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))
    p = float(stats.ttest_1samp(d, 0.0).pvalue)
    return Comparison(name, mean, mean - half, mean + half, p, p, mean / sd, n, log, level)


def holm(p_values: Sequence[Any], alpha: float = 0.05) -> List[float]:
    """Holm-adjusted p-values (``statsmodels.stats.multitest.multipletests(method="holm")``).

    NaN p-values (tests that could not be made) are kept as NaN and do not count in the family.

    Raises:
        ValueError: if ``alpha`` is not in (0, 1).

    Example:
        >>> holm([0.01, float("nan"), 0.02])
        [0.02, nan, 0.02]
    """
    from statsmodels.stats.multitest import multipletests

    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    p = _floats(p_values, "p_values")
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=alpha, method="holm")[1]
    return [float(v) for v in out]


def adjust(comparisons: Sequence[Comparison], alpha: float = 0.05) -> List[Comparison]:
    """The comparisons of one family (one claim) with Holm-adjusted p-values filled in.

    Example:
        >>> cs = adjust([paired([1, 2, 3.5], [0, 0, 0]), paired([1, -1, 0.5], [0, 0, 0])])
        >>> all(c.p_adjusted >= c.p_value for c in cs)
        True
    """
    adj = holm([c.p_value for c in comparisons], alpha=alpha)
    return [replace(c, p_adjusted=q) for c, q in zip(comparisons, adj)]


def geometric_mean_ci(values: Sequence[Any], level: float = 0.95) -> Tuple[float, float, float]:
    """Geometric mean of the positive finite values and its Student-t interval on the log scale.

    For positive quantities (curvatures, traces): the interval is never negative. Non-positive values are
    dropped (report them separately, e.g. as "zero to rounding").

    Raises:
        ValueError: if ``level`` is not in (0, 1).

    Example:
        >>> g, lo, hi = geometric_mean_ci([1.0, 10.0, 100.0])
        >>> round(g, 6), lo > 0
        (10.0, True)
    """
    from scipy import stats

    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = _floats(values, "values")
    x = x[np.isfinite(x) & (x > 0)]
    nan = float("nan")
    if x.size == 0:
        return nan, nan, nan
    logs = np.log(x)
    m = float(logs.mean())
    if x.size == 1:
        return math.exp(m), 0.0, math.inf
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * logs.std(ddof=1) / math.sqrt(x.size))
    return math.exp(m), math.exp(m - half), math.exp(m + half)


@dataclass(frozen=True)
class GroupedTest:
    """A within-group dependence test: ``statistic`` (slope or correlation), its interval, p-value and group count."""

    method: str
    statistic: float
    lo: float
    hi: float
    p_value: float
    n: int
    groups: int

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _group_ids(groups: Sequence[Any]) -> np.ndarray:
    keys: Dict[Any, int] = {}
    return np.asarray([keys.setdefault(g, len(keys)) for g in groups], dtype=int)


def centred_ranks(xs: np.ndarray, ys: np.ndarray, members: Sequence[np.ndarray]) -> List[Tuple[np.ndarray, np.ndarray]]:
    r"""Per group (``members``: the index arrays of the groups, in the caller's order), the ranks of ``xs`` and ``ys``
    taken inside the group and centred, :math:`(r_x - \bar r_{x,g},\ r_y - \bar r_{y,g})`: the terms of the
    within-group Spearman correlation (:func:`within_group_permutation`; C2's block bootstrap resamples them).

    Raises:
        IndexError: an index in ``members`` outside ``xs`` / ``ys``.

    Example:
        >>> [tuple(r.tolist()) for r in centred_ranks(np.array([3.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0]), [np.arange(3)])[0]]
        [(1.0, -1.0, 0.0), (-1.0, 0.0, 1.0)]
    """
    from scipy.stats import rankdata

    out = []
    for m in members:
        rx, ry = rankdata(xs[m]), rankdata(ys[m])
        out.append((rx - rx.mean(), ry - ry.mean()))
    return out


def within_group_permutation(
    x: Sequence[Any], y: Sequence[Any], groups: Sequence[Any], *, n_permutations: int = 2000, seed: int = 0
) -> GroupedTest:
    r"""Permutation test of a monotone dependence of ``y`` on ``x`` *within* groups.

    Statistic: Spearman's correlation of the within-group ranks centred per group,
    :math:`\rho_w = \mathrm{corr}(r_x - \bar r_{x,g},\ r_y - \bar r_{y,g})` with ranks taken inside each group. Its null
    distribution is obtained by permuting ``y`` inside each group (exchangeability within a setting), so a
    correlation carried only by differences between groups gives no effect. Groups with fewer than 2 finite
    pairs are dropped. ``lo``/``hi`` are NaN (a permutation test gives no interval).

    Raises:
        ValueError: on lengths that disagree or ``n_permutations < 100``.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(1)
        >>> g = np.repeat(np.arange(6), 8); x = g + rng.normal(size=48) * 0.1; y = -g + rng.normal(size=48)
        >>> within_group_permutation(x, y, g).p_value > 0.05     # between-group correlation only
        True
    """
    xs, ys = _floats(x, "x"), _floats(y, "y")
    gid = _group_ids(list(groups))
    if not (xs.shape == ys.shape == gid.shape):
        raise ValueError(f"x, y and groups must have the same length, got {xs.size}, {ys.size}, {gid.size}")
    if n_permutations < 100:
        raise ValueError(f"n_permutations must be at least 100, got {n_permutations}")
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys, gid = xs[ok], ys[ok], gid[ok]
    members = [np.flatnonzero(gid == g) for g in np.unique(gid)]
    members = [m for m in members if m.size >= 2]
    nan = float("nan")
    if not members:
        return GroupedTest("within-group permutation (Spearman)", nan, nan, nan, nan, 0, 0)
    parts = centred_ranks(xs, ys, members)
    rx = np.concatenate([px for px, _ in parts])
    ry_parts = [py for _, py in parts]

    def stat(parts: List[np.ndarray]) -> float:
        ry = np.concatenate(parts)
        den = math.sqrt(float((rx**2).sum()) * float((ry**2).sum()))
        return float((rx * ry).sum() / den) if den > 0 else 0.0

    observed = stat(ry_parts)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_permutations):
        if abs(stat([rng.permutation(r) for r in ry_parts])) >= abs(observed) - 1e-12:
            hits += 1
    p = (hits + 1) / (n_permutations + 1)
    n = int(sum(m.size for m in members))
    return GroupedTest("within-group permutation (Spearman)", observed, nan, nan, p, n, len(members))


def mixed_slope(y: Sequence[Any], x: Sequence[Any], groups: Sequence[Any], level: float = 0.95) -> GroupedTest:
    r"""Slope of ``y`` on ``x`` in a linear mixed model with a random intercept per group.

    :math:`y_{gi} = \beta_0 + \beta_1 x_{gi} + u_g + \varepsilon_{gi}`, fitted by REML with
    ``statsmodels.formula.api.mixedlm``; returns :math:`\beta_1`, its Wald interval and p-value. The random
    intercept absorbs differences between groups, so :math:`\beta_1` is driven by variation within groups.

    Raises:
        ValueError: on lengths that disagree or fewer than 2 groups.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(2)
        >>> g = np.repeat(np.arange(5), 10); x = rng.normal(size=50); y = 2 * x + g + 0.1 * rng.normal(size=50)
        >>> round(mixed_slope(y, x, g).statistic, 1)
        2.0
    """
    import warnings

    import pandas as pd
    import statsmodels.formula.api as smf

    ys, xs = _floats(y, "y"), _floats(x, "x")
    gid = _group_ids(list(groups))
    if not (xs.shape == ys.shape == gid.shape):
        raise ValueError(f"y, x and groups must have the same length, got {ys.size}, {xs.size}, {gid.size}")
    ok = np.isfinite(xs) & np.isfinite(ys)
    df = pd.DataFrame({"y": ys[ok], "x": xs[ok], "g": gid[ok]})
    if df["g"].nunique() < 2:
        raise ValueError("a mixed model needs at least 2 groups")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny designs; the fit is checked below
        fit = smf.mixedlm("y ~ x", df, groups=df["g"]).fit(reml=True)
    beta = float(fit.params["x"])
    lo, hi = (float(v) for v in fit.conf_int(alpha=1 - level).loc["x"])
    return GroupedTest(
        "mixed model, random intercept per group", beta, lo, hi, float(fit.pvalues["x"]), int(len(df)), int(df["g"].nunique())
    )


# --------------------------------------------------------------------------- plain summaries
def finite(values: Sequence[Any]) -> List[float]:
    """The finite floats among ``values`` (NaN, inf and non-numbers dropped)."""
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def mean_ci(values: Sequence[Any], level: float = 0.95) -> Tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval ``(mean, lo, hi)`` of the finite values.

    One value gives an infinite interval; none gives NaNs.
    """
    from scipy import stats

    xs = np.asarray(finite(values), dtype=float)
    if xs.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(xs.mean())
    if xs.size == 1:
        return mean, float("-inf"), float("inf")
    half = float(stats.t.ppf(0.5 + level / 2, xs.size - 1) * xs.std(ddof=1) / math.sqrt(xs.size))
    return mean, mean - half, mean + half


def spearman(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float]:
    """Spearman's rank correlation and its two-sided p-value (NaN when fewer than 3 finite pairs)."""
    from scipy import stats

    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return float("nan"), float("nan")
    a, b = zip(*pairs)
    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan"), float("nan")
    res = stats.spearmanr(a, b)
    return float(res.statistic if hasattr(res, "statistic") else res[0]), float(res.pvalue)
