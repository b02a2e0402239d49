r"""C2's statistics: a dependence *within* settings, with the sign fixed in advance.

The C2 design moves curvature with one knob inside one architecture (a
"setting" here is one architecture and one seed: the same data split and
initialisation direction, only the knob changes). A pooled correlation over
settings mixes differences between settings with the effect of curvature
(pseudo-replication); the decision therefore rests on tests whose null
distribution removes the settings:

* :func:`dropgeom.experiments.stats.mixed_slope` -- the slope of the outcome on
  ``log`` curvature in a linear mixed model with a random intercept per setting;
* :func:`dropgeom.experiments.stats.within_group_permutation` -- Spearman's
  correlation of within-setting ranks, with ``y`` permuted inside settings.

The pooled Spearman correlation is returned as a description only.

:func:`rounding_zero` reports curvatures at rounding level as exactly zero
(they are then left out of any log scale, never clamped to ``1e-300``).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> g = np.repeat(np.arange(8), 5)
    >>> x = g + 0.3 * rng.normal(size=40)            # curvature differs between settings ...
    >>> y = -g + rng.normal(size=40)                 # ... and so does the outcome, but not within them
    >>> a = within_setting_analysis(np.exp(x), y, g, expected_sign=+1)
    >>> a["label"], a["pooled_spearman"] < -0.5
    ('no effect', True)
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np

from . import stats

__all__ = ["rounding_zero", "within_setting_analysis", "EFFECT_LABELS"]

#: outcomes of :func:`within_setting_analysis`
EFFECT_LABELS = ("predicted sign", "opposite sign", "no effect", "too little data")


def rounding_zero(values: Sequence[Any], reference: float, rtol: float = 1e-10) -> List[float]:
    """``values`` with every entry at or below ``rtol * reference`` in magnitude replaced by exactly 0.0.

    ``reference`` is the scale of the quantity (e.g. the largest curvature of the run, or
    the Fisher term it is compared with); values at rounding level relative to it carry no
    information about their size and must not be put on a log axis.

    Raises:
        ValueError: if ``reference`` is not finite or ``rtol`` is not in (0, 1).

    Example:
        >>> rounding_zero([3e-19, 0.5, -1e-17], reference=1.0)
        [0.0, 0.5, 0.0]
    """
    if not math.isfinite(float(reference)):
        raise ValueError(f"reference must be finite, got {reference!r}")
    if not 0.0 < rtol < 1.0:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    tol = rtol * abs(float(reference))
    return [0.0 if math.isfinite(float(v)) and abs(float(v)) <= tol else float(v) for v in values]


def within_setting_analysis(
    curvature: Sequence[Any],
    outcome: Sequence[Any],
    settings: Sequence[Any],
    expected_sign: int,
    *,
    alpha: float = 0.05,
    n_permutations: int = 2000,
    seed: int = 0,
) -> Dict[str, Any]:
    r"""Does ``outcome`` depend on ``log curvature`` within settings, with the sign fixed in advance?

    Positive curvatures only enter (zeros, i.e. rounding level, are dropped from the log scale
    and counted in ``zeros``). Two within-setting tests:

    .. math:: y_{si} = \beta_0 + \beta_1 \log\gamma_{si} + u_s + \varepsilon_{si}

    (mixed model, random intercept :math:`u_s` per setting, ``log curvature`` centred per setting
    so that :math:`\beta_1` is the within-setting slope; its slope is the effect size, its
    Wald p-value is anti-conservative on small designs and is only reported) and a permutation
    test of the within-setting rank correlation, which decides (exact under exchangeability
    within settings, whatever the design's size): ``"predicted sign"`` when its p-value is
    below ``alpha`` and the within-setting correlation has ``expected_sign``; ``"opposite sign"`` when significant the other way;
    ``"no effect"`` otherwise; ``"too little data"`` with fewer than 2 settings holding 2 runs.
    The pooled Spearman correlation (all runs together) is returned for description only.

    Raises:
        ValueError: if ``expected_sign`` is not +1 or -1, or the lengths disagree.

    Example: see the module docstring.
    """
    if expected_sign not in (1, -1):
        raise ValueError(f"expected_sign must be +1 or -1 (fixed in advance from theory), got {expected_sign!r}")
    c = np.asarray([float(v) for v in curvature], dtype=float)
    y = np.asarray([float(v) for v in outcome], dtype=float)
    g = list(settings)
    if not (c.size == y.size == len(g)):
        raise ValueError(f"curvature, outcome and settings must have the same length, got {c.size}, {y.size}, {len(g)}")
    ok = np.isfinite(c) & np.isfinite(y) & (c > 0)
    zeros = int(np.sum(np.isfinite(c) & (c <= 0)))
    logc, yy, gg = np.log(c[ok]), y[ok], [g[i] for i in np.flatnonzero(ok)]
    rho, p_rho = _spearman(logc, yy)
    counts: Dict[Any, int] = {}
    for s in gg:
        counts[s] = counts.get(s, 0) + 1
    usable = [s for s, k in counts.items() if k >= 2]
    out: Dict[str, Any] = {
        "expected_sign": expected_sign,
        "n": int(ok.sum()),
        "zeros": zeros,
        "settings": len(usable),
        "pooled_spearman": rho,
        "pooled_spearman_p": p_rho,
    }
    nan = float("nan")
    if len(usable) < 2:
        out.update(
            label="too little data",
            slope=nan,
            slope_lo=nan,
            slope_hi=nan,
            p_value=nan,
            method="none",
            within_spearman=nan,
            within_spearman_p=nan,
        )
        return out
    perm = stats.within_group_permutation(logc, yy, gg, n_permutations=n_permutations, seed=seed)
    out["within_spearman"], out["within_spearman_p"] = perm.statistic, perm.p_value
    out.update(p_value=perm.p_value, method=perm.method)
    out.update(_within_slope(logc, yy, gg, usable))
    estimate = perm.statistic
    p = out["p_value"]
    if math.isfinite(p) and p < alpha and estimate != 0:
        out["label"] = "predicted sign" if np.sign(estimate) == expected_sign else "opposite sign"
    else:
        out["label"] = "no effect"
    return out


def _within_slope(logc: np.ndarray, yy: np.ndarray, gg: List[Any], usable: List[Any]) -> Dict[str, float]:
    """The mixed model's within-setting slope (an effect size in outcome units per unit of log curvature),
    its interval and Wald p-value; NaN on a singular design (the permutation test still decides)."""
    nan = float("nan")
    try:
        if np.allclose(yy, yy[0]) or np.allclose(logc, logc[0]):
            raise ValueError("constant data")
        # log curvature centred per setting: the slope is then the within-setting estimator only (a random
        # intercept alone would mix in the between-setting slope, Mundlak 1978)
        gidx = np.asarray([usable.index(s) if s in usable else -1 for s in gg])
        centred = logc.copy()
        for k in range(len(usable)):
            centred[gidx == k] -= logc[gidx == k].mean()
        mixed = stats.mixed_slope(yy, centred, gg)
        return dict(slope=mixed.statistic, slope_lo=mixed.lo, slope_hi=mixed.hi, slope_p=mixed.p_value)
    except (ValueError, np.linalg.LinAlgError):
        return dict(slope=nan, slope_lo=nan, slope_hi=nan, slope_p=nan)


def _spearman(x: np.ndarray, y: np.ndarray) -> "tuple[float, float]":
    from scipy import stats as sps

    if x.size < 3 or np.unique(x).size < 2 or np.unique(y).size < 2:
        return float("nan"), float("nan")
    r = sps.spearmanr(x, y)
    return float(r.statistic if hasattr(r, "statistic") else r[0]), float(r.pvalue)
