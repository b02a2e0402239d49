"""Figures of claim C2, one file per setting (data set x activation x width x depth): ``c2_<setting>.png``.

Four panels on one setting: the manipulation check (the curvature along the mask directions against the
input layer's initial scale) and each outcome -- the curvature share ``B/(K+B)``, the regularizer per unit
rate ``R/p`` and the test-NLL gain against the early-stopped plain baseline -- against that curvature. A
grey line joins the initial scales of one seed (the within-setting comparison the rule tests); black: the
mean per initial scale with its 95% interval. Curvatures at rounding level (exactly zero after
:func:`~dropgeom.experiments.c2_analysis.rounding_zero`) are left off the log axes and counted in the
title. Only the records are read; nothing is recomputed.

Example:
    >>> figure_stem("fashion_mnist-tanh-w16-d2")
    'c2_fashion_mnist-tanh-w16-d2'
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence

import numpy as np

from .common import mean_ci, save_figure
from .figures import log_ticks, style_axes
from .stats import geometric_mean_ci

__all__ = ["figure_stem", "figure_captions", "draw_figures"]

#: (outcome key, axis label) of the three outcome panels
PANELS = (
    ("share", "curvature share B/(K+B)"),
    ("strength", "regularizer per unit rate R/p (nats)"),
    ("gain", "test-NLL gain vs early-stopped plain (nats)"),
)


def figure_stem(setting: str) -> str:
    """The file stem of a setting's C2 figure: ``c2_<setting>`` (characters unsafe in file names become ``_``)."""
    return "c2_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", str(setting))


def figure_captions(ok: Sequence[Mapping[str, Any]], curvature_name: str, p: float) -> Dict[str, str]:
    """``{file stem: caption}`` of every figure :func:`draw_figures` writes for the usable records ``ok``."""
    out = {}
    for setting in sorted({str(r["setting"]) for r in ok}):
        seeds = len({r["seed"] for r in ok if r["setting"] == setting})
        out[figure_stem(setting)] = (
            f"C2, setting {setting} ({seeds} seeds, dropout p = {p:g}): top left, the manipulation check ({curvature_name} "
            "at the dropout solution against the input layer's initial scale); the other panels, each outcome against that "
            "curvature. Grey lines: one seed across the initial scales (the within-setting comparison); black: mean per "
            "initial scale with 95% intervals. Expected sign (fixed in advance, theory.md 4.2): negative"
        )
    return out


def draw_figures(
    ok: Sequence[Mapping[str, Any]],
    curv: Sequence[float],
    outcome: Callable[[Mapping[str, Any], str], float],
    folder: Path,
    curvature_name: str,
) -> List[Path]:
    """Write one figure per setting of the usable records ``ok`` (with their curvatures ``curv``, rounding level
    set to zero) into ``folder``; ``outcome(record, key)`` reads an outcome of :data:`PANELS`.

    Raises:
        ValueError: ``ok`` and ``curv`` differ in length.
        OSError: a figure cannot be written.
    """
    if len(ok) != len(curv):
        raise ValueError(f"ok and curv must have the same length, got {len(ok)} and {len(curv)}")
    import matplotlib

    matplotlib.use("Agg")
    paths = []
    for setting in sorted({str(r["setting"]) for r in ok}):
        idx = [i for i, r in enumerate(ok) if r["setting"] == setting]
        path = folder / f"{figure_stem(setting)}.png"
        _setting_figure(setting, [ok[i] for i in idx], [float(curv[i]) for i in idx], outcome, path, curvature_name)
        paths.append(path)
    return paths


def _seed_lines(ax: Any, rs: Sequence[Mapping[str, Any]], xs: Sequence[float], ys: Sequence[float], log_y: bool = False) -> None:
    """One grey line per seed through its initial scales (points off a log axis or not finite left out)."""
    for seed in sorted({r["seed"] for r in rs}):
        pts = sorted(
            (r["init_scale"], x, y)
            for r, x, y in zip(rs, xs, ys)
            if r["seed"] == seed and x > 0 and math.isfinite(y) and (y > 0 or not log_y)
        )
        ax.plot([q[1] for q in pts], [q[2] for q in pts], ".-", color="0.65", lw=0.8, ms=4)


def _setting_figure(
    setting: str,
    rs: Sequence[Mapping[str, Any]],
    curv: Sequence[float],
    outcome: Callable[[Mapping[str, Any], str], float],
    path: Path,
    curvature_name: str,
) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    scales = sorted({float(r["init_scale"]) for r in rs})
    zeros = sum(1 for c in curv if c == 0.0)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    seed_handle = Line2D([], [], color="0.65", marker=".", label="one seed across the initial scales")
    ax = axes[0][0]
    _seed_lines(ax, rs, [r["init_scale"] for r in rs], curv, log_y=True)
    st = [geometric_mean_ci([c for r, c in zip(rs, curv) if r["init_scale"] == k and c > 0]) for k in scales]
    _mean_bars(ax, scales, st)
    ax.set_xscale("log")
    ax.set_yscale("log")
    log_ticks(ax, "y", curv)
    ax.set_xticks(scales)
    ax.set_xticklabels([f"{k:g}" for k in scales])
    ax.minorticks_off()
    ax.legend(handles=[seed_handle, *ax.get_legend_handles_labels()[0]], fontsize="small", frameon=False)
    style_axes(ax, "initial scale of the input layer (factor)", f"{curvature_name} (log)", "manipulation check", legend=False)
    for ax, (key, label) in zip([axes[0][1], axes[1][0], axes[1][1]], PANELS):
        ys = [outcome(r, key) for r in rs]
        _seed_lines(ax, rs, curv, ys)
        gx = [geometric_mean_ci([c for r, c in zip(rs, curv) if r["init_scale"] == k and c > 0])[0] for k in scales]
        st = [mean_ci([y for r, y, c in zip(rs, ys, curv) if r["init_scale"] == k and c > 0]) for k in scales]
        _mean_bars(ax, gx, st)
        ax.set_xscale("log")
        log_ticks(ax, "x", curv)
        if key == "gain":
            ax.axhline(0.0, color="0.4", lw=0.8, ls="--", label="no gain")
        style_axes(ax, f"{curvature_name} (log)", label, label.split(" (")[0] + " against curvature", legend=False)
        ax.legend(handles=[seed_handle, *ax.get_legend_handles_labels()[0]], fontsize="small", frameon=False)
    note = f"; {zeros} run(s) at rounding-level curvature left off the log axes" if zeros else ""
    fig.suptitle(f"C2, {setting}: {len({r['seed'] for r in rs})} seeds x {len(scales)} initial scales{note}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _mean_bars(ax: Any, xs: Sequence[float], st: Sequence[Any]) -> None:
    """Black means with 95% intervals (none where the interval is unbounded) at ``xs`` (non-finite ones skipped)."""
    keep = [i for i, x in enumerate(xs) if math.isfinite(x) and x > 0 and math.isfinite(st[i][0])]
    if not keep:
        return
    mean = np.array([st[i][0] for i in keep])
    lo = np.array([max(st[i][0] - st[i][1], 0.0) if math.isfinite(st[i][1]) else 0.0 for i in keep])
    hi = np.array([max(st[i][2] - st[i][0], 0.0) if math.isfinite(st[i][2]) else 0.0 for i in keep])
    ax.errorbar([xs[i] for i in keep], mean, yerr=[lo, hi], fmt="ko-", capsize=3, lw=1.5, label="mean per initial scale, 95% CI")
