r"""Claim C1: dropout flattens the model manifold -- tested on measures of geometry, at matched fit.

The design and the pre-stated rule, in words, are :data:`ABOUT` (the report prints it under the claim's
title, with the run's config values); :func:`summarize` applies the rule to the records.

Example:
    >>> from dropgeom.config import RunConfig
    >>> [u["key"] for u in units(RunConfig.from_preset("test"))]
    ['p=0/seed=0', 'p=0/seed=1', 'p=0.5/seed=0', 'p=0.5/seed=1']
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..config import RunConfig
from .c1_measures import flatness_measures
from .c1_summary import DECIDING, NAME, RULE, SETS, TITLE, figures, measures_present, summarize
from .common import _ckpt, build_mlp, evaluate_model, fit, prepare_data

#: The claim's design and pre-stated rule in words, printed under its title in the report (``config.<name>``
#: becomes the run's value); the report takes this text, never the module docstring.
ABOUT = (
    "Two readings of the claim are tested.\n"
    "\n"
    "(a) Solutions. For every dropout rate `p` in `config.c1_p_grid` and every seed, a tanh MLP (dropout after "
    "each hidden layer) is trained with dropout at `p` from the same initialisation for every `p` of a seed. "
    "For each `p > 0` the same initialisation is also trained\n"
    "\n"
    "* without dropout and stopped at the optimizer step whose clean train NLL is closest to the dropout "
    "solution's (checked every `config.c1_match_every` steps; matched when `|log(NLL ratio)| <= "
    "config.c1_match_tol`);\n"
    "* with L2, its weight tuned per `p` and seed so that the *final* clean train NLL of a full-length run "
    "matches the dropout solution's (from `config.c1_l2` by factors of 10 until bracketed, then regula falsi "
    "in (log weight, log NLL), at most `config.c1_l2_fits` runs; a second control in which the regulariser, "
    "not a stop, holds the fit);\n"
    "* at the largest `p`, with dropout again under another training seed (masks and batch order): the noise "
    "floor of a dropout-vs-dropout comparison.\n"
    "\n"
    "Every model is measured on `config.c1_inputs` training inputs and as many held-out inputs, over all "
    "parameters (`flatness_measures`): the invariant measures (normal e- and m-curvature along the mask "
    "directions, e-curvature along dropout-noise tangent directions and along the natural-gradient direction "
    "-- plain, and with the function-space regulariser of the other input set; the undamped `gamma^2` on the "
    "exact range of `J` of the first layer on the first `config.c1_gamma2_inputs` inputs) and the "
    "coordinate-dependent ones (Fisher trace / top eigenvalue, Hessian trace / top eigenvalue, SAM sharpness), "
    "reported beside them but never deciding.\n"
    "\n"
    "(b) The dropout model. At each dropout solution (`p > 0`), the invariant measures of the manifold of the "
    "m-mixture (the predictive distribution averaged over `config.c1_mixture_masks` common random masks, "
    "theory.md 4.3) are compared with those of the deterministic (weight-scaled) model at the same `theta`.\n"
    "\n"
    "Rule (fixed before the data). Unit of analysis: the paired log-ratio `log(curv(dropout) / curv(plain at "
    "matched fit))` per seed (only matched pairs), for each `p > 0`, deciding measure and input set; mean, 95% "
    "t-interval, paired t-test, Cohen's `d_z`; Holm correction over all `p x measure x input set` comparisons "
    "of the rule. The deciding measures (`DECIDING`) are the invariant ones except the plain natural-gradient "
    "curvature: it solves `g v = J^T r` on a badly conditioned `g` and is dominated by nearly degenerate "
    "directions, so its function-space regularised variant decides instead (decided before the quick run that "
    "introduced it was looked at) and the plain one is a description. The claim predicts a negative log-ratio. "
    "A (measure, input set) counts as *lower* when at least one `p` is significantly below 0 after correction "
    "and none above (*higher* conversely; one significant both ways over `p` is neither). Verdict: `supported` "
    "when every deciding measure is lower on both input sets, `refuted` when every one is higher, "
    "`measure-dependent` when some are lower and others higher, `inconclusive` otherwise (nothing significant, "
    "or the significant ones all one way but not every measure). Reading (b) gets a label by the same rule "
    "applied to `log(curv(mixture) / curv(deterministic))`. The unmatched trend over `p` (log-ratio to `p = 0`), the L2 control and the noise "
    "floor are reported as descriptions, not as the verdict. The summary and figures live in `c1_summary`."
)

__all__ = ["NAME", "TITLE", "ABOUT", "RULE", "SETS", "DECIDING", "units", "run_unit", "summarize", "figures", "measures_present"]

#: offset of the noise-floor run's training seed
NOISE_SEED = 7919


def units(config: RunConfig) -> List[Dict[str, Any]]:
    """One unit per (p, seed)."""
    return [{"key": f"p={p:g}/seed={s}", "p": float(p), "seed": s} for p in config.c1_p_grid for s in range(config.seeds)]


def _inputs(data: Any, n: int) -> Dict[str, Tuple[Any, Any]]:
    return {"train": (data.x_train[:n], data.y_train[:n]), "test": (data.x_test[:n], data.y_test[:n])}


def _measure(
    model: Any, sets: Mapping[str, Tuple[Any, Any]], data: Any, config: RunConfig, seed: int, **kw: Any
) -> Dict[str, Any]:
    """Every measure on each input set; the other set is the natural gradient's function-space reference."""
    other = {"train": "test", "test": "train"}
    return {
        s: flatness_measures(model, x, y, data.family, config, seed, reference=sets[other[s]][0], **kw)
        for s, (x, y) in sets.items()
    }


