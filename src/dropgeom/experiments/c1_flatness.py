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

import numpy as np

from ..config import RunConfig
from .common import (
    FLATNESS_MEASURES,
    Verdict,
    VerdictLabel,
    _ckpt,
    build_mlp,
    evaluate_model,
    fit,
    flatness_measures,
    fmt,
    fmt_ci,
    prepare_data,
    save_figure,
)
from .stats import Comparison, adjust, geometric_mean_ci, paired

NAME = "C1"
TITLE = "C1: dropout flattens the model manifold"
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
    "* with L2 (weight `config.c1_l2`), stopped the same way (a second control);\n"
    "* at the largest `p`, with dropout again under another training seed (masks and batch order): the noise "
    "floor of a dropout-vs-dropout comparison.\n"
    "\n"
    "Every model is measured on `config.c1_inputs` training inputs and as many held-out inputs, over all "
    "parameters (`flatness_measures`): the invariant measures (normal e- and m-curvature along the mask "
    "directions, e-curvature along the natural-gradient direction and along dropout-noise tangent directions; "
    "the undamped `gamma^2` where the dense method fits) and the coordinate-dependent ones (Fisher trace / top "
    "eigenvalue, Hessian trace / top eigenvalue, SAM sharpness), reported beside them but never deciding.\n"
    "\n"
    "(b) The dropout model. At each dropout solution (`p > 0`), the invariant measures of the manifold of the "
    "m-mixture (the predictive distribution averaged over `config.c1_mixture_masks` common random masks, "
    "theory.md 4.3) are compared with those of the deterministic (weight-scaled) model at the same `theta`.\n"
    "\n"
    "Rule (fixed before the data). Unit of analysis: the paired log-ratio `log(curv(dropout) / curv(plain at "
    "matched fit))` per seed (only matched pairs), for each `p > 0`, invariant measure and input set; mean, 95% "
    "t-interval, paired t-test, Cohen's `d_z`; Holm correction over all `p x measure x input set` comparisons "
    "of the rule. The claim predicts a negative log-ratio. A (measure, input set) counts as *lower* when at "
    "least one `p` is significantly below 0 after correction and none above (*higher* conversely). Verdict: "
    "`supported` when every invariant measure is lower on both input sets, `refuted` when every one is higher, "
    "`measure-dependent` when some are lower and others higher, `inconclusive` when nothing is significant or "
    "the significant ones all point one way but not every measure does. Reading (b) gets a label by the same "
    "rule applied to `log(curv(mixture) / curv(deterministic))`. The unmatched trend over `p` (log-ratio to `p "
    "= 0`), the L2 control and the noise floor are reported as descriptions, not as the verdict."
)
SETS = ("train", "test")
SET_WORDS = {"train": "training inputs", "test": "held-out inputs"}
WORDS = {k: w for k, w, _ in FLATNESS_MEASURES}
STATUS = {k: s for k, _, s in FLATNESS_MEASURES}
#: the measures that decide the verdict (the undamped gamma^2 joins when it was computed on every run)
DECIDING = ("mask_e", "mask_m", "natural_gradient_e", "noise_e")
#: offset of the noise-floor run's training seed
NOISE_SEED = 7919

RULE = (
    "paired log-ratio curvature(dropout) / curvature(plain training stopped at the same clean train NLL) per seed, "
    "for every p > 0, invariant measure and input set (training and held-out); Holm over all of them; a measure is "
    "lower (higher) on an input set when some p is significantly below (above) 1 after correction and none the other "
    "way. Supported: every invariant measure lower on both input sets; refuted: every one higher; measure-dependent: "
    "some lower, some higher; inconclusive: otherwise. Coordinate-dependent measures, the L2 control, the noise floor "
    "and the unmatched trend over p are descriptions only."
)


def units(config: RunConfig) -> List[Dict[str, Any]]:
    """One unit per (p, seed)."""
    return [{"key": f"p={p:g}/seed={s}", "p": float(p), "seed": s} for p in config.c1_p_grid for s in range(config.seeds)]


def _inputs(data: Any, n: int) -> Dict[str, Tuple[Any, Any]]:
    return {"train": (data.x_train[:n], data.y_train[:n]), "test": (data.x_test[:n], data.y_test[:n])}


