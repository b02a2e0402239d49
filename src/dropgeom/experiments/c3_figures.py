"""Figures of claim C3, one file per setting (data set x architecture x training size x optimizer).

Per setting of the gradient runs, ``c3_gradients_<setting>.png``: C3a's gradient cosines and value ratios
of both Fisher forms against dropout's regularizer at each training stage (with the rule's thresholds), and
the measured dropout gap at the solution against both forms over ``c3_p_grid``. Per setting of the strength
sweeps, ``c3_objectives_<setting>.png``: C3b's KL to dropout against the strength multiplier and against
the clean train NLL, each with the dropout-vs-dropout noise floor and plain training. ``c3_wager.png``:
Wager et al.'s regime (theory.md 4.1, 7.1), one line per data set. Only the records are read; nothing is
recomputed.

Example:
    >>> figure_stem("gradients", "fashion_mnist-mlp-n1000-adam")
    'c3_gradients_fashion_mnist-mlp-n1000-adam'
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from .c3_units import STAGES
from .common import mean_ci, save_figure
from .figures import log_ticks, style_axes
from .stats import geometric_mean_ci

__all__ = ["figure_stem", "figure_captions", "draw_figures"]

_FORMS = (("quadratic", "Fisher quadratic form Q", "o-", "C0"), ("divergence", "divergence form D", "s--", "C1"))


def figure_stem(kind: str, tag: str) -> str:
    """The file stem of a per-setting C3 figure: ``c3_<kind>_<setting>`` (characters unsafe in file names become ``_``).

    Raises:
        ValueError: ``kind`` is not ``gradients`` or ``objectives``.
    """
    if kind not in ("gradients", "objectives"):
        raise ValueError(f"kind must be 'gradients' or 'objectives', got {kind!r}")
    return f"c3_{kind}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", str(tag))


def _ok(records: Sequence[Mapping[str, Any]], part: str) -> List[Mapping[str, Any]]:
    return [r for r in records if r.get("part") == part and r.get("status") == "ok"]


def _by_tag(records: Sequence[Mapping[str, Any]], part: str) -> Dict[str, List[Mapping[str, Any]]]:
    out: Dict[str, List[Mapping[str, Any]]] = {}
    for r in _ok(records, part):
        if part != "grad" or "stages" in r:
            out.setdefault(str(r.get("tag", "")), []).append(r)
    return dict(sorted(out.items()))


def figure_captions(records: Sequence[Mapping[str, Any]], p: float, cos_min: float, band: Tuple[float, float]) -> Dict[str, str]:
    """``{file stem: caption}`` of every figure :func:`draw_figures` writes for ``records``."""
    out = {}
    for tag, rs in _by_tag(records, "grad").items():
        out[figure_stem("gradients", tag)] = (
            f"C3a, setting {tag} ({len(rs)} seeds): left, cosine of the gradient of each Fisher form with the Monte Carlo gradient "
            f"of dropout's regularizer R at p = {p:g}, per training stage (red line: the rule's {cos_min}); middle, value ratio "
            f"form / R (grey band: the rule's [{band[0]}, {band[1]}]); right, the measured dropout gap at the solution against "
            "both forms over p. Means (ratios: geometric means) with 95% intervals; grey dots: seeds"
        )
    for tag, rs in _by_tag(records, "objectives").items():
        out[figure_stem("objectives", tag)] = (
            f"C3b, setting {tag} ({len(rs)} seeds): KL(p_dropout || p_regularizer) on test inputs against the strength multiplier "
            "(left) and against the clean train NLL the regularizer reached (right; dotted vertical line: dropout's); dashed: "
            "the noise floor (dropout retrained with another mask and batch seed), dotted: plain training. Geometric means "
            "with 95% intervals"
        )
    if _ok(records, "wager"):
        out["c3_wager"] = (
            "Wager et al.'s regime: logistic and softmax regression with input dropout, 1/2 V theta^T diag(F) theta over the "
            f"measured gap (exact enumeration of the masks) against p; grey band: [{band[0]}, {band[1]}]. Geometric means with "
            "95% intervals"
        )
    return out


def draw_figures(
    records: Sequence[Mapping[str, Any]], folder: Path, p: float, cos_min: float, band: Tuple[float, float]
) -> List[Path]:
    """Write every C3 figure of ``records`` into ``folder``; return their paths (gradients, objectives, Wager).

    Raises:
        OSError: a figure cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    out = []
    for tag, rs in _by_tag(records, "grad").items():
        out.append(_gradients_figure(tag, rs, folder / f"{figure_stem('gradients', tag)}.png", p, cos_min, band))
    for tag, rs in _by_tag(records, "objectives").items():
        out.append(_objectives_figure(tag, rs, folder / f"{figure_stem('objectives', tag)}.png"))
    wag = _ok(records, "wager")
    if wag:
        out.append(_wager_figure(wag, folder / "c3_wager.png", band))
    return out