def _gap(nll: float, target: float) -> float:
    return abs(math.log(nll / target)) if target > 0 and nll > 0 else math.inf


def _control(config: RunConfig, data: Any, seed: int, target: float, sets: Mapping[str, Any]) -> Dict[str, Any]:
    """Plain training from the same initialisation, stopped at the optimizer step closest to ``target``."""
    net = build_mlp(data.num_features, data.num_outputs, config.width, config.depth, config.activation, 0.0, seed)
    tr = fit(net, data, "none", config, seed, 0.0, None, stop_at_train_nll=target, match_every=config.c1_match_every)
    out: Dict[str, Any] = {"epochs_run": tr["epochs_run"], "steps": tr.get("steps", 0), "diverged": tr["diverged"]}
    if tr["diverged"]:
        return out
    out["train"] = evaluate_model(net, data.x_train, data.y_train, data.family)
    out["log_nll_gap"] = _gap(out["train"]["nll"], target)
    out["matched"] = bool(out["log_nll_gap"] <= config.c1_match_tol)
    if out["matched"]:
        out["measures"] = _measure(net, sets, data, config, seed)
    return out


def _next_weight(tried: Sequence[Tuple[float, float]], config: RunConfig) -> Optional[float]:
    """The next L2 weight: x10 / /10 until the signed log-NLL gaps bracket 0, then regula falsi; None: give up."""
    lo, hi = config.c1_l2_range
    below = [(w, f) for w, f in tried if f < 0]  # final NLL below the target: the weight is too small
    above = [(w, f) for w, f in tried if f > 0]
    if below and above:
        (wa, fa), (wb, fb) = max(below), min(above)
        t = min(0.9, max(0.1, fa / (fa - fb)))  # clamped: no stagnation at one end
        w = math.exp(math.log(wa) + t * (math.log(wb) - math.log(wa)))
    else:
        w = max(w for w, _ in tried) * 10 if below else min(w for w, _ in tried) / 10
    w = min(hi, max(lo, w))
    return None if any(math.isclose(w, u, rel_tol=1e-9) for u, _ in tried) else w


