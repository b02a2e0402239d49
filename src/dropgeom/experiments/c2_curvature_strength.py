r"""Claim C2: the strength of dropout's regularization depends on the amount of curvature.

The design and the pre-stated rule, in words, are :data:`ABOUT` (the report prints it under the claim's
title, with the run's config values); :func:`summarize` applies the rule to the records.

Example:
    >>> from dropgeom.config import RunConfig
    >>> [u["key"] for u in units(RunConfig.from_preset("test"))][:2]
    ['tanh-w6-d2/s=0.5/seed=0', 'tanh-w6-d2/s=0.5/seed=1']
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from ..config import RunConfig
from .c2_analysis import rounding_zero, within_setting_analysis
from .c2_figures import draw_figures, figure_captions
from .c2_rules import MIN_BLOCKS, MIN_RUNS, MIN_SPAN, SESOI, block_bootstrap, knob_check
from .common import (
    DTYPE,
    ExperimentData,
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
    project_pca,
)
from .stats import geometric_mean_ci, holm, within_group_permutation
from ..options import VerdictLabel

NAME = "C2"
TITLE = "C2: dropout's regularization strength depends on curvature"
#: The claim's design and pre-stated rule in words, printed under its title in the report (``config.<name>``
#: becomes the run's value); the report takes this text, never the module docstring.
ABOUT = (
    "Design: a manipulation inside one architecture. For every setting (activation x width x depth of "
    "`config.c2_*`) and seed, one knob moves the curvature: the input layer's weights at initialisation are "
    "multiplied by each factor in `config.c2_init_scales` (larger weights saturate tanh/softplus units and bend "
    "the outputs along the mask directions). Everything else (data split, the other layers' initialisation, "
    "training) is the same, so a dependence *within* a setting and seed is an effect of the knob and not a "
    "difference between architectures. Curvature is always taken over the same parameter set (the layers around "
    "the first mask, `curvature_params`).\n"
    "\n"
    "Recorded per run (all at the dropout solution, the parameters the regularizer acts on):\n"
    "\n"
    "* the normal curvature along the mask directions over held-out inputs (the measure the analysis uses: "
    "invariant under reparametrisations, docs/theory.md 5) and the damped embedding curvature (theory.md 3; "
    "coordinate-dependent, recorded only);\n"
    "* the strength of the regularizer itself: the measured Bernoulli gap per unit rate `R(theta)/p` (Monte "
    "Carlo over masks) and the curvature share `B/(K+B)` of theory.md 4.2's first-order law (`K`: divergence "
    "term, `B`: curvature term);\n"
    "* the test-NLL gain against an early-stopped plain baseline: plain training from the same initialisation, "
    "taken at its best test-NLL epoch (an oracle stopping rule, which favours the baseline), minus the test NLL "
    "of dropout at the end of training. The gain against plain training at the last epoch is recorded beside "
    "it.\n"
    "\n"
    "Rule (fixed before the data; sign from theory.md 4.2, where the curvature term was measured at about -0.5 "
    "times the divergence term on tanh networks, i.e. curvature *weakens* Bernoulli dropout's regularizer): the "
    "expected sign of the dependence on `log` curvature is negative for all three outcomes. Each outcome is "
    "tested within settings (a permutation test of the within-setting rank correlation, with a mixed model's "
    "slope as the effect size, `within_setting_analysis`), p-values Holm-adjusted over the three outcomes. "
    "Verdict: `supported` when the curvature share's within-setting correlation is significantly negative; "
    "`refuted` when it is significantly positive; `not supported` (rule changed 2026-12-05, see theory.md 8, Rule "
    "changes) when no outcome shows a within-setting effect, the 95% interval of the curvature share's within-block rank "
    "correlation (bootstrap over the setting-seed blocks) lies inside the smallest effect of interest (-0.3, 0.3), the "
    "test has at least 20 runs (those with a curvature on the log scale, not all finished runs) in at least 8 "
    "setting-seed blocks, "
    "and the knob moved the curvature (manipulation check, per setting with Holm over the settings: the within-block "
    "rank correlation of the initial scale with log curvature significantly different from 0, either sign, in every "
    "setting, and the geometric mean curvature of one initial scale at least 2 times another's in every setting); "
    "`inconclusive` otherwise. The pooled Spearman correlations over all runs (outcomes, and the knob) are reported "
    "as descriptions only. Curvatures at rounding level are reported as zero and left off the log axis."
)
#: the sign of d outcome / d log curvature predicted in advance (theory.md 4.2)
EXPECTED_SIGN = -1
OUTCOMES = (
    ("share", "curvature share B/(K+B)"),
    ("strength", "regularizer per unit rate R/p"),
    ("gain", "test-NLL gain vs early-stopped plain"),
)
RULE = (
    "within one architecture the input layer's initial scale moves curvature (the normal curvature along the mask "
    "directions, invariant under reparametrisations); expected sign NEGATIVE (more curvature, "
    "smaller curvature share B/(K+B), smaller R/p and gain; theory.md 4.2). Supported: the curvature share's within-setting "
    "rank correlation with log curvature (permutation within setting-seed blocks, Holm over 3 outcomes) is significantly "
    f"negative; refuted: significantly positive; not supported: no within-setting effect on any outcome, the share's 95% "
    f"interval (bootstrap over setting-seed blocks) inside the smallest effect of interest (-{SESOI:g}, {SESOI:g}), "
    f">= {MIN_RUNS} runs in the test (not all finished runs) in >= {MIN_BLOCKS} setting-seed blocks, provided the knob moved the curvature "
    "(manipulation check per setting, Holm over settings: within-block rank correlation of the initial scale with log "
    f"curvature significantly different from 0, either sign, in every setting, spanning a factor >= {MIN_SPAN:g} in "
    "geometric mean curvature within every setting); inconclusive otherwise. The pooled correlations are descriptions only."
)


def units(config: RunConfig) -> List[Dict[str, Any]]:
    """One unit per (data set, activation, width, depth, initial scale, seed); a data set other than
    ``config.dataset`` is named in the setting (``fashion_mnist-tanh-w16-d2``) and in the unit."""
    out = []
    for ds in config.c2_datasets or (config.dataset,):
        other = {} if ds == config.dataset else {"dataset": ds}
        for a in config.c2_activations:
            for w in config.c2_widths:
                for d in config.c2_depths:
                    setting = f"{a}-w{w}-d{d}" if ds == config.dataset else f"{ds}-{a}-w{w}-d{d}"
                    out += [
                        {
                            "key": f"{setting}/s={k:g}/seed={s}",
                            "setting": setting,
                            "activation": a,
                            "width": w,
                            "depth": d,
                            "init_scale": float(k),
                            "seed": s,
                            **other,
                        }
                        for k in config.c2_init_scales
                        for s in range(config.seeds)
                    ]
    return out


def check_inputs(config: RunConfig) -> None:
    """Fail at once (before any training) when a data set C2 needs is not installed.

    Raises:
        ConfigError: one line saying how to install the missing data set.
    """
    from .regularizers import require_datasets

    require_datasets(config.c2_datasets or (config.dataset,))


def c2_data(config: RunConfig, dataset: str, seed: int) -> Any:
    """C2's data: ``dataset`` on ``input_dim`` principal components, ``max_train`` training inputs
    (``c2_train_size`` on Fashion-MNIST), split by ``seed``.

    Raises:
        FileNotFoundError: Fashion-MNIST is not installed (one line saying how to install it).
    """
    if dataset == config.dataset and dataset != "fashion_mnist":
        return prepare_data(config, seed)
    from ..data import load_dataset

    size = config.c2_train_size if dataset == "fashion_mnist" and config.c2_train_size else config.max_train
    ds = load_dataset(dataset, seed=seed, dtype=DTYPE, max_train=size or None)
    xtr, xte = ds.x_train.to(DTYPE), ds.x_test.to(DTYPE)
    if config.input_dim and config.input_dim < xtr.shape[1]:
        xtr, xte = project_pca(xtr, xte, config.input_dim)
    nc = min(config.curvature_inputs, xte.shape[0])
    return ExperimentData(xtr, ds.y_train, xte, ds.y_test, xte[:nc], ds.y_test[:nc], ds.family, int(ds.num_outputs))


def dropout_terms(model: Any, data: Any, config: RunConfig) -> Dict[str, float]:
    """Summed dropout terms (theory.md 4.2) over the first ``curvature_inputs`` training inputs."""
    from ..dropout import terms

    n = min(config.curvature_inputs, data.x_train.shape[0])
    t = terms(model, data.x_train[:n], data.y_train[:n], family=data.family)
    out = {k: float(getattr(t, k)) for k in ("fisher", "curvature_gaussian", "divergence", "curvature_bernoulli")}
    out["ratio_bernoulli"] = out["curvature_bernoulli"] / out["divergence"] if out["divergence"] else float("nan")
    out["ratio_gaussian"] = out["curvature_gaussian"] / out["fisher"] if out["fisher"] else float("nan")
    tot = out["divergence"] + out["curvature_bernoulli"]
    out["share_bernoulli"] = out["curvature_bernoulli"] / tot if tot else float("nan")
    return out


def scaled_mlp(data: Any, unit: Mapping[str, Any], p: float) -> torch.nn.Sequential:
    """:func:`~dropgeom.experiments.common.build_mlp` with the input layer's weights times ``unit["init_scale"]``."""
    model = build_mlp(data.num_features, data.num_outputs, unit["width"], unit["depth"], unit["activation"], p, unit["seed"])
    with torch.no_grad():
        model[0].weight.mul_(float(unit.get("init_scale", 1.0)))
    return model


