r"""Claim C1: dropout flattens the model manifold.

For every dropout rate ``p`` in ``config.c1_p_grid`` and every seed, a tanh MLP
(``config.width`` x ``config.depth``, dropout after each hidden layer) is
trained on the data with dropout at ``p`` (``p = 0``: plain NLL), from the same
initialisation for every ``p`` of a seed. At the trained parameters the
curvature of the model manifold over held-out inputs is measured
(:func:`~dropgeom.experiments.common.curvature_measures`, theory.md 3):
the scalar e-embedding curvature ``gamma^2`` (dense method only), its damped
version and the normal curvature along the mask directions.

Test: for each measure and seed, the log-ratio
``log(curv(p_max) / curv(p_min))``; its mean over seeds with a 95% t-interval,
and Spearman's correlation of ``p`` with ``log curv`` over all runs.
Verdict: ``supported`` when at least two of the measures decrease
significantly (interval below 0) and none increases; ``refuted`` when at least
two increase significantly and none decreases; ``not supported`` when no
measure changes significantly and every interval lies within +-0.1 (no effect,
measured precisely); ``inconclusive`` otherwise.

Confound: solutions trained at different ``p`` differ in more than the
curvature dropout might induce: dropout fits the training data less closely
(higher clean train NLL) and keeps the weights smaller or larger, and
curvature is not invariant under rescaling the weights. The table therefore
reports the clean train NLL and the norm of the parameters the curvature is
taken over beside each measure, and the evidence gives their Spearman
correlation with ``p``: a curvature trend that goes with a large change in
fit or weight norm cannot be attributed to dropout's regularization alone.
As a control at matched fit, every ``p > 0`` unit also trains plain NLL from
the same initialisation and stops it at the first epoch whose clean train
NLL reaches the dropout solution's; the evidence gives
``log(curv(dropout) / curv(plain at matched fit))`` at the largest ``p``
(mean over seeds, 95% interval), and the verdict line counts how many
measures are significantly lower or higher under dropout at matched fit.
The verdict itself follows the rule above.

Example:
    >>> from dropgeom.config import RunConfig
    >>> [u["key"] for u in units(RunConfig.from_preset("test"))]
    ['p=0/seed=0', 'p=0/seed=1', 'p=0.5/seed=0', 'p=0.5/seed=1']
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from ..config import RunConfig
from .common import Verdict, _ckpt, build_mlp, curvature_measures, evaluate_model, fit, fmt, fmt_ci, mean_ci, prepare_data, save_figure, spearman

NAME = "C1"
TITLE = "C1: dropout flattens the model manifold"
MEASURES = ("gamma2", "gamma2_damped", "mask_normal_curvature")


def units(config: RunConfig) -> List[Dict[str, Any]]:
    """One unit per (p, seed)."""
    return [
        {"key": f"p={p:g}/seed={s}", "p": float(p), "seed": s}
        for p in config.c1_p_grid
        for s in range(config.seeds)
    ]


def run_unit(config: RunConfig, unit: Mapping[str, Any], workdir: Optional[Path] = None) -> Dict[str, Any]:
    """Train at ``unit["p"]`` and measure curvature; ``workdir`` holds training checkpoints."""
    p, seed = unit["p"], unit["seed"]
    data = prepare_data(config, seed)
    model = build_mlp(data.num_features, data.num_outputs, config.width, config.depth, config.activation, p, seed)
    tr = fit(model, data, "dropout" if p > 0 else "none", config, seed, p, _ckpt(workdir, "train"))
    rec: Dict[str, Any] = {"p": p, "seed": seed, "epochs_run": tr["epochs_run"], "history": tr["history"]}
    if tr["diverged"]:
        rec["status"] = "diverged"
        return rec
    rec["test"] = evaluate_model(model, data.x_test, data.y_test, data.family)
    rec["train"] = evaluate_model(model, data.x_train, data.y_train, data.family)
    rec["curvature"] = curvature_measures(model, data, config, seed)
    if p > 0:
        # the confound control: plain training from the same initialisation, stopped at the first
        # epoch whose clean train NLL reaches the dropout solution's (a solution at matched fit)
        plain = build_mlp(data.num_features, data.num_outputs, config.width, config.depth, config.activation, 0.0, seed)
        tr0 = fit(plain, data, "none", config, seed, 0.0, _ckpt(workdir, "matched"), stop_at_train_nll=rec["train"]["nll"])
        if not tr0["diverged"]:
            rec["matched"] = {
                "epochs_run": tr0["epochs_run"],
                "train": evaluate_model(plain, data.x_train, data.y_train, data.family),
                "curvature": curvature_measures(plain, data, config, seed, raw=False),
            }
    return rec


def _ok(records: List[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    return [r for r in records if r.get("status") == "ok" and "curvature" in r]


def measures_present(records: List[Mapping[str, Any]]) -> List[str]:
    """The curvature measures of :data:`MEASURES` that the records carry (``gamma2`` only with dense curvature)."""
    return [m for m in MEASURES if any(m in r["curvature"] for r in records)]


def summarize(config: RunConfig, records: List[Mapping[str, Any]]) -> Dict[str, Any]:
    """Per-p table of curvature (mean [95% CI]) with train NLL and weight norm, and the verdict with its numbers."""
    ok = _ok(records)
    grid = sorted({float(r["p"]) for r in ok})
    measures = measures_present(ok)
    rows = []
    for p in grid:
        rs = [r for r in ok if float(r["p"]) == p]
        row = {"p": fmt(p), "runs": str(len(rs))}
        for m in measures:
            row[m] = fmt_ci(*mean_ci([r["curvature"].get(m) for r in rs]))
        row["test NLL"] = fmt_ci(*mean_ci([r["test"].get("nll") for r in rs]))
        row["train NLL"] = fmt_ci(*mean_ci([r.get("train", {}).get("nll") for r in rs]))
        row["|theta|"] = fmt_ci(*mean_ci([r["curvature"].get("param_norm") for r in rs]))
        rows.append(row)
    tests: Dict[str, Dict[str, float]] = {}
    lines = []
    if len(grid) >= 2:
        p0, p1 = grid[0], grid[-1]
        for m in measures:
            ratios = []
            for s in sorted({r["seed"] for r in ok}):
                a = [r["curvature"][m] for r in ok if r["seed"] == s and float(r["p"]) == p0]
                b = [r["curvature"][m] for r in ok if r["seed"] == s and float(r["p"]) == p1]
                if a and b and a[0] > 0 and b[0] > 0:
                    ratios.append(math.log(b[0] / a[0]))
            mean, lo, hi = mean_ci(ratios)
            xs = [float(r["p"]) for r in ok if r["curvature"].get(m, 0) > 0]
            ys = [math.log(r["curvature"][m]) for r in ok if r["curvature"].get(m, 0) > 0]
            rho, pval = spearman(xs, ys)
            tests[m] = {"log_ratio": mean, "lo": lo, "hi": hi, "pairs": len(ratios), "spearman": rho, "spearman_p": pval}
            lines.append(
                f"{m}: log(curv(p={p1:g}) / curv(p={p0:g})) = {fmt_ci(mean, lo, hi)} over {len(ratios)} seeds "
                f"(ratio {fmt(math.exp(mean)) if math.isfinite(mean) else 'nan'}); Spearman(p, log curv) = {fmt(rho)} (p-value {fmt(pval)})"
            )
        ps = [float(r["p"]) for r in ok]
        for label, vals in (
            ("clean train NLL", [r.get("train", {}).get("nll", float("nan")) for r in ok]),
            ("norm of the curvature parameters", [r["curvature"].get("param_norm", float("nan")) for r in ok]),
        ):
            rho, pval = spearman(ps, vals)
            lines.append(f"confound: Spearman(p, {label}) = {fmt(rho)} (p-value {fmt(pval)})")
    matched_tests = _matched_fit(ok, measures, lines)
    down = sum(1 for t in tests.values() if t["hi"] < 0)
    up = sum(1 for t in tests.values() if t["lo"] > 0)
    if not tests:
        verdict = "inconclusive"
        lines.append("fewer than two dropout rates finished: no comparison possible")
    elif down >= 2 and up == 0:
        verdict = "supported"
    elif up >= 2 and down == 0:
        verdict = "refuted"
    elif down == 0 and up == 0 and all(-0.1 <= t["lo"] and t["hi"] <= 0.1 for t in tests.values()):
        verdict = "not supported"
    else:
        verdict = "inconclusive"
    summary = f"{down} of {len(tests)} curvature measures decrease significantly from p={grid[0]:g} to p={grid[-1]:g}, {up} increase" if tests else "no data"
    if matched_tests:
        m_down = sum(1 for t in matched_tests.values() if t["hi"] < 0)
        m_up = sum(1 for t in matched_tests.values() if t["lo"] > 0)
        summary += f"; against plain training stopped at the same train NLL: {m_down} lower, {m_up} higher"
    return {
        "verdict": Verdict(NAME, verdict, summary),
        "columns": ["p", "runs", *measures, "test NLL", "train NLL", "|theta|"],
        "rows": rows,
        "evidence": lines,
        "tests": tests,
        "matched_tests": matched_tests,
    }


def _matched_fit(ok: List[Mapping[str, Any]], measures: List[str], lines: List[str]) -> Dict[str, Dict[str, float]]:
    """Per measure: ``log(curv(dropout at p_max) / curv(plain stopped at the same train NLL))`` over seeds.

    Appends one evidence line per measure to ``lines``; empty when no run carries a matched solution.
    """
    with_m = [r for r in ok if isinstance(r.get("matched"), Mapping)]
    if not with_m:
        return {}
    p1 = max(float(r["p"]) for r in with_m)
    rs = [r for r in with_m if float(r["p"]) == p1]
    out: Dict[str, Dict[str, float]] = {}
    for m in measures:
        ratios = [
            math.log(r["curvature"][m] / r["matched"]["curvature"][m])
            for r in rs
            if r["curvature"].get(m, 0) > 0 and r["matched"]["curvature"].get(m, 0) > 0
        ]
        if not ratios:
            continue
        mean, lo, hi = mean_ci(ratios)
        out[m] = {"log_ratio": mean, "lo": lo, "hi": hi, "pairs": len(ratios)}
        lines.append(
            f"matched fit, {m}: log(curv(dropout p={p1:g}) / curv(plain, stopped at the same train NLL)) = "
            f"{fmt_ci(mean, lo, hi)} over {len(ratios)} seeds (ratio {fmt(math.exp(mean))})"
        )
    for p in sorted({float(r["p"]) for r in with_m if float(r["p"]) != p1}):
        parts = []
        for m in measures:
            ratios = [
                math.log(r["curvature"][m] / r["matched"]["curvature"][m])
                for r in with_m
                if float(r["p"]) == p and r["curvature"].get(m, 0) > 0 and r["matched"]["curvature"].get(m, 0) > 0
            ]
            if ratios:
                parts.append(f"{m} {fmt_ci(*mean_ci(ratios))}")
        if parts:
            lines.append(f"matched fit at p={p:g}: log(curv(dropout) / curv(plain at the same train NLL)): " + "; ".join(parts))
    ep = mean_ci([r["matched"]["epochs_run"] for r in rs])[0]
    tn = mean_ci([r["matched"]["train"]["nll"] - r["train"]["nll"] for r in rs])
    lines.append(
        f"matched fit: plain training reached the train NLL of dropout at p={p1:g} after {fmt(ep)} epochs on average "
        f"(train NLL difference plain - dropout {fmt_ci(*tn)})"
    )
    return out


def figures(config: RunConfig, records: List[Mapping[str, Any]], folder: Path) -> List[Path]:
    """``c1_curvature.png``: each curvature measure against p (mean and 95% CI over seeds, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(records)
    if not ok:
        return []
    grid = sorted({float(r["p"]) for r in ok})
    measures = measures_present(ok)
    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.4), squeeze=False)
    for ax, m in zip(axes[0], measures):
        stats = [mean_ci([r["curvature"].get(m) for r in ok if float(r["p"]) == p]) for p in grid]
        mean = np.array([s[0] for s in stats])
        lo = np.array([s[1] if math.isfinite(s[1]) else s[0] for s in stats])
        hi = np.array([s[2] if math.isfinite(s[2]) else s[0] for s in stats])
        for r in ok:
            ax.plot(float(r["p"]), r["curvature"].get(m, np.nan), ".", color="0.7")
        ax.errorbar(grid, mean, yerr=[np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)], marker="o", capsize=3)
        if np.all(mean > 0):
            ax.set_yscale("log")
        ax.set_xlabel("dropout rate p")
        ax.set_title(m)
    fig.suptitle("C1: curvature of solutions trained with dropout")
    fig.tight_layout()
    path = folder / "c1_curvature.png"
    save_figure(fig, path)
    return [path]