def _l2_control(config: RunConfig, data: Any, seed: int, target: float, sets: Mapping[str, Any]) -> Dict[str, Any]:
    """L2 from the same initialisation, weight tuned so that the final clean train NLL matches ``target``.

    Every run trains for all ``config.epochs`` (the regulariser holds the fit, not a stop); the weight
    search is :func:`_next_weight`, at most ``config.c1_l2_fits`` runs; the run closest to ``target`` is kept.
    """
    tried: List[Tuple[float, float]] = []
    best: Optional[Tuple[float, float, Any]] = None
    w: Optional[float] = config.c1_l2
    while w is not None and len(tried) < config.c1_l2_fits:
        net = build_mlp(data.num_features, data.num_outputs, config.width, config.depth, config.activation, 0.0, seed)
        tr = fit(net, data, "l2", config, seed, 0.0, None, weight_decay=w)
        nll = math.inf if tr["diverged"] else evaluate_model(net, data.x_train, data.y_train, data.family)["nll"]
        f = math.log(nll / target) if math.isfinite(nll) and nll > 0 and target > 0 else math.inf
        tried.append((w, f))
        if best is None or abs(f) < abs(best[1]):
            best = (w, f, net)
        if abs(f) <= config.c1_match_tol:
            break
        w = _next_weight(tried, config)
    out: Dict[str, Any] = {"weights_tried": [u for u, _ in tried], "log_nll_ratios": [f for _, f in tried], "fits": len(tried)}
    assert best is not None
    out["weight"], net = best[0], best[2]
    out["diverged"] = not math.isfinite(best[1])
    if out["diverged"]:
        return out
    out["train"] = evaluate_model(net, data.x_train, data.y_train, data.family)
    out["log_nll_gap"] = _gap(out["train"]["nll"], target)
    out["matched"] = bool(out["log_nll_gap"] <= config.c1_match_tol)
    if out["matched"]:
        out["measures"] = _measure(net, sets, data, config, seed, gamma2=False)
    return out


def run_unit(config: RunConfig, unit: Mapping[str, Any], workdir: Optional[Path] = None) -> Dict[str, Any]:
    """Train at ``unit["p"]``, train the controls, and take every measure (see the module docstring)."""
    p, seed = float(unit["p"]), int(unit["seed"])
    data = prepare_data(config, seed)
    model = build_mlp(data.num_features, data.num_outputs, config.width, config.depth, config.activation, p, seed)
    tr = fit(model, data, "dropout" if p > 0 else "none", config, seed, p, _ckpt(workdir, "train"))
    rec: Dict[str, Any] = {"p": p, "seed": seed, "epochs_run": tr["epochs_run"], "history": tr["history"]}
    if tr["diverged"]:
        rec["status"] = "diverged"
        return rec
    rec["test"] = evaluate_model(model, data.x_test, data.y_test, data.family)
    rec["train"] = evaluate_model(model, data.x_train, data.y_train, data.family)
    sets = _inputs(data, config.c1_inputs)
    rec["measures"] = _measure(model, sets, data, config, seed)
    rec["curvature"] = dict(rec["measures"]["test"])  # the held-out measures under the common key
    if p > 0:
        target = rec["train"]["nll"]
        rec["matched"] = _control(config, data, seed, target, sets)
        rec["l2"] = _l2_control(config, data, seed, target, sets)
        rec["mixture"] = _measure(model, sets, data, config, seed, mixture=True)
        if config.c1_noise_floor and p == max(config.c1_p_grid):
            other = build_mlp(data.num_features, data.num_outputs, config.width, config.depth, config.activation, p, seed)
            tr2 = fit(other, data, "dropout", config, seed + NOISE_SEED, p, _ckpt(workdir, "noise_floor"))
            if not tr2["diverged"]:
                rec["noise_floor"] = {"measures": _measure(other, sets, data, config, seed, gamma2=False)}
    return rec
