r"""Claim C2: the strength of dropout's regularization depends on the amount of curvature.

Settings: every activation in ``config.c2_activations`` (``identity`` is a
deep linear network, whose outputs are affine in each mask: the GLM-like,
e-flat case along the mask directions) x width x depth. For each setting and
seed the same initialisation is trained twice, with plain NLL and with
dropout at ``config.c2_p``. The gain is only informative where dropout
regularizes at all: the presets train on a few hundred samples for enough
epochs that plain training overfits (the report's "Scope and caveats" counts
how often dropout helped).

Recorded per run:

* ``gain = test NLL(none) - test NLL(dropout)`` (positive: dropout helped);
* the curvature of the unregularised solution (theory.md 3; damped
  ``gamma^2`` and the normal curvature along the mask directions);
* the dropout terms of theory.md 4.2 at the dropout solution over training
  inputs: ``curvature_bernoulli / divergence`` and
  ``curvature_gaussian / fisher``, the size of the curvature term relative to
  the Fisher (divergence) term.

Test: Spearman's correlation over all runs between the damped curvature and
the gain (and, reported beside it, between ``|curvature term / Fisher term|``
and the gain). The claim states a dependence, not its sign, so the verdict is
``supported`` for a correlation of either sign with p-value < 0.05 (the sign
is reported), ``not supported`` when at least 20 runs show none
(``|rho| < 0.2`` and p-value >= 0.05), ``inconclusive`` otherwise. The
pooled correlation mixes settings (activation, width, depth) that differ in
curvature and also in other ways, so the evidence and the verdict line add
the correlation within settings (log curvature and gain minus their setting
means over seeds), which the verdict rule does not use: read a pooled
correlation without a within-setting one as a difference between
architectures, not as an effect of curvature as such.

Example:
    >>> from dropgeom.config import RunConfig
    >>> [u["key"] for u in units(RunConfig.from_preset("test"))][:2]
    ['identity-w6-d2/seed=0', 'identity-w6-d2/seed=1']
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from ..config import RunConfig
from .common import (
    Verdict,
    _ckpt,
    build_mlp,
    curvature_measures,
    evaluate_model,
    fit,
    fmt,
    fmt_ci,
    mean_ci,
    prepare_data,
    save_figure,
    spearman,
)

NAME = "C2"
TITLE = "C2: dropout's regularization strength depends on curvature"


def units(config: RunConfig) -> List[Dict[str, Any]]:
    """One unit per (activation, width, depth, seed)."""
    return [
        {"key": f"{a}-w{w}-d{d}/seed={s}", "setting": f"{a}-w{w}-d{d}", "activation": a, "width": w, "depth": d, "seed": s}
        for a in config.c2_activations
        for w in config.c2_widths
        for d in config.c2_depths
        for s in range(config.seeds)
    ]


def dropout_terms(model: Any, data: Any, config: RunConfig) -> Dict[str, float]:
    """Summed dropout terms (theory.md 4.2) over the first ``curvature_inputs`` training inputs."""
    from ..dropout import terms

    n = min(config.curvature_inputs, data.x_train.shape[0])
    t = terms(model, data.x_train[:n], data.y_train[:n], family=data.family)
    out = {k: float(getattr(t, k)) for k in ("fisher", "curvature_gaussian", "divergence", "curvature_bernoulli")}
    out["ratio_bernoulli"] = out["curvature_bernoulli"] / out["divergence"] if out["divergence"] else float("nan")
    out["ratio_gaussian"] = out["curvature_gaussian"] / out["fisher"] if out["fisher"] else float("nan")
    return out


def run_unit(config: RunConfig, unit: Mapping[str, Any], workdir: Optional[Path] = None) -> Dict[str, Any]:
    """Train without and with dropout from one initialisation; gain, curvature and terms."""
    seed = unit["seed"]
    data = prepare_data(config, seed)
    rec: Dict[str, Any] = {k: unit[k] for k in ("setting", "activation", "width", "depth", "seed")}
    models = {}
    for objective, p in (("none", 0.0), ("dropout", config.c2_p)):
        model = build_mlp(data.num_features, data.num_outputs, unit["width"], unit["depth"], unit["activation"], p, seed)
        tr = fit(model, data, objective, config, seed, p, _ckpt(workdir, objective))
        rec[f"epochs_{objective}"] = tr["epochs_run"]
        if tr["diverged"]:
            rec["status"] = "diverged"
            rec["diverged_objective"] = objective
            return rec
        rec[f"test_{objective}"] = evaluate_model(model, data.x_test, data.y_test, data.family)
        models[objective] = model
    rec["gain"] = rec["test_none"]["nll"] - rec["test_dropout"]["nll"]
    rec["curvature"] = curvature_measures(models["none"], data, config, seed, raw=False)
    rec["terms"] = dropout_terms(models["dropout"], data, config)
    return rec


def _ok(records: List[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    return [r for r in records if r.get("status") == "ok" and "gain" in r]


def summarize(config: RunConfig, records: List[Mapping[str, Any]]) -> Dict[str, Any]:
    ok = _ok(records)
    settings = sorted({r["setting"] for r in ok})
    rows = []
    for s in settings:
        rs = [r for r in ok if r["setting"] == s]
        rows.append(
            {
                "setting": s,
                "runs": str(len(rs)),
                "gain (test NLL)": fmt_ci(*mean_ci([r["gain"] for r in rs])),
                "gamma2_damped": fmt_ci(*mean_ci([r["curvature"]["gamma2_damped"] for r in rs])),
                "mask normal curv.": fmt_ci(*mean_ci([r["curvature"]["mask_normal_curvature"] for r in rs])),
                "B/K (curv./div.)": fmt_ci(*mean_ci([r["terms"]["ratio_bernoulli"] for r in rs])),
                "C/F (curv./Fisher)": fmt_ci(*mean_ci([r["terms"]["ratio_gaussian"] for r in rs])),
            }
        )
    gains = [float(r["gain"]) for r in ok]
    curv = [math.log(max(float(r["curvature"]["gamma2_damped"]), 1e-300)) for r in ok]
    ratio = [abs(float(r["terms"]["ratio_bernoulli"])) for r in ok]
    rho, pval = spearman(curv, gains)
    rho_t, pval_t = spearman(ratio, gains)
    mask = [float(r["curvature"].get("mask_normal_curvature", float("nan"))) for r in ok]
    rho_m, pval_m = spearman(mask, gains)
    helped = sum(1 for g in gains if g > 0)
    # within settings: deviations from each setting's mean (log curvature and gain), so that a
    # correlation carried only by differences between activations/architectures drops out
    dev_c, dev_g = [], []
    for st in settings:
        idx = [i for i, r in enumerate(ok) if r["setting"] == st]
        if len(idx) >= 2:
            mc, mg = float(np.mean([curv[i] for i in idx])), float(np.mean([gains[i] for i in idx]))
            dev_c += [curv[i] - mc for i in idx]
            dev_g += [gains[i] - mg for i in idx]
    rho_w, pval_w = spearman(dev_c, dev_g)
    flat = [r for r in ok if r["activation"] == "identity"]
    flat_max = max((abs(r["terms"]["ratio_bernoulli"]) for r in flat), default=float("nan"))
    lines = [
        f"Spearman(damped gamma^2 of the clean solution, gain) = {fmt(rho)} (p-value {fmt(pval)}) over {len(ok)} runs in {len(settings)} settings",
        f"within settings (log curvature and gain minus their setting means): Spearman = {fmt(rho_w)} (p-value {fmt(pval_w)}); "
        "the pooled correlation mixes activations and depths, which differ in curvature and in gain for other reasons too",
        f"Spearman(|curvature term / divergence term|, gain) = {fmt(rho_t)} (p-value {fmt(pval_t)})",
        f"Spearman(normal curvature along the mask directions, gain) = {fmt(rho_m)} (p-value {fmt(pval_m)}; "
        "0 wherever the mask feeds the output layer or the activation is piecewise linear)",
        f"mean gain of dropout on test NLL over all runs: {fmt_ci(*mean_ci(gains))}; dropout helped in {helped} of {len(gains)} runs",
    ]
    if flat:
        lines.append(
            f"identity activation (outputs affine in every mask): max |curvature term / divergence term| = {fmt(flat_max)} "
            "(theory.md 4.2 predicts exactly 0)"
        )
    if not math.isfinite(rho):
        verdict = "inconclusive"
    elif pval < 0.05:
        verdict = "supported"
    elif len(ok) >= 20 and abs(rho) < 0.2:
        verdict = "not supported"
    else:
        verdict = "inconclusive"
    direction = "more curvature, larger gain" if rho > 0 else "more curvature, smaller gain" if rho < 0 else "no trend"
    summary = (
        f"Spearman(curvature, gain) = {fmt(rho)} ({direction}), p-value {fmt(pval)}, {len(ok)} runs; "
        f"within settings {fmt(rho_w)} (p-value {fmt(pval_w)})"
    )
    return {
        "verdict": Verdict(NAME, verdict, summary),
        "columns": ["setting", "runs", "gain (test NLL)", "gamma2_damped", "mask normal curv.", "B/K (curv./div.)", "C/F (curv./Fisher)"],
        "rows": rows,
        "evidence": lines,
        "tests": {"spearman": rho, "spearman_p": pval, "spearman_terms": rho_t, "spearman_terms_p": pval_t, "identity_max_ratio": flat_max,
                  "spearman_within": rho_w, "spearman_within_p": pval_w, "spearman_mask": rho_m, "spearman_mask_p": pval_m, "helped": helped},
    }


def figures(config: RunConfig, records: List[Mapping[str, Any]], folder: Path) -> List[Path]:
    """``c2_gain_vs_curvature.png`` (gain against damped curvature, per activation) and
    ``c2_term_ratio.png`` (curvature term relative to the Fisher/divergence term per setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(records)
    if not ok:
        return []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for a in sorted({r["activation"] for r in ok}):
        rs = [r for r in ok if r["activation"] == a]
        ax.scatter([r["curvature"]["gamma2_damped"] for r in rs], [r["gain"] for r in rs], label=a, alpha=0.8)
    ax.set_xscale("log")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("damped embedding curvature gamma^2 (clean solution)")
    ax.set_ylabel("gain of dropout on test NLL")
    ax.legend()
    ax.set_title("C2: dropout's gain against curvature")
    fig.tight_layout()
    p1 = folder / "c2_gain_vs_curvature.png"
    save_figure(fig, p1)

    settings = sorted({r["setting"] for r in ok})
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(settings) + 2), 4))
    x = np.arange(len(settings))
    for off, key, label in ((-0.2, "ratio_bernoulli", "B/K (Bernoulli)"), (0.2, "ratio_gaussian", "C/F (Gaussian)")):
        st = [mean_ci([r["terms"][key] for r in ok if r["setting"] == s]) for s in settings]
        mean = np.array([t[0] for t in st])
        err = np.array([(t[2] - t[0]) if math.isfinite(t[2]) else 0.0 for t in st])
        ax.bar(x + off, mean, width=0.4, yerr=err, capsize=2, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(settings, rotation=45, ha="right")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_ylabel("curvature term / Fisher term")
    ax.legend()
    ax.set_title("C2: size of the curvature term")
    fig.tight_layout()
    p2 = folder / "c2_term_ratio.png"
    save_figure(fig, p2)
    return [p1, p2]