def _measure(model: Any, sets: Mapping[str, Tuple[Any, Any]], data: Any, config: RunConfig, seed: int, **kw: Any) -> Dict[str, Any]:
    return {s: flatness_measures(model, x, y, data.family, config, seed, **kw) for s, (x, y) in sets.items()}


def _control(config: RunConfig, data: Any, seed: int, objective: str, target: float, sets: Mapping[str, Any]) -> Dict[str, Any]:
    """Plain (or L2) training from the same initialisation, stopped at the step closest to ``target``."""
    net = build_mlp(data.num_features, data.num_outputs, config.width, config.depth, config.activation, 0.0, seed)
    tr = fit(net, data, objective, config, seed, 0.0, None, stop_at_train_nll=target,
             match_every=config.c1_match_every, weight_decay=config.c1_l2 if objective == "l2" else None)
    out: Dict[str, Any] = {"epochs_run": tr["epochs_run"], "steps": tr.get("steps", 0), "diverged": tr["diverged"]}
    if tr["diverged"]:
        return out
    out["train"] = evaluate_model(net, data.x_train, data.y_train, data.family)
    gap = abs(math.log(out["train"]["nll"] / target)) if target > 0 and out["train"]["nll"] > 0 else math.inf
    out["log_nll_gap"] = gap
    out["matched"] = bool(gap <= config.c1_match_tol)
    if out["matched"]:
        out["measures"] = _measure(net, sets, data, config, seed)
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
        rec["matched"] = _control(config, data, seed, "none", target, sets)
        rec["l2"] = _control(config, data, seed, "l2", target, sets)
        rec["mixture"] = _measure(model, sets, data, config, seed, mixture=True)
        if config.c1_noise_floor and p == max(config.c1_p_grid):
            other = build_mlp(data.num_features, data.num_outputs, config.width, config.depth, config.activation, p, seed)
            tr2 = fit(other, data, "dropout", config, seed + NOISE_SEED, p, _ckpt(workdir, "noise_floor"))
            if not tr2["diverged"]:
                rec["noise_floor"] = {"measures": _measure(other, sets, data, config, seed)}
    return rec


