r"""C2's rule for an absence and for its manipulation check (:data:`~dropgeom.experiments.c2_curvature_strength.RULE`).

* ``not supported`` asserts that the curvature share does not depend on curvature within blocks; a non-significant
  test does not show that. It needs the 95% interval of the deciding statistic (the within-block rank correlation of
  the share with log curvature, :func:`block_bootstrap`) inside ``(-SESOI, SESOI)``, a smallest effect of interest
  fixed before the data, over at least :data:`MIN_RUNS` runs *in the test* and :data:`MIN_BLOCKS` blocks.
* The interval resamples whole setting-seed blocks with replacement (the blocks are the independent units of the
  within-block permutation test, and the statistic is the same pooled within-block correlation of centred ranks), a
  percentile interval; with fewer than 8 blocks a block bootstrap has too few distinct resamples (35 with 4 blocks)
  for a 95% interval, hence :data:`MIN_BLOCKS`.
* The manipulation check (:func:`knob_check`) is made per setting (architecture), its blocks being the seeds, Holm
  over the settings: settings in which the knob moves curvature in opposite directions cannot cancel. The knob
  "moved the curvature" when it moved it significantly (either sign) in *every* setting (the verdict pools the blocks
  of every setting, so each must carry a manipulation) and, in every setting, the geometric mean curvature of one
  initial scale is at least :data:`MIN_SPAN` times that of another (a range a dependence could show over).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> g = np.repeat(np.arange(10), 5); x = rng.normal(size=50); y = rng.normal(size=50)
    >>> rho, lo, hi, n, blocks = block_bootstrap(x, y, g)
    >>> lo < rho < hi, n, blocks
    (True, 50, 10)
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from .stats import centred_ranks, holm, within_group_permutation

__all__ = ["SESOI", "MIN_RUNS", "MIN_BLOCKS", "MIN_SPAN", "block_bootstrap", "knob_check"]

#: smallest within-block rank correlation of interest (fixed 2026-12-05, before re-reading any run's interval)
SESOI = 0.3
#: runs in the deciding test and setting-seed blocks that ``not supported`` needs
MIN_RUNS, MIN_BLOCKS = 20, 8
#: the knob must move the geometric mean curvature by at least this factor within every setting
MIN_SPAN = 2.0


def _blocks(x: Sequence[Any], y: Sequence[Any], groups: Sequence[Any]) -> List[np.ndarray]:
    """Per block with >= 2 finite pairs (in order of first appearance): ``[Sxy, Sxx, Syy, n]`` of its centred ranks."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if not xs.shape == ys.shape == (len(groups),):
        raise ValueError(f"x, y and groups must have the same length, got {xs.size}, {ys.size}, {len(groups)}")
    ok = np.isfinite(xs) & np.isfinite(ys)
    gs = [g for g, o in zip(groups, ok) if o]
    xs, ys = xs[ok], ys[ok]
    members = [np.asarray([i for i, h in enumerate(gs) if h == g]) for g in dict.fromkeys(gs)]
    members = [m for m in members if m.size >= 2]
    return [np.asarray([float(rx @ ry), float(rx @ rx), float(ry @ ry), rx.size]) for rx, ry in centred_ranks(xs, ys, members)]


