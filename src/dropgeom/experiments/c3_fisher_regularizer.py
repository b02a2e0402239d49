r"""Claim C3: dropout essentially corresponds to a Fisher-information regularizer.

Two parts, each with its own verdict.

**C3a, the gap** (one unit per seed): a tanh MLP trained with dropout at
``config.c3_p``; over training inputs, the measured Bernoulli dropout gap
``R(p) = L_drop - L_clean`` (Monte Carlo with its standard error) for each ``p``
in ``config.c3_p_grid``, beside theory.md 4.2's predictions from the terms at
the same parameters: the divergence (Fisher) term alone ``p sum_j K_j``, the
full first-order Bernoulli law ``p sum_j (K_j + B_j)`` and the quadratic
Fisher form ``1/2 p/(1-p) sum_j F^mask_jj``. Verdict at the smallest ``p``:
``supported`` when the Fisher term alone is within 25% of the measured gap
(the 95% interval of ``p K / R`` over seeds inside [0.75, 1.25]);
``not supported`` when the interval lies outside that band (the curvature term
matters); ``inconclusive`` otherwise.

**C3b, training** (one unit per seed): the same initialisation trained with
every objective in ``config.c3_objectives`` (none, L2, dropout,
Fisher-dropout, ...); test NLL, accuracy and ECE, and the similarity of each
solution to the dropout solution: the mean ``KL(p_dropout || p_obj)`` of the
test predictions, the share of equal argmax predictions, and the cosine
between the parameter displacements from the shared initialisation. Verdict:
``supported`` when Fisher-dropout's predictions are significantly closer to
dropout's (smaller KL, paired over seeds, interval below 0) than those of
every other non-dropout objective; ``refuted`` when they are significantly
farther than plain training's; ``inconclusive`` otherwise.

Example:
    >>> from dropgeom.config import RunConfig
    >>> [u["key"] for u in units(RunConfig.from_preset("test"))]
    ['gap/seed=0', 'gap/seed=1', 'objectives/seed=0', 'objectives/seed=1']
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from ..config import RunConfig
from .c2_curvature_strength import dropout_terms
from .common import Verdict, _ckpt, build_mlp, evaluate_model, fit, fmt, fmt_ci, mean_ci, prepare_data, save_figure

NAME = "C3"
TITLE = "C3: dropout corresponds to a Fisher-information regularizer"
BAND = (0.75, 1.25)


def units(config: RunConfig) -> List[Dict[str, Any]]:
    """One gap unit and one objectives unit per seed."""
    return [{"key": f"gap/seed={s}", "part": "gap", "seed": s} for s in range(config.seeds)] + [
        {"key": f"objectives/seed={s}", "part": "objectives", "seed": s} for s in range(config.seeds)
    ]


def run_unit(config: RunConfig, unit: Mapping[str, Any], workdir: Optional[Path] = None) -> Dict[str, Any]:
    """The gap part or the objectives part for one seed; ``workdir`` holds training checkpoints."""
    if unit["part"] == "gap":
        return _run_gap(config, unit["seed"], workdir)
    return _run_objectives(config, unit["seed"], workdir)


def _run_gap(config: RunConfig, seed: int, workdir: Optional[Path]) -> Dict[str, Any]:
    from ..dropout import gap

    data = prepare_data(config, seed)
    model = build_mlp(data.num_features, data.num_outputs, config.width, config.depth, config.activation, config.c3_p, seed)
    tr = fit(model, data, "dropout", config, seed, config.c3_p, _ckpt(workdir, "dropout"))
    rec: Dict[str, Any] = {"part": "gap", "seed": seed, "epochs_run": tr["epochs_run"]}
    if tr["diverged"]:
        rec["status"] = "diverged"
        return rec
    t = dropout_terms(model, data, config)
    rec["terms"] = t
    n = min(config.curvature_inputs, data.x_train.shape[0])
    x, y = data.x_train[:n], data.y_train[:n]
    rows = []
    for i, p in enumerate(config.c3_p_grid):
        gen = torch.Generator().manual_seed(1000 * seed + i)
        g = gap(model, x, y, family=data.family, p=p, noise="bernoulli", method="mc", n_samples=config.gap_samples, generator=gen)
        rows.append(
            {
                "p": float(p),
                "measured": float(g.value),
                "stderr": float(g.stderr),
                "fisher_term": p * t["divergence"],
                "bernoulli_law": p * (t["divergence"] + t["curvature_bernoulli"]),
                "quadratic_fisher": 0.5 * p / (1 - p) * t["fisher"],
            }
        )
    rec["gap"] = rows
    return rec


def _probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from ..manifold import eval_mode

    with torch.no_grad(), eval_mode(model):
        return torch.softmax(model(x), dim=-1)


def _run_objectives(config: RunConfig, seed: int, workdir: Optional[Path]) -> Dict[str, Any]:
    data = prepare_data(config, seed)
    init = build_mlp(data.num_features, data.num_outputs, config.width, config.depth, config.activation, 0.0, seed)
    theta0 = torch.nn.utils.parameters_to_vector(init.parameters()).detach()
    rec: Dict[str, Any] = {"part": "objectives", "seed": seed, "objectives": {}}
    solutions = {}
    for obj in config.c3_objectives:
        model = copy.deepcopy(init)
        p = 0.0 if obj in ("none", "l2") else config.c3_p
        tr = fit(model, data, obj, config, seed, p, _ckpt(workdir, obj))
        entry: Dict[str, Any] = {"epochs_run": tr["epochs_run"], "diverged": tr["diverged"]}
        if tr["diverged"]:
            rec.setdefault("diverged", []).append(obj)
        else:
            entry["test"] = evaluate_model(model, data.x_test, data.y_test, data.family)
            solutions[obj] = model
        rec["objectives"][obj] = entry
    if "dropout" not in solutions:
        rec["status"] = "diverged"
        return rec
    if data.family == "categorical":
        ref = _probs(solutions["dropout"], data.x_test)
        dref = torch.nn.utils.parameters_to_vector(solutions["dropout"].parameters()).detach() - theta0
        for obj, model in solutions.items():
            q = _probs(model, data.x_test)
            kl = (ref * (ref.clamp_min(1e-300).log() - q.clamp_min(1e-300).log())).sum(-1).mean()
            d = torch.nn.utils.parameters_to_vector(model.parameters()).detach() - theta0
            cos = float(d @ dref / (d.norm() * dref.norm()).clamp_min(1e-300))
            rec["objectives"][obj]["similarity"] = {
                "kl_from_dropout": float(kl),
                "agreement": float((q.argmax(-1) == ref.argmax(-1)).double().mean()),
                "cosine_displacement": cos,
            }
    return rec


def _gap_ok(records: List[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    return [r for r in records if r.get("part") == "gap" and r.get("status") == "ok" and "gap" in r]


def _obj_ok(records: List[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    return [r for r in records if r.get("part") == "objectives" and r.get("status") == "ok"]


def summarize(config: RunConfig, records: List[Mapping[str, Any]]) -> Dict[str, Any]:
    gaps = _gap_ok(records)
    grid = sorted({row["p"] for r in gaps for row in r["gap"]})
    rows_a = []
    for p in grid:
        rs = [row for r in gaps for row in r["gap"] if row["p"] == p]
        rows_a.append(
            {
                "p": fmt(p),
                "measured gap": fmt_ci(*mean_ci([x["measured"] for x in rs])),
                "Fisher term pK": fmt_ci(*mean_ci([x["fisher_term"] for x in rs])),
                "Bernoulli law p(K+B)": fmt_ci(*mean_ci([x["bernoulli_law"] for x in rs])),
                "quadratic V/2 F": fmt_ci(*mean_ci([x["quadratic_fisher"] for x in rs])),
                "pK / gap": fmt_ci(*mean_ci([x["fisher_term"] / x["measured"] if x["measured"] else float("nan") for x in rs])),
                "p(K+B) / gap": fmt_ci(*mean_ci([x["bernoulli_law"] / x["measured"] if x["measured"] else float("nan") for x in rs])),
            }
        )
    lines_a = []
    if grid:
        p0 = grid[0]
        rs = [row for r in gaps for row in r["gap"] if row["p"] == p0]
        m, lo, hi = mean_ci([x["fisher_term"] / x["measured"] if x["measured"] else float("nan") for x in rs])
        mb, lob, hib = mean_ci([x["bernoulli_law"] / x["measured"] if x["measured"] else float("nan") for x in rs])
        lines_a.append(f"at p={p0:g}: Fisher (divergence) term / measured gap = {fmt_ci(m, lo, hi)} over {len(rs)} seeds")
        lines_a.append(f"at p={p0:g}: full Bernoulli law (Fisher + curvature term) / measured gap = {fmt_ci(mb, lob, hib)}")
        ratio_terms = mean_ci([r["terms"]["ratio_bernoulli"] for r in gaps])
        lines_a.append(f"curvature term / divergence term at the trained solutions: {fmt_ci(*ratio_terms)}")
        if BAND[0] <= lo and hi <= BAND[1]:
            va = "supported"
        elif hi < BAND[0] or lo > BAND[1]:
            va = "not supported"
        else:
            va = "inconclusive"
        sum_a = f"Fisher term / measured gap at p={p0:g}: {fmt_ci(m, lo, hi)} (band {BAND[0]}-{BAND[1]})"
    else:
        va, sum_a = "inconclusive", "no finished gap runs"

    objs = _obj_ok(records)
    names = [o for o in config.c3_objectives]
    rows_b = []
    for o in names:
        es = [r["objectives"][o] for r in objs if o in r["objectives"] and "test" in r["objectives"][o]]
        div = sum(1 for r in objs if r["objectives"].get(o, {}).get("diverged"))
        sims = [e.get("similarity", {}) for e in es]
        rows_b.append(
            {
                "objective": o,
                "runs": f"{len(es)}" + (f" ({div} diverged)" if div else ""),
                "test NLL": fmt_ci(*mean_ci([e["test"].get("nll") for e in es])),
                "accuracy": fmt_ci(*mean_ci([e["test"].get("accuracy") for e in es])),
                "ECE": fmt_ci(*mean_ci([e["test"].get("ece") for e in es])),
                "KL(dropout||obj)": fmt_ci(*mean_ci([s.get("kl_from_dropout") for s in sims])),
                "agreement": fmt_ci(*mean_ci([s.get("agreement") for s in sims])),
                "cos(displacement)": fmt_ci(*mean_ci([s.get("cosine_displacement") for s in sims])),
            }
        )
    lines_b = []
    vb, sum_b = "inconclusive", "Fisher-dropout not in the comparison or no finished runs"
    if "fisher_dropout" in names and objs:
        def kl(r: Mapping[str, Any], o: str) -> float:
            return float(r["objectives"].get(o, {}).get("similarity", {}).get("kl_from_dropout", float("nan")))

        others = [o for o in names if o not in ("dropout", "fisher_dropout")]
        closer, farther_than_none = [], False
        for o in others:
            m, lo, hi = mean_ci([kl(r, "fisher_dropout") - kl(r, o) for r in objs])
            lines_b.append(f"KL(dropout||fisher_dropout) - KL(dropout||{o}) = {fmt_ci(m, lo, hi)} (paired over seeds)")
            closer.append(hi < 0)
            if o == "none" and lo > 0:
                farther_than_none = True
        if others and all(closer):
            vb = "supported"
        elif farther_than_none:
            vb = "refuted"
        sum_b = f"Fisher-dropout significantly closer to dropout than {sum(closer)} of {len(others)} other objectives"
    return {
        "verdict": Verdict("C3a (gap)", va, sum_a),
        "verdict_b": Verdict("C3b (training)", vb, sum_b),
        "columns": ["p", "measured gap", "Fisher term pK", "Bernoulli law p(K+B)", "quadratic V/2 F", "pK / gap", "p(K+B) / gap"],
        "rows": rows_a,
        "columns_b": ["objective", "runs", "test NLL", "accuracy", "ECE", "KL(dropout||obj)", "agreement", "cos(displacement)"],
        "rows_b": rows_b,
        "evidence": lines_a + lines_b,
    }


def figures(config: RunConfig, records: List[Mapping[str, Any]], folder: Path) -> List[Path]:
    """``c3_gap.png`` (measured gap and the predictions against p) and ``c3_objectives.png`` (test NLL and KL to dropout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    gaps = _gap_ok(records)
    if gaps:
        grid = sorted({row["p"] for r in gaps for row in r["gap"]})
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for key, label, style in (
            ("measured", "measured gap (MC)", "o-"),
            ("fisher_term", "Fisher term p K", "s--"),
            ("bernoulli_law", "Bernoulli law p (K + B)", "^--"),
            ("quadratic_fisher", "quadratic V/2 F", "x:"),
        ):
            st = [mean_ci([row[key] for r in gaps for row in r["gap"] if row["p"] == p]) for p in grid]
            mean = np.array([s[0] for s in st])
            err = np.array([(s[2] - s[0]) if math.isfinite(s[2]) else 0.0 for s in st])
            ax.errorbar(grid, mean, yerr=err, fmt=style, capsize=3, label=label)
        ax.set_xlabel("dropout rate p")
        ax.set_ylabel("dropout regularizer R(p)")
        ax.legend()
        ax.set_title("C3: measured gap and Fisher-term predictions")
        fig.tight_layout()
        path = folder / "c3_gap.png"
        save_figure(fig, path)
        out.append(path)
    objs = _obj_ok(records)
    if objs:
        names = list(config.c3_objectives)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for ax, getter, label in (
            (axes[0], lambda e: e.get("test", {}).get("nll"), "test NLL"),
            (axes[1], lambda e: e.get("similarity", {}).get("kl_from_dropout"), "KL(p_dropout || p_objective), test"),
        ):
            st = [mean_ci([getter(r["objectives"].get(o, {})) for r in objs]) for o in names]
            mean = np.array([s[0] for s in st])
            err = np.array([(s[2] - s[0]) if math.isfinite(s[2]) else 0.0 for s in st])
            ax.bar(range(len(names)), mean, yerr=err, capsize=3)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=20)
            ax.set_title(label)
        fig.suptitle("C3: training objectives compared")
        fig.tight_layout()
        path = folder / "c3_objectives.png"
        save_figure(fig, path)
        out.append(path)
    return out