def _bars(st: Sequence[Tuple[float, float, float]]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(means, lower, upper)`` error-bar lengths; none where the interval is unbounded (a single seed)."""
    mean = np.array([t[0] for t in st], dtype=float)
    ok = [math.isfinite(t[1]) and math.isfinite(t[2]) for t in st]
    lo = np.array([max(t[0] - t[1], 0.0) if k else 0.0 for t, k in zip(st, ok)])
    hi = np.array([max(t[2] - t[0], 0.0) if k else 0.0 for t, k in zip(st, ok)])
    return mean, lo, hi


def _stage_panel(ax: Any, rs: Sequence[Mapping[str, Any]], key: str, geometric: bool) -> None:
    """One line per Fisher form over the training stages, with seed dots."""
    stat = geometric_mean_ci if geometric else mean_ci
    for i, (form, label, fmt, colour) in enumerate(_FORMS):
        k = f"{key}_{form}"
        vals = [[float(r["stages"][s][k]) for r in rs if s in r["stages"] and k in r["stages"][s]] for s in STAGES]
        mean, lo, hi = _bars([stat(v) if v else (math.nan,) * 3 for v in vals])
        xs = np.arange(len(STAGES)) + (i - 0.5) * 0.08
        ax.errorbar(xs, mean, yerr=[lo, hi], fmt=fmt, color=colour, capsize=3, label=label)
        for x, v in zip(xs, vals):
            ax.plot([x] * len(v), v, ".", color="0.6", ms=3)
    ax.set_xticks(range(len(STAGES)))
    ax.set_xticklabels(STAGES)


def _gradients_figure(
    tag: str, rs: Sequence[Mapping[str, Any]], path: Path, p: float, cos_min: float, band: Tuple[float, float]
) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    _stage_panel(axes[0], rs, "cos", geometric=False)
    axes[0].axhline(cos_min, color="r", lw=0.8, ls=":", label=f"rule: cosine >= {cos_min}")
    style_axes(axes[0], "training stage", "cosine with grad R (dropout's regularizer)", f"gradients at p = {p:g}")
    _stage_panel(axes[1], rs, "ratio", geometric=True)
    axes[1].axhspan(band[0], band[1], color="0.9", label=f"rule: ratio in [{band[0]}, {band[1]}]")
    axes[1].axhline(1.0, color="0.5", lw=0.8)
    style_axes(axes[1], "training stage", "value ratio form / R", "values at the training p")
    ax = axes[2]
    rows = [row for r in rs for row in r.get("gap", [])]
    ps = sorted({float(row["p"]) for row in rows})
    for key, label, fmt in (
        ("measured", "measured gap R (Monte Carlo)", "ko-"),
        ("quadratic_fisher", "quadratic form Q", "o--"),
        ("fisher_term", "divergence form D = p sum K_j", "s--"),
        ("bernoulli_law", "first-order law p(K+B)", "^:"),
    ):
        mean, lo, hi = _bars([mean_ci([row[key] for row in rows if float(row["p"]) == q]) for q in ps])
        if ps:
            ax.errorbar(ps, mean, yerr=[lo, hi], fmt=fmt, capsize=3, label=label)
    if ps and all(q > 0 for q in ps):
        ax.set_xscale("log")
        ax.set_xticks(ps)
        ax.set_xticklabels([f"{q:g}" for q in ps])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
    style_axes(ax, "dropout rate p", "gap at the solution (nats per input)", "gap against the Fisher forms")
    fig.suptitle(f"C3a, {tag}: Fisher forms against dropout's regularizer ({len(rs)} seeds; 95% intervals)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def _objective_stats(rs: Sequence[Mapping[str, Any]], name: str, key: str) -> Tuple[float, float, float]:
    vals = [r["objectives"].get(name, {}).get(key) for r in rs]
    return (geometric_mean_ci if key == "kl_from_dropout" else mean_ci)(vals)


def _objectives_figure(tag: str, rs: Sequence[Mapping[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    regs = sorted({e["regularizer"] for r in rs for e in r["objectives"].values() if "regularizer" in e})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, reg in enumerate(regs):
        ss = sorted({float(e["strength"]) for r in rs for e in r["objectives"].values() if e.get("regularizer") == reg})
        names = [f"{reg}@{s:g}" for s in ss]
        kl, lo, hi = _bars([_objective_stats(rs, n, "kl_from_dropout") for n in names])
        axes[0].errorbar(ss, kl, yerr=[lo, hi], fmt="o-", color=f"C{i}", capsize=3, label=reg)
        train = np.array([_objective_stats(rs, n, "train_nll")[0] for n in names])
        axes[1].errorbar(train, kl, yerr=[lo, hi], fmt="o-", color=f"C{i}", capsize=3, label=reg)
    for name, ls, label in (("dropout_floor", "--", "noise floor: dropout, another seed"), ("none", ":", "plain training")):
        g = _objective_stats(rs, name, "kl_from_dropout")[0]
        if math.isfinite(g):
            for ax in axes:
                ax.axhline(g, color="k", ls=ls, lw=1, label=label)
    drop_train = _objective_stats(rs, "dropout", "train_nll")[0]
    if math.isfinite(drop_train):
        axes[1].axvline(drop_train, color="0.4", ls=":", lw=1, label="dropout's clean train NLL")
    kls = [e.get("kl_from_dropout") for r in rs for n, e in r["objectives"].items() if n != "dropout"]
    for ax in axes:
        ax.set_yscale("log")
        log_ticks(ax, "y", kls)
    axes[0].set_xscale("log")
    grid = sorted({float(e["strength"]) for r in rs for e in r["objectives"].values() if "strength" in e})
    if grid:
        axes[0].set_xticks(grid)
        axes[0].set_xticklabels([f"{k:g}" for k in grid])
        axes[0].minorticks_off()
    ylabel = "KL(p_dropout || p_regularizer), test (nats)"
    style_axes(axes[0], "strength (multiple of the nominal strength)", ylabel, "against strength", legend=False)
    style_axes(axes[1], "clean train NLL (nats)", ylabel, "against the fit reached", legend=False)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(len(labels), 1)), fontsize="small", frameon=False)
    fig.suptitle(f"C3b, {tag}: distance to dropout ({len(rs)} seeds; geometric means, 95% intervals)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    save_figure(fig, path)
    return path


def _wager_figure(wag: Sequence[Mapping[str, Any]], path: Path, band: Tuple[float, float]) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for ds in sorted({r["dataset"] for r in wag}):
        rs = [r for r in wag if r["dataset"] == ds]
        ps = sorted({row["p"] for r in rs for row in r["rows"]})
        mean, lo, hi = _bars([geometric_mean_ci([row["ratio"] for r in rs for row in r["rows"] if row["p"] == q]) for q in ps])
        model = "logistic" if rs[0].get("num_classes") == 2 else "softmax"
        ax.errorbar(ps, mean, yerr=[lo, hi], fmt="o-", capsize=3, label=f"{ds} ({model} regression, {len(rs)} seeds)")
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.axhspan(band[0], band[1], color="0.9", label=f"[{band[0]}, {band[1]}]")
    style_axes(ax, "input dropout rate p", "1/2 V theta^T diag(F) theta / measured gap", "Wager regime: GLMs with input dropout")
    fig.tight_layout()
    save_figure(fig, path)
    return path