def block_bootstrap(
    x: Sequence[Any], y: Sequence[Any], groups: Sequence[Any], *, level: float = 0.95, n_boot: int = 4000, seed: int = 0
) -> Tuple[float, float, float, int, int]:
    r"""``(rho, lo, hi, runs, blocks)``: the within-block rank correlation
    :math:`\rho_w = \sum_b S^b_{xy} / \sqrt{\sum_b S^b_{xx} \sum_b S^b_{yy}}` of the centred ranks (the statistic of
    :func:`~dropgeom.experiments.stats.within_group_permutation`; blocks with >= 2 finite pairs) and its percentile
    interval from resampling whole blocks with replacement (``n_boot`` multinomial block counts, so each resample is
    a weighted sum of the blocks' sums: one matrix product; written out here rather than through ``scipy.stats.bootstrap``
    on block indices, which gives the same percentile interval); NaNs with fewer than 2 blocks.

    Raises:
        ValueError: ``x``, ``y`` and ``groups`` of different lengths, ``level`` outside (0, 1), ``n_boot < 100``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 100:
        raise ValueError(f"n_boot must be at least 100, got {n_boot}")
    parts = _blocks(x, y, groups)
    nan = float("nan")
    if len(parts) < 2:
        return nan, nan, nan, int(sum(p[3] for p in parts)), len(parts)
    sums = np.stack(parts)  # blocks x (Sxy, Sxx, Syy, n)
    den = math.sqrt(sums[:, 1].sum() * sums[:, 2].sum())
    rho = float(sums[:, 0].sum() / den) if den > 0 else nan
    counts = np.random.default_rng(seed).multinomial(len(parts), [1.0 / len(parts)] * len(parts), size=n_boot)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (counts @ sums[:, 0]) / np.sqrt((counts @ sums[:, 1]) * (counts @ sums[:, 2]))
    boot = boot[np.isfinite(boot)]
    lo, hi = (float(v) for v in np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])) if boot.size else (nan, nan)
    return rho, lo, hi, int(sums[:, 3].sum()), len(parts)


def knob_check(ok: Sequence[Mapping[str, Any]], curv: Sequence[float], groups: Sequence[str]) -> Dict[str, Any]:
    """Per setting: the within-block rank correlation of the initial scale with log curvature (permutation, Holm over
    the settings) and the span of the geometric mean curvature over the initial scales; ``moved`` by the module's rule,
    ``line`` the evidence line."""
    rows = []
    for setting in sorted({r["setting"] for r in ok}):
        idx = [i for i, r in enumerate(ok) if r["setting"] == setting and curv[i] > 0]
        test = within_group_permutation(
            [ok[i]["init_scale"] for i in idx], [math.log(curv[i]) for i in idx], [groups[i] for i in idx]
        )
        means = [
            float(np.exp(np.mean([math.log(curv[i]) for i in idx if ok[i]["init_scale"] == k])))
            for k in sorted({ok[i]["init_scale"] for i in idx})
        ]
        span = max(means) / min(means) if len(means) >= 2 else float("nan")
        rows.append({"setting": setting, "rho": test.statistic, "p": test.p_value, "span": span})
    for row, q in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = q
    sig = [r for r in rows if math.isfinite(r["p_holm"]) and r["p_holm"] < 0.05]
    spans = [r["span"] for r in rows if math.isfinite(r["span"])]
    wide = bool(rows) and len(spans) == len(rows) and min(spans) >= MIN_SPAN
    moved = bool(rows) and len(sig) == len(rows) and wide
    down, up = sum(r["rho"] < 0 for r in sig), sum(r["rho"] > 0 for r in sig)
    line = (
        f"manipulation check, per setting (within-block rank correlation of the initial scale with the log curvature, "
        f"permutation over the seeds' blocks, Holm over {len(rows)} settings): moved significantly in {len(sig)} of "
        f"{len(rows)} (down with the scale in {down}, up in {up}); the geometric mean curvature spans a factor "
        + (f"{min(spans):.3g} to {max(spans):.3g}" if spans else "nan")
        + f" over the initial scales within a setting (the rule needs >= {MIN_SPAN:g} in every setting): the knob "
        + (
            "moved the curvature"
            if moved
            else "did NOT move the curvature enough for a manipulation; the tests below are observational within blocks, "
            "and 'not supported' is out of reach"
        )
    )
    short = (
        f"the knob moved the curvature significantly in {len(sig)} of {len(rows)} settings, by a factor "
        + (f"{min(spans):.3g} to {max(spans):.3g}" if spans else "nan")
        + f" (the rule needs every setting and >= {MIN_SPAN:g}): "
        + ("a manipulation" if moved else "no manipulation 'not supported' could rest on")
    )
    return {"moved": moved, "settings": rows, "span_min": min(spans) if spans else float("nan"), "line": line, "short": short}