# --------------------------------------------------------------------------- summary
def _ok(records: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    return [r for r in records if r.get("status") == "ok" and isinstance(r.get("measures"), Mapping)]


def _get(r: Optional[Mapping[str, Any]], s: str, m: str) -> float:
    try:
        return float(r["measures"][s][m])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return float("nan")


def measures_present(records: Sequence[Mapping[str, Any]]) -> List[str]:
    """The measures of :data:`~dropgeom.experiments.common.FLATNESS_MEASURES` that every run carries."""
    ok = _ok(records)
    return [k for k, _, _ in FLATNESS_MEASURES if ok and all(math.isfinite(_get(r, s, k)) for r in ok for s in SETS)]


def _deciding(present: Sequence[str]) -> List[str]:
    return [m for m in (*DECIDING, "gamma2") if m in present]


def _pairs(ok: Sequence[Mapping[str, Any]], p: float, s: str, m: str, other: str) -> Tuple[List[float], List[float]]:
    """Per seed at ``p``: (dropout value, control value) for control ``other`` (matched, l2, mixture, noise_floor, p0)."""
    a, b = [], []
    by_seed0 = {r["seed"]: r for r in ok if float(r["p"]) == 0.0}
    for r in ok:
        if float(r["p"]) != p:
            continue
        if other == "p0":
            ctrl: Any = by_seed0.get(r["seed"])
        elif other == "mixture":
            ctrl = {"measures": r.get("mixture")} if isinstance(r.get("mixture"), Mapping) else None
        else:
            ctrl = r.get(other)
            if other in ("matched", "l2") and not (isinstance(ctrl, Mapping) and ctrl.get("matched")):
                ctrl = None
        if ctrl is None:
            continue
        if other == "mixture":  # mixture vs deterministic: the mixture is "a"
            a.append(_get(ctrl, s, m))
            b.append(_get(r, s, m))
        else:
            a.append(_get(r, s, m))
            b.append(_get(ctrl, s, m))
    return a, b


def _direction(cs: Sequence[Comparison]) -> int:
    signs = {c.sign for c in cs if c.sign != 0}
    if signs == {-1}:
        return -1
    if signs == {1}:
        return 1
    return 2 if signs else 0  # 2: significant both ways over p


def _label(directions: Mapping[Tuple[str, str], int]) -> str:
    vals = list(directions.values())
    if not vals or all(v == 0 for v in vals):
        return VerdictLabel.INCONCLUSIVE.value
    lower = [k for k, v in directions.items() if v == -1]
    higher = [k for k, v in directions.items() if v == 1]
    if (lower and higher) or any(v == 2 for v in vals):
        return VerdictLabel.MEASURE_DEPENDENT.value
    if len(lower) == len(vals):
        return VerdictLabel.SUPPORTED.value
    if len(higher) == len(vals):
        return VerdictLabel.REFUTED.value
    return VerdictLabel.INCONCLUSIVE.value


def _family(ok, grid, measures, other) -> Dict[Tuple[float, str, str], Comparison]:
    keys, comps = [], []
    for p in grid:
        for s in SETS:
            for m in measures:
                a, b = _pairs(ok, p, s, m, other)
                keys.append((p, s, m))
                comps.append(paired(a, b, log=True, name=f"{m} {s} p={p:g}"))
    return dict(zip(keys, adjust(comps))) if comps else {}


def _ratio_cell(c: Optional[Comparison], adjusted: bool = True) -> str:
    if c is None or c.n == 0 or not math.isfinite(c.estimate):
        return "n/a"
    r, lo, hi = c.ratio()
    pv = c.p_adjusted if adjusted else c.p_value
    return f"{fmt(r)} [{fmt(lo)}, {fmt(hi)}] (p={fmt(pv, 2)}, d_z={fmt(c.effect_size, 2)}, n={c.n})"


#: short column labels in words for the per-p table (held-out inputs)
_LABEL = {
    "mask_e": "e-curv. mask dirs", "mask_m": "m-curv. mask dirs", "natural_gradient_e": "e-curv. natural gradient",
    "noise_e": "e-curv. noise dirs", "gamma2": "undamped gamma^2", "fisher_trace": "Fisher trace",
    "fisher_top": "top Fisher eig.", "hessian_trace": "Hessian trace", "hessian_top": "top Hessian eig.", "sam": "SAM sharpness",
}


def summarize(config: RunConfig, records: List[Mapping[str, Any]]) -> Dict[str, Any]:
    """Tables, the verdict for reading (a) with reading (b)'s label in its evidence (the rule: :data:`ABOUT`, :data:`RULE`)."""
    ok = _ok(records)
    grid_all = sorted({float(r["p"]) for r in ok})
    grid = [p for p in grid_all if p > 0]
    present = measures_present(ok)
    deciding = _deciding(present)
    described = [m for m in present if m not in deciding]

    # the rule: matched fit, Holm over p x measure x input set
    fam = _family(ok, grid, deciding, "matched")
    directions = {(m, s): _direction([fam[(p, s, m)] for p in grid]) for m in deciding for s in SETS}
    verdict = _label(directions) if fam else VerdictLabel.INCONCLUSIVE.value
    n_matched = sum(1 for r in ok if isinstance(r.get("matched"), Mapping) and r["matched"].get("matched"))
    n_ctrl = sum(1 for r in ok if float(r["p"]) > 0)

    # descriptions: unmatched trend, L2 control, noise floor, coordinate-dependent measures at matched fit
    unmatched = {(p, s, m): paired(*_pairs(ok, p, s, m, "p0"), log=True) for p in grid for s in SETS for m in present}
    l2 = {(p, s, m): paired(*_pairs(ok, p, s, m, "l2"), log=True) for p in grid for s in SETS for m in present}
    desc_matched = {(p, s, m): paired(*_pairs(ok, p, s, m, "matched"), log=True) for p in grid for s in SETS for m in described}
    noise = {(s, m): paired(*_pairs(ok, max(grid), s, m, "noise_floor"), log=True) for s in SETS for m in present} if grid else {}
    tables = [_ratio_table(present, grid, fam, desc_matched, l2, unmatched), _noise_table(noise)]

    # reading (b): mixture vs deterministic at the same theta
    mix_measures = [m for m in deciding if m != "gamma2" or all(math.isfinite(_get({"measures": r.get("mixture")}, s, m)) for r in ok if r.get("mixture") for s in SETS)]
    fam_b = _family([r for r in ok if isinstance(r.get("mixture"), Mapping)], grid, mix_measures, "mixture")
    dir_b = {(m, s): _direction([fam_b[(p, s, m)] for p in grid]) for m in mix_measures for s in SETS} if fam_b else {}
    label_b = _label(dir_b) if fam_b else VerdictLabel.INCONCLUSIVE.value
    tables += [_reading_b_table(fam_b), _invariance_table(deciding)]

    low, high, mixed = (_words(directions, want) for want in (-1, 1, 2))
    summary = (
        f"At matched fit ({n_matched} of {n_ctrl} plain controls within the tolerance), dropout's solutions were "
        f"flatter in {len(low)} and more curved in {len(high)} of {len(directions)} (invariant measure, input set) "
        f"combinations" + (f", both ways over p in {len(mixed)}" if mixed else "") + f"; reading (b), the dropout "
        f"mixture vs the deterministic model at the same parameters: {label_b}"
    )
    lines = _evidence(config, ok, grid, deciding, low, high, fam, noise, fam_b, n_ctrl)
    return {
        "verdict": Verdict(NAME, verdict, summary),
        "rule": RULE,
        "what_would_change": (
            "The verdict would change if the invariant measures moved together at matched fit: all significantly lower under "
            "dropout on both input sets (supported) or all higher (refuted); more seeds narrow the intervals, and a measure that "
            "is significant in opposite directions at different p keeps the label measure-dependent."
        ),
        "caveats": _caveats(config, ok, present),
        "columns": ["p", "runs", *(_LABEL.get(m, m) for m in present), "train NLL", "test NLL", "|theta|"],
        "rows": _per_p_rows(ok, grid_all, present),
        "tables": tables,
        "evidence": lines,
        "tests": {f"{m}|{s}|p={p:g}": c.as_dict() for (p, s, m), c in fam.items()},
        "reading_b": {"label": label_b, "tests": {f"{m}|{s}|p={p:g}": c.as_dict() for (p, s, m), c in fam_b.items()}},
        "matched_tests": {f"{m}|{s}|p={p:g}": c.as_dict() for (p, s, m), c in desc_matched.items()},
    }


def _per_p_rows(ok: Sequence[Mapping[str, Any]], grid_all: Sequence[float], present: Sequence[str]) -> List[Dict[str, str]]:
    """Per-p description: geometric means of every measure on held-out inputs, fit and weight norm."""
    rows = []
    for p in grid_all:
        rs = [r for r in ok if float(r["p"]) == p]
        row = {"p": fmt(p), "runs": str(len(rs))}
        for m in present:
            row[_LABEL.get(m, m)] = fmt_ci(*geometric_mean_ci([_get(r, "test", m) for r in rs]))
        row["train NLL"] = fmt_ci(*geometric_mean_ci([r["train"]["nll"] for r in rs]))
        row["test NLL"] = fmt_ci(*geometric_mean_ci([r["test"]["nll"] for r in rs]))
        row["|theta|"] = fmt_ci(*geometric_mean_ci([_get(r, "test", "param_norm") for r in rs]))
        rows.append(row)
    return rows


def _ratio_table(present, grid, fam, desc_matched, l2, unmatched) -> Dict[str, Any]:
    """C1 (a): each measure's ratio, dropout over each control (the rule's cells with Holm p-values)."""
    rows = []
    for m in present:
        for s in SETS:
            for p in grid:
                c = fam.get((p, s, m))
                rows.append({
                    "measure": WORDS[m], "invariance": STATUS[m], "inputs": SET_WORDS[s], "p": fmt(p),
                    "dropout / plain at matched fit (Holm p)": _ratio_cell(c) if c is not None else _ratio_cell(desc_matched.get((p, s, m)), adjusted=False) + " (description)",
                    "dropout / L2 at matched fit": _ratio_cell(l2.get((p, s, m)), adjusted=False),
                    "dropout(p) / plain p=0, unmatched": _ratio_cell(unmatched.get((p, s, m)), adjusted=False),
                })
    return {
        "title": "C1 (a): ratio of each measure, dropout over its control (geometric mean over seeds, 95% interval, paired t-test)",
        "columns": ["measure", "invariance", "inputs", "p", "dropout / plain at matched fit (Holm p)", "dropout / L2 at matched fit", "dropout(p) / plain p=0, unmatched"],
        "rows": rows,
    }


def _noise_table(noise: Mapping[Tuple[str, str], Comparison]) -> Dict[str, Any]:
    return {
        "title": "C1 noise floor: dropout / dropout with another training seed, at the largest p (should include 1)",
        "columns": ["measure", "inputs", "ratio"],
        "rows": [{"measure": WORDS[m], "inputs": SET_WORDS[s], "ratio": _ratio_cell(c, adjusted=False)} for (s, m), c in noise.items()],
    }


def _reading_b_table(fam_b: Mapping[Tuple[float, str, str], Comparison]) -> Dict[str, Any]:
    return {
        "title": "C1 (b): m-mixture of the dropout model / deterministic model at the same theta (Holm over p x measure x inputs)",
        "columns": ["measure", "inputs", "p", "mixture / deterministic"],
        "rows": [{"measure": WORDS[m], "inputs": SET_WORDS[s], "p": fmt(p), "mixture / deterministic": _ratio_cell(c)} for (p, s, m), c in fam_b.items()],
    }


def _invariance_table(deciding: Sequence[str]) -> Dict[str, Any]:
    return {
        "title": "Invariance status of every C1 measure (under theta = A theta': same function, new coordinates)",
        "columns": ["measure", "invariance", "decides the verdict"],
        "rows": [{"measure": WORDS[k], "invariance": st, "decides the verdict": "yes" if k in deciding else "no"} for k, _, st in FLATNESS_MEASURES],
    }


def _words(d: Mapping[Tuple[str, str], int], want: int) -> List[str]:
    return [f"{WORDS[m]} on {SET_WORDS[s]}" for (m, s), v in d.items() if v == want]


def _evidence(config: RunConfig, ok, grid, deciding, low, high, fam, noise, fam_b, n_ctrl: int) -> List[str]:
    """The evidence lines: directions, the rule's cells, the matching, the noise floor and reading (b)."""
    lines: List[str] = []
    if low:
        lines.append("flatter under dropout at matched fit: " + "; ".join(low))
    if high:
        lines.append("more curved under dropout at matched fit: " + "; ".join(high))
    for (p, s, m), c in fam.items():
        lines.append(f"matched fit, {WORDS[m]}, {SET_WORDS[s]}, p={p:g}: dropout / plain = {_ratio_cell(c)}")
    if not grid:
        return lines
    gaps = [r["matched"]["log_nll_gap"] for r in ok if isinstance(r.get("matched"), Mapping) and "log_nll_gap" in r["matched"]]
    steps = [r["matched"].get("steps", 0) for r in ok if isinstance(r.get("matched"), Mapping)]
    l2_matched = sum(1 for r in ok if isinstance(r.get("l2"), Mapping) and r["l2"].get("matched"))
    if gaps:
        lines.append(
            f"matching: the plain control stopped at the optimizer step closest to the dropout solution's clean train NLL "
            f"(checked every {config.c1_match_every} step(s)); |log NLL ratio| median {fmt(float(np.median(gaps)))}, "
            f"max {fmt(max(gaps))} (tolerance {config.c1_match_tol:g}); median {fmt(float(np.median(steps)))} steps; "
            f"L2 control (weight {config.c1_l2:g}) matched in {l2_matched} of {n_ctrl}"
        )
    for (s, m), c in noise.items():
        if m in deciding and c.n:
            lines.append(f"noise floor, {WORDS[m]}, {SET_WORDS[s]}: dropout / dropout with another seed = {_ratio_cell(c, adjusted=False)}")
    for (p, s, m), c in fam_b.items():
        lines.append(f"reading (b), {WORDS[m]}, {SET_WORDS[s]}, p={p:g}: mixture / deterministic = {_ratio_cell(c)}")
    return lines


def _caveats(config: RunConfig, ok: Sequence[Mapping[str, Any]], present: Sequence[str]) -> List[str]:
    """The claim's caveats: the fit confound, coordinate-dependent measures, sizes, the controls."""
    ps = sorted({float(r["p"]) for r in ok})
    fit_nll = {p: float(np.mean([r["train"]["nll"] for r in ok if float(r["p"]) == p])) for p in ps}
    return [
        *(
            [
                f"The confound the rule holds fixed: solutions trained at different p also differ in fit; the clean train "
                f"NLL went from {fit_nll[ps[0]]:.3g} at p={ps[0]:g} to {fit_nll[ps[-1]]:.3g} at p={ps[-1]:g}. The unmatched "
                "trend over p is therefore a description only; the verdict compares at matched train NLL."
            ]
            if len(ps) > 1
            else []
        ),
        "Coordinate-dependent measures (Fisher trace and top eigenvalue, Hessian trace and top eigenvalue, SAM sharpness) change "
        "when a layer is stored as W/c with the same function; they are shown beside the invariant ones and never decide.",
        f"All measures use all {ok[0]['measures']['test']['num_params'] if ok else '?'} parameters on {config.c1_inputs} training "
        f"and {config.c1_inputs} held-out inputs; the undamped gamma^2 is {'included' if 'gamma2' in present else 'omitted: its dense Hessian tensor is too large at this size, and its matrix-free estimate is unreliable on a badly conditioned g'}.",
        f"The L2 control uses one weight ({config.c1_l2:g}), stopped at the matched train NLL; it is not tuned per p.",
        f"Reading (b) averages over {config.c1_mixture_masks} common random masks (the same masks at every theta), not all masks.",
        "The noise-floor run differs from the dropout run in its training seed (masks and batch order), at the largest p only.",
    ]


def figures(config: RunConfig, records: List[Mapping[str, Any]], folder: Path) -> List[Path]:
    """One figure per reading: paired ratios against p with seed dots, geometric means and 95% intervals (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(records)
    grid = sorted({float(r["p"]) for r in ok if float(r["p"]) > 0})
    deciding = _deciding(measures_present(ok))
    if not ok or not grid or not deciding:
        return []
    paths = []
    for name, other, title, ylabel in (
        ("c1_curvature.png", "matched", "C1 (a): dropout solution / plain solution at the same train NLL",
         "ratio dropout / plain (matched fit)"),
        ("c1_mixture.png", "mixture", "C1 (b): dropout mixture / deterministic model, same parameters",
         "ratio m-mixture / deterministic"),
    ):
        fig, axes = plt.subplots(1, len(deciding), figsize=(3.6 * len(deciding), 3.4), squeeze=False)
        for ax, m in zip(axes[0], deciding):
            for s, colour, dx in (("train", "C0", -0.01), ("test", "C1", 0.01)):
                means, los, his = [], [], []
                for p in grid:
                    a, b = _pairs(ok, p, s, m, other)
                    ratios = [x / y for x, y in zip(a, b) if x > 0 and y > 0 and math.isfinite(x / y)]
                    ax.plot([p + dx] * len(ratios), ratios, ".", color=colour, alpha=0.35)
                    g, lo, hi = geometric_mean_ci(ratios) if ratios else (np.nan, np.nan, np.nan)
                    means.append(g); los.append(lo if math.isfinite(lo) else g); his.append(hi if math.isfinite(hi) else g)
                means_a = np.array(means, dtype=float)
                err = [np.clip(means_a - np.array(los, dtype=float), 0, None), np.clip(np.array(his, dtype=float) - means_a, 0, None)]
                ax.errorbar(np.array(grid) + dx, means_a, yerr=err, marker="o", capsize=3, color=colour,
                            label=f"{SET_WORDS[s]}: geometric mean, 95% CI (dots: seeds)")
            ax.axhline(1.0, color="0.5", lw=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("dropout rate p")
            ax.set_ylabel(ylabel)
            ax.set_title(WORDS[m], fontsize=8)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
        fig.suptitle(title + " (below 1: flatter)", fontsize=9)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        path = folder / name
        save_figure(fig, path)
        paths.append(path)
    return paths