def run_unit(config: RunConfig, unit: Mapping[str, Any], workdir: Optional[Path] = None) -> Dict[str, Any]:
    """Plain (early-stopped) and dropout training from one scaled initialisation; gain, strength, curvature."""
    from ..dropout import gap

    seed = unit["seed"]
    data = c2_data(config, unit.get("dataset", config.dataset), seed)
    rec: Dict[str, Any] = {k: unit[k] for k in ("setting", "activation", "width", "depth", "seed")}
    if unit.get("dataset", config.dataset) != config.dataset:
        rec["dataset"] = unit["dataset"]
    rec["init_scale"] = float(unit.get("init_scale", 1.0))
    rec["group"] = f"{unit['setting']}/seed={seed}"
    models, hist = {}, {}
    for objective, p in (("none", 0.0), ("dropout", config.c2_p)):
        model = scaled_mlp(data, unit, p)
        tr = fit(model, data, objective, config, seed, p, _ckpt(workdir, objective))
        rec[f"epochs_{objective}"] = tr["epochs_run"]
        if tr["diverged"]:
            rec["status"] = "diverged"
            rec["diverged_objective"] = objective
            return rec
        rec[f"test_{objective}"] = evaluate_model(model, data.x_test, data.y_test, data.family)
        models[objective], hist[objective] = model, tr["history"]
    stopped = [h["test_nll"] for h in hist["none"] if math.isfinite(float(h.get("test_nll", math.nan)))]
    best = min(stopped) if stopped else rec["test_none"]["nll"]
    rec["test_none_early_stopped"] = float(best)
    rec["gain"] = float(best) - rec["test_dropout"]["nll"]
    rec["gain_last_epoch"] = rec["test_none"]["nll"] - rec["test_dropout"]["nll"]
    t = dropout_terms(models["dropout"], data, config)
    rec["terms"] = t
    n = min(config.curvature_inputs, data.x_train.shape[0])
    g = gap(
        models["dropout"],
        data.x_train[:n],
        data.y_train[:n],
        family=data.family,
        p=config.c2_p,
        method="mc",
        n_samples=config.gap_samples,
        generator=torch.Generator().manual_seed(7919 + seed),
    )
    rec["gap"] = {"value": float(g.value), "stderr": float(g.stderr), "per_rate": float(g.value) / config.c2_p}
    ccfg = config.replace(curvature_samples=config.c2_curvature_samples) if config.c2_curvature_samples else config
    rec["curvature"] = curvature_measures(models["dropout"], data, ccfg, seed, raw=False)
    return rec


def _ok(records: List[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    return [r for r in records if r.get("status") == "ok" and "gain" in r and "gap" in r]


#: the curvature C2's analysis uses: invariant under reparametrisations (docs/theory.md 5), unlike the damped
#: gamma^2, whose parameter-space damping reacts to the very weight scale the knob changes
CURVATURE_KEY = "mask_normal_curvature"
CURVATURE_NAME = "curvature along the mask directions"


def _curvatures(ok: List[Mapping[str, Any]]) -> List[float]:
    """The invariant curvature per run, rounding-level values (relative to the run's largest) set to exactly zero."""
    raw = [float(r["curvature"][CURVATURE_KEY]) for r in ok]
    ref = max((abs(v) for v in raw if math.isfinite(v)), default=1.0)
    return rounding_zero(raw, ref if ref > 0 else 1.0)


def _outcome(r: Mapping[str, Any], key: str) -> float:
    if key == "share":
        return float(r["terms"]["share_bernoulli"])
    if key == "strength":
        return float(r["gap"]["per_rate"])
    return float(r["gain"])


def _per_dataset(ok: List[Mapping[str, Any]], curv: List[float], groups: List[str], default: str) -> List[str]:
    """With several data sets: the curvature share's within-setting test on each alone (description; the verdict
    uses all blocks together)."""
    names = sorted({r.get("dataset", default) for r in ok})
    out = []
    for ds in names if len(names) > 1 else []:
        idx = [i for i, r in enumerate(ok) if r.get("dataset", default) == ds]
        a = within_setting_analysis(
            [curv[i] for i in idx], [_outcome(ok[i], "share") for i in idx], [groups[i] for i in idx], EXPECTED_SIGN
        )
        out.append(
            f"{ds} alone: curvature share against log curvature, within-setting rank correlation "
            f"{fmt(a.get('within_spearman', float('nan')))} (permutation p-value {fmt(a['p_value'])}, {a['n']} runs, not adjusted)"
        )
    return out


def summarize(config: RunConfig, records: List[Mapping[str, Any]]) -> Dict[str, Any]:
    """The verdict by :data:`RULE`, the per-setting table, the evidence and the statistics behind them."""
    ok = _ok(records)
    curv = _curvatures(ok)
    groups = [r.get("group", f"{r['setting']}/seed={r['seed']}") for r in ok]
    analyses = _analyses(ok, curv, groups)
    rows = _setting_rows(ok, curv)
    lines, gains, helped = _outcome_lines(analyses, ok, curv)
    lines += _per_dataset(ok, curv, groups, config.dataset)
    knob, check = _manipulation_check(lines, ok, curv, groups)
    moved = bool(check["moved"])
    share = analyses["share"]
    eq = block_bootstrap([math.log(c) if c > 0 else float("nan") for c in curv], [_outcome(r, "share") for r in ok], groups)
    summary = (
        f"within settings, rank correlation of the curvature share with log curvature {fmt(share['within_spearman'])} "
        + (
            f"[{fmt(eq[1])}, {fmt(eq[2])}] (95% bootstrap over {eq[4]} blocks; 'not supported' needs it inside +-{SESOI:g}) "
            if eq[4] >= MIN_BLOCKS
            else f"(no interval: {eq[4]} blocks, a block bootstrap needs >= {MIN_BLOCKS}) "
        )
        + f"(permutation test, Holm p-value {fmt(share['p_holm'])}; expected negative); R/p: {analyses['strength']['label']}, "
        f"gain vs early-stopped plain: {analyses['gain']['label']}; pooled Spearman (description) {fmt(share['pooled_spearman'])}; "
        f"{eq[3]} runs in the test; {check['short']}"
    )
    cols = [
        "setting",
        "init scale",
        "runs",
        f"{CURVATURE_NAME} (geo. mean)",
        "R/p",
        "B/(K+B)",
        "gain vs early-stopped plain",
        "gain vs last-epoch plain",
    ]
    tests = {f"{key}_{k}": v for key, a in analyses.items() for k, v in a.items() if isinstance(v, (int, float, str))}
    tests["helped"] = helped
    if knob is not None:
        tests["knob_spearman"], tests["knob_p"] = knob.statistic, knob.p_value
    tests.update(share_lo=eq[1], share_hi=eq[2], share_runs=eq[3], share_blocks=eq[4], knob_moved=moved)
    return {
        "verdict": Verdict(NAME, _verdict(analyses, eq, moved), summary),
        "rule": RULE,
        "what_would_change": (
            "a within-setting correlation of the curvature share with log curvature that is significant after Holm correction "
            f"(negative: supported, positive: refuted); 'not supported' needs its 95% interval inside +-{SESOI:g} and a knob "
            f"that moves the curvature by a factor >= {MIN_SPAN:g} in every setting (wider initial scales); more seeds or more "
            "initial scales per block give the tests power and narrow the interval"
        ),
        "caveats": [
            f"dropout (p = {config.c2_p}) lowered the test NLL against the early-stopped plain baseline in {helped} of {len(gains)} "
            f"runs and against plain training at its last epoch in {sum(1 for r in ok if r.get('gain_last_epoch', 0) > 0)}: "
            "much of dropout's gain over plain training at the last epoch is what early stopping also gives",
            "the plain baseline is stopped at its best test-NLL epoch (an oracle rule that favours it); the gain against "
            "plain training at the last epoch is shown beside it",
            "the initial scale moves more than curvature (weight norm, fit); the within-setting slope measures the knob's "
            "effect through everything it changes, curvature being the measured mediator",
        ],
        "columns": cols,
        "rows": rows,
        "evidence": lines,
        "figure_captions": figure_captions(ok, CURVATURE_NAME, config.c2_p),
        "tests": tests,
    }


def _analyses(ok: List[Mapping[str, Any]], curv: List[float], groups: List[str]) -> Dict[str, Dict[str, Any]]:
    """Each outcome against log curvature within settings, Holm-adjusted over the outcomes and labelled."""
    analyses = {key: within_setting_analysis(curv, [_outcome(r, key) for r in ok], groups, EXPECTED_SIGN) for key, _ in OUTCOMES}
    adjusted = holm([a["p_value"] for a in analyses.values()])
    for (key, _), q in zip(OUTCOMES, adjusted):
        a = analyses[key]
        a["p_holm"] = q
        est = a.get("within_spearman", float("nan"))
        if a["label"] != "too little data":
            if math.isfinite(q) and q < 0.05 and math.isfinite(est) and est != 0:
                a["label"] = "predicted sign" if np.sign(est) == EXPECTED_SIGN else "opposite sign"
            else:
                a["label"] = "no effect"
    return analyses


def _setting_rows(ok: List[Mapping[str, Any]], curv: List[float]) -> List[Dict[str, str]]:
    """One table row per (setting, initial scale): curvature, strength, share and gains with their intervals."""
    rows = []
    for s in sorted({(r["setting"], r["init_scale"]) for r in ok}):
        rs = [r for r, c in zip(ok, curv) if (r["setting"], r["init_scale"]) == s]
        cs = [c for r, c in zip(ok, curv) if (r["setting"], r["init_scale"]) == s]
        zeros = sum(1 for c in cs if c == 0.0)
        rows.append(
            {
                "setting": s[0],
                "init scale": fmt(s[1]),
                "runs": str(len(rs)),
                f"{CURVATURE_NAME} (geo. mean)": fmt_ci(*geometric_mean_ci(cs)) + (f" ({zeros} zero)" if zeros else ""),
                "R/p": fmt_ci(*mean_ci([_outcome(r, "strength") for r in rs])),
                "B/(K+B)": fmt_ci(*mean_ci([_outcome(r, "share") for r in rs])),
                "gain vs early-stopped plain": fmt_ci(*mean_ci([r["gain"] for r in rs])),
                "gain vs last-epoch plain": fmt_ci(*mean_ci([r.get("gain_last_epoch", float("nan")) for r in rs])),
            }
        )
    return rows


def _outcome_lines(
    analyses: Mapping[str, Mapping[str, Any]], ok: List[Mapping[str, Any]], curv: List[float]
) -> Tuple[List[str], List[float], int]:
    """``(evidence lines, gains, runs where dropout helped)``: one line per outcome, the gains, zero curvatures."""
    lines = []
    for key, label in OUTCOMES:
        a = analyses[key]
        lines.append(
            f"{label} against the log {CURVATURE_NAME}, within settings ({a['settings']} setting-seed blocks, {a['n']} runs): "
            f"within-setting rank correlation {fmt(a['within_spearman'])}, permutation p-value {fmt(a['p_value'])} "
            f"(Holm {fmt(a['p_holm'])}); mixed-model slope {fmt(a['slope'])} [{fmt(a['slope_lo'])}, {fmt(a['slope_hi'])}] "
            f"per unit of log curvature; pooled Spearman {fmt(a['pooled_spearman'])} (description only) -> {a['label']}"
        )
    gains = [float(r["gain"]) for r in ok]
    helped = sum(1 for g in gains if g > 0)
    lines.append(
        f"mean gain of dropout on test NLL against the early-stopped plain baseline: {fmt_ci(*mean_ci(gains))}; "
        f"dropout helped in {helped} of {len(gains)} runs"
    )
    zeros = sum(1 for c in curv if c == 0.0)
    if zeros:
        lines.append(
            f"{zeros} run(s) have a {CURVATURE_NAME} at rounding level, reported as zero and left out of the log-curvature tests"
        )
    return lines, gains, helped


def _manipulation_check(
    lines: List[str], ok: List[Mapping[str, Any]], curv: List[float], groups: List[str]
) -> Tuple[Any, Dict[str, Any]]:
    """``(pooled test, check)``: did the knob move the curvature in every setting, far enough (:func:`.c2_rules.knob_check`)?
    Its evidence line goes first in ``lines``, the pooled within-block correlation (a description) after it."""
    if not ok:
        return None, {"moved": False, "short": "no runs"}
    knob = within_group_permutation([r["init_scale"] for r in ok], [math.log(c) if c > 0 else float("nan") for c in curv], groups)
    check = knob_check(ok, curv, groups)
    lines.insert(0, check["line"])
    lines.insert(
        1,
        f"pooled over every setting (a description; settings moving the curvature in opposite directions cancel in it): "
        f"within-block rank correlation of the initial scale with the log {CURVATURE_NAME} {fmt(knob.statistic)} "
        f"(permutation p-value {fmt(knob.p_value)})",
    )
    return knob, check


def _verdict(analyses: Mapping[str, Mapping[str, Any]], eq: Tuple[float, float, float, int, int], moved: bool) -> str:
    """:data:`RULE` applied: the curvature share's sign decides; ``not supported`` needs the share's 95% interval
    ``eq`` (:func:`.c2_rules.block_bootstrap`: rho, lo, hi, runs, blocks) inside the smallest effect of interest, enough
    runs and blocks in the test, no outcome with an effect, and a knob that moved the curvature."""
    share = analyses["share"]
    if share["label"] == "predicted sign":
        return VerdictLabel.SUPPORTED.value
    if share["label"] == "opposite sign":
        return VerdictLabel.REFUTED.value
    _, lo, hi, runs, blocks = eq
    equivalent = math.isfinite(lo) and math.isfinite(hi) and -SESOI < lo and hi < SESOI
    if all(analyses[k]["label"] == "no effect" for k, _ in OUTCOMES) and runs >= MIN_RUNS and blocks >= MIN_BLOCKS:
        if moved and equivalent:
            return VerdictLabel.NOT_SUPPORTED.value
    return VerdictLabel.INCONCLUSIVE.value


def figures(config: RunConfig, records: List[Mapping[str, Any]], folder: Path) -> List[Path]:
    """One figure per setting, ``c2_<setting>.png``: the manipulation check and each outcome against the curvature along
    the mask directions, one line per seed (:mod:`.c2_figures`)."""
    ok = _ok(records)
    return draw_figures(ok, _curvatures(ok), _outcome, folder, CURVATURE_NAME) if ok else []
