r"""C1's summary: the rule at matched fit, reading (b), the tables and the figures.

The experiment itself (training, controls, measures) is :mod:`dropgeom.experiments.c1_flatness`;
its module docstring states the design and the rule.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..config import RunConfig
from .c1_measures import FLATNESS_MEASURES
from .common import Verdict, VerdictLabel, fmt, fmt_ci, save_figure
from .stats import Comparison, adjust, geometric_mean_ci, paired

NAME = "C1"
TITLE = "C1: dropout flattens the model manifold"
SETS = ("train", "test")
SET_WORDS = {"train": "training inputs", "test": "held-out inputs"}
WORDS = {k: w for k, w, _ in FLATNESS_MEASURES}
STATUS = {k: s for k, _, s in FLATNESS_MEASURES}
#: the measures that decide the verdict, fixed before the data (gamma2 only when computed on every run).
#: The natural-gradient measure that decides is the function-space regularised one: the plain one is
#: dominated by the nearly degenerate directions of a badly conditioned g and is a description.
DECIDING = ("mask_e", "mask_m", "natural_gradient_fs_e", "noise_e", "gamma2")

RULE = (
    "paired log-ratio curvature(dropout) / curvature(plain training stopped at the same clean train NLL) per seed, "
    "for every p > 0, deciding measure and input set (training and held-out); Holm over all of them. The deciding "
    "measures are invariant and were fixed before the data: e- and m-curvature along the mask directions, "
    "e-curvature along dropout-noise tangent directions, e-curvature along the natural-gradient direction with the "
    "function-space regulariser (the Fisher of the other input set; chosen over the plain natural gradient, which "
    "is dominated by nearly degenerate directions of a badly conditioned g and is shown as a description), and the "
    "undamped gamma^2 on the exact range of J (first layer, first inputs) when it was computed on every run. A "
    "measure is lower (higher) on an input set when some p is significantly below (above) 1 after correction and "
    "none the other way. Supported: every deciding measure lower on both input sets; refuted: every one higher; "
    "measure-dependent: some lower, some higher; inconclusive: otherwise. Coordinate-dependent measures, the L2 "
    "control (weight tuned per p and seed to the same final train NLL), the noise floor and the unmatched trend "
    "over p are descriptions only."
)


def _ok(records: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    return [r for r in records if r.get("status") == "ok" and isinstance(r.get("measures"), Mapping)]


def _get(r: Optional[Mapping[str, Any]], s: str, m: str) -> float:
    try:
        return float(r["measures"][s][m])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return float("nan")


def measures_present(records: Sequence[Mapping[str, Any]]) -> List[str]:
    """The measures of :data:`~dropgeom.experiments.c1_measures.FLATNESS_MEASURES` that every run carries."""
    ok = _ok(records)
    return [k for k, _, _ in FLATNESS_MEASURES if ok and all(math.isfinite(_get(r, s, k)) for r in ok for s in SETS)]


def _deciding(present: Sequence[str]) -> List[str]:
    """:data:`DECIDING`, fixed before the data: a missing value drops a pair, never a measure; only gamma2
    depends on the records (it decides when computed on every run, ``present``)."""
    return [m for m in DECIDING if m != "gamma2" or m in present]


def _shown(present: Sequence[str], deciding: Sequence[str]) -> List[str]:
    """The measures of the tables: every deciding one and every other one that every run carries."""
    return [k for k, _, _ in FLATNESS_MEASURES if k in present or k in deciding]


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
    """:data:`RULE` on the directions of :func:`_direction` (-1 lower, +1 higher, 0 nothing, 2 both ways over p).

    A (measure, input set) significant both ways over p is neither lower nor higher (its direction depends on
    p, not on the measure): supported when every one is lower, refuted when every one is higher,
    measure-dependent when some are lower and others higher, inconclusive otherwise.

    Example:
        >>> _label({("mask_e", "train"): 2, ("mask_m", "train"): -1})
        'inconclusive'
    """
    vals = list(directions.values())
    lower = [k for k, v in directions.items() if v == -1]
    higher = [k for k, v in directions.items() if v == 1]
    if lower and higher:
        return VerdictLabel.MEASURE_DEPENDENT.value
    if vals and len(lower) == len(vals):
        return VerdictLabel.SUPPORTED.value
    if vals and len(higher) == len(vals):
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


def _l2_clause(ok, grid, deciding) -> str:
    """How dropout compares with the L2 control at the same fit (a description: the rule uses the plain control), by the
    rule's directions with Holm over the same family; the more curved ones with the smallest p at which they are."""
    fam = _family(ok, grid, deciding, "l2")
    dirs = {(m, s): _direction([fam[(p, s, m)] for p in grid]) for m in deciding for s in SETS} if fam else {}
    high = [
        f"{WORDS[m]} on {SET_WORDS[s]} from p={min(p for p in grid if fam[(p, s, m)].sign > 0):g}"
        for (m, s), v in dirs.items()
        if v == 1
    ]
    return (
        f"; against the L2 control at the same fit (a description, Holm over the same family): flatter in "
        f"{sum(v == -1 for v in dirs.values())}, more curved in {len(high)} of {len(dirs)}"
        + (f" ({'; '.join(high)})" if high else "")
    )


def _ratio_cell(c: Optional[Comparison], adjusted: bool = True) -> str:
    if c is None or c.n == 0 or not math.isfinite(c.estimate):
        return "n/a"
    r, lo, hi = c.ratio()
    pv = c.p_adjusted if adjusted else c.p_value
    return f"{fmt(r)} [{fmt(lo)}, {fmt(hi)}] (p={fmt(pv, 2)}, d_z={fmt(c.effect_size, 2)}, n={c.n})"


#: short column labels in words for the per-p table (held-out inputs)
_LABEL = {
    "mask_e": "e-curv. mask dirs",
    "mask_m": "m-curv. mask dirs",
    "natural_gradient_fs_e": "e-curv. nat. gradient (fs-reg.)",
    "noise_e": "e-curv. noise dirs",
    "gamma2": "undamped gamma^2",
    "natural_gradient_e": "e-curv. nat. gradient (plain)",
    "fisher_trace": "Fisher trace",
    "fisher_top": "top Fisher eig.",
    "hessian_trace": "Hessian trace",
    "hessian_top": "top Hessian eig.",
    "sam": "SAM sharpness",
}


def _per_p_rows(ok: Sequence[Mapping[str, Any]], present: Sequence[str]) -> List[Dict[str, str]]:
    """Geometric means of every measure on held-out inputs, fit and weight norm, per p."""
    rows = []
    for p in sorted({float(r["p"]) for r in ok}):
        rs = [r for r in ok if float(r["p"]) == p]
        row = {"p": fmt(p), "runs": str(len(rs))}
        for m in present:
            row[_LABEL.get(m, m)] = fmt_ci(*geometric_mean_ci([_get(r, "test", m) for r in rs]))
        row["train NLL"] = fmt_ci(*geometric_mean_ci([r["train"]["nll"] for r in rs]))
        row["test NLL"] = fmt_ci(*geometric_mean_ci([r["test"]["nll"] for r in rs]))
        row["|theta|"] = fmt_ci(*geometric_mean_ci([_get(r, "test", "param_norm") for r in rs]))
        rows.append(row)
    return rows


_MAIN_COLUMNS = [
    "measure",
    "invariance",
    "inputs",
    "p",
    "dropout / plain at matched fit (Holm p; a description's p uncorrected)",
    "dropout / L2 at matched fit",
    "dropout(p) / plain p=0, unmatched",
]


def _main_table(ok, grid, present, fam) -> Tuple[Dict[str, Any], Dict[Tuple[float, str, str], Comparison]]:
    """Table (a): every measure x input set x p, matched (the rule, or a description), L2 and unmatched."""

    def comps(other: str, ms: Sequence[str]) -> Dict[Tuple[float, str, str], Comparison]:
        return {(p, s, m): paired(*_pairs(ok, p, s, m, other), log=True) for p in grid for s in SETS for m in ms}

    unmatched, l2 = comps("p0", present), comps("l2", present)
    desc = comps("matched", [m for m in present if not any(k[2] == m for k in fam)])
    rows = []
    for m in present:
        for s in SETS:
            for p in grid:
                c = fam.get((p, s, m))
                rows.append(
                    {
                        "measure": WORDS[m],
                        "invariance": STATUS[m],
                        "inputs": SET_WORDS[s],
                        "p": fmt(p),
                        _MAIN_COLUMNS[4]: _ratio_cell(c)
                        if c is not None
                        else _ratio_cell(desc.get((p, s, m)), adjusted=False) + " (description)",
                        _MAIN_COLUMNS[5]: _ratio_cell(l2.get((p, s, m)), adjusted=False),
                        _MAIN_COLUMNS[6]: _ratio_cell(unmatched.get((p, s, m)), adjusted=False),
                    }
                )
    title = (
        "C1 (a): ratio of each measure, dropout over its control (geometric mean over seeds, 95% interval, paired t-test; "
        "Holm-adjusted p only for the deciding measures at matched fit, the rule's family; every other p uncorrected)"
    )
    return {"title": title, "columns": list(_MAIN_COLUMNS), "rows": rows}, desc


def _reading_b(ok, grid, deciding) -> Tuple[Dict[Tuple[float, str, str], Comparison], str, Dict[str, Any]]:
    """Reading (b): the m-mixture against the deterministic model at the same theta, by the same rule."""
    mixed = [r for r in ok if isinstance(r.get("mixture"), Mapping)]
    g2 = all(math.isfinite(_get({"measures": r["mixture"]}, s, "gamma2")) for r in mixed for s in SETS)
    ms = [m for m in deciding if m != "gamma2" or g2]  # the rule's measures; only gamma2 depends on the records
    fam_b = _family(mixed, grid, ms, "mixture")
    dir_b = {(m, s): _direction([fam_b[(p, s, m)] for p in grid]) for m in ms for s in SETS} if fam_b else {}
    label = _label(dir_b) if fam_b else VerdictLabel.INCONCLUSIVE.value
    table = {
        "title": "C1 (b): m-mixture of the dropout model / deterministic model at the same theta (Holm over p x measure x inputs)",
        "columns": ["measure", "inputs", "p", "mixture / deterministic"],
        "rows": [
            {"measure": WORDS[m], "inputs": SET_WORDS[s], "p": fmt(p), "mixture / deterministic": _ratio_cell(c)}
            for (p, s, m), c in fam_b.items()
        ],
    }
    return fam_b, label, table


def _l2_words(ok: Sequence[Mapping[str, Any]], config: RunConfig) -> str:
    ctrls = [r["l2"] for r in ok if isinstance(r.get("l2"), Mapping)]
    n_ok = sum(1 for c in ctrls if c.get("matched"))
    ws = [c["weight"] for c in ctrls if c.get("matched") and "weight" in c]
    fits = [c.get("fits", 1) for c in ctrls]
    lo, hi = config.c1_l2_range
    text = (
        f"L2 control tuned per p and seed to the same final clean train NLL (weight from {config.c1_l2:g} by factors "
        f"of 10, then regula falsi, within [{lo:g}, {hi:g}], at most {config.c1_l2_fits} full-length runs): matched in "
        f"{n_ok} of {len(ctrls)}"
    )
    if ws:
        text += f"; weights {fmt(min(ws))} to {fmt(max(ws))}"
    if fits:
        text += f"; median {fmt(float(np.median(fits)))} runs"
    return text


def _evidence(config, ok, grid, fam, fam_b, directions, deciding) -> List[str]:
    def words(want: int) -> List[str]:
        return [f"{WORDS[m]} on {SET_WORDS[s]}" for (m, s), v in directions.items() if v == want]

    lines: List[str] = []
    if words(-1):
        lines.append("flatter under dropout at matched fit: " + "; ".join(words(-1)))
    if words(1):
        lines.append("more curved under dropout at matched fit: " + "; ".join(words(1)))
    for (p, s, m), c in fam.items():
        lines.append(f"matched fit, {WORDS[m]}, {SET_WORDS[s]}, p={p:g}: dropout / plain = {_ratio_cell(c)}")
    if not grid:
        return lines
    gaps = [r["matched"]["log_nll_gap"] for r in ok if isinstance(r.get("matched"), Mapping) and "log_nll_gap" in r["matched"]]
    steps = [r["matched"].get("steps", 0) for r in ok if isinstance(r.get("matched"), Mapping)]
    if gaps:
        lines.append(
            f"matching: the plain control stopped at the optimizer step closest to the dropout solution's clean train NLL "
            f"(checked every {config.c1_match_every} step(s)); |log NLL ratio| median {fmt(float(np.median(gaps)))}, "
            f"max {fmt(max(gaps))} (tolerance {config.c1_match_tol:g}); median {fmt(float(np.median(steps)))} steps; "
            + _l2_words(ok, config)
        )
    for s in SETS:
        for m in deciding:
            c = paired(*_pairs(ok, max(grid), s, m, "noise_floor"), log=True)
            if c.n:
                lines.append(
                    f"noise floor, {WORDS[m]}, {SET_WORDS[s]}: dropout / dropout with another seed = {_ratio_cell(c, adjusted=False)}"
                )
    for (p, s, m), c in fam_b.items():
        lines.append(f"reading (b), {WORDS[m]}, {SET_WORDS[s]}, p={p:g}: mixture / deterministic = {_ratio_cell(c)}")
    return lines


def _caveats(config: RunConfig, ok: Sequence[Mapping[str, Any]], present: Sequence[str]) -> List[str]:
    ps = sorted({float(r["p"]) for r in ok})
    fit_nll = {p: float(np.mean([r["train"]["nll"] for r in ok if float(r["p"]) == p])) for p in ps}
    out = []
    if len(ps) > 1:
        out.append(
            f"The confound the rule holds fixed: solutions trained at different p also differ in fit; the clean train "
            f"NLL went from {fit_nll[ps[0]]:.3g} at p={ps[0]:g} to {fit_nll[ps[-1]]:.3g} at p={ps[-1]:g}. The unmatched "
            "trend over p is therefore a description only; the verdict compares at matched train NLL."
        )
    g2 = (
        "computed on the first Linear layer's parameters and the first "
        f"{config.c1_gamma2_inputs} inputs of each set (the same subset for every model; all parameters on 100+ inputs cost "
        "minutes per model), for the dropout, matched-plain and mixture models, not the L2 and noise-floor runs"
        if "gamma2" in present
        else "not computed (c1_gamma2_inputs = 0)"
    )
    out += [
        "Coordinate-dependent measures (Fisher trace and top eigenvalue, Hessian trace and top eigenvalue, SAM sharpness) change "
        "when a layer is stored as W/c with the same function; they are shown beside the invariant ones and never decide.",
        f"All other measures use all {ok[0]['measures']['test']['num_params'] if ok else '?'} parameters on {config.c1_inputs} "
        f"training and {config.c1_inputs} held-out inputs; the undamped gamma^2 is {g2}.",
        "The plain natural-gradient curvature (a description) solves g v = J^T r on a badly conditioned g; the deciding "
        "variant adds the Fisher of the other input set (a function-space regulariser, invariant).",
        _l2_words(ok, config) + ".",
        f"Reading (b) averages over {config.c1_mixture_masks} common random masks (the same masks at every theta), not all masks.",
        "The noise-floor run differs from the dropout run in its training seed (masks and batch order), at the largest p only.",
    ]
    return out


def setting_name(config: RunConfig) -> str:
    """C1's one setting (data set and architecture), as C2 and C3 name theirs: ``digits-tanh-w16-d2``."""
    return f"{config.dataset}-{config.activation}-w{config.width}-d{config.depth}"


def _captions(config: RunConfig, ok: Sequence[Mapping[str, Any]]) -> Dict[str, str]:
    seeds = len({r.get("seed") for r in ok})
    where = (
        f"on C1's one setting {setting_name(config)} ({config.dataset}, a {config.activation} MLP of width {config.width} and "
        f"depth {config.depth}; {seeds} seeds)"
    )
    dots = "dots: seeds; geometric means with 95% intervals; below 1: flatter under dropout"
    return {
        "c1_curvature": f"C1 (a), {where}: each deciding measure, dropout solution / plain training stopped at the same "
        f"clean train NLL, against p, on training and held-out inputs ({dots})",
        "c1_mixture": f"C1 (b), {where}: each deciding measure, m-mixture of the dropout model / deterministic model at the "
        f"same parameters, against p ({dots})",
    }


def summarize(config: RunConfig, records: List[Mapping[str, Any]]) -> Dict[str, Any]:
    """Tables, the verdict for reading (a) with reading (b)'s label in its evidence (see :mod:`.c1_flatness`)."""
    ok = _ok(records)
    grid = [p for p in sorted({float(r["p"]) for r in ok}) if p > 0]
    deciding = _deciding(measures_present(ok))
    present = _shown(measures_present(ok), deciding)
    fam = _family(ok, grid, deciding, "matched")
    directions = {(m, s): _direction([fam[(p, s, m)] for p in grid]) for m in deciding for s in SETS}
    verdict = _label(directions) if fam else VerdictLabel.INCONCLUSIVE.value
    n_matched = sum(1 for r in ok if isinstance(r.get("matched"), Mapping) and r["matched"].get("matched"))
    n_ctrl = sum(1 for r in ok if float(r["p"]) > 0)
    main, desc = _main_table(ok, grid, present, fam)
    noise = {(s, m): paired(*_pairs(ok, max(grid), s, m, "noise_floor"), log=True) for s in SETS for m in present} if grid else {}
    fam_b, label_b, table_b = _reading_b(ok, grid, deciding)
    tables = [
        main,
        {
            "title": "C1 noise floor: dropout / dropout with another training seed, at the largest p (should include 1)",
            "columns": ["measure", "inputs", "ratio"],
            "rows": [
                {"measure": WORDS[m], "inputs": SET_WORDS[s], "ratio": _ratio_cell(c, adjusted=False)}
                for (s, m), c in noise.items()
            ],
        },
        table_b,
        {
            "title": "Invariance status of every C1 measure (under theta = A theta': same function, new coordinates)",
            "columns": ["measure", "invariance", "decides the verdict"],
            "rows": [
                {"measure": WORDS[k], "invariance": st, "decides the verdict": "yes" if k in deciding else "no"}
                for k, _, st in FLATNESS_MEASURES
            ],
        },
    ]
    low = [k for k, v in directions.items() if v == -1]
    high = [k for k, v in directions.items() if v == 1]
    mixed = [k for k, v in directions.items() if v == 2]
    summary = (
        f"At matched fit ({n_matched} of {n_ctrl} plain controls within the tolerance), dropout's solutions were "
        f"flatter in {len(low)} and more curved in {len(high)} of {len(directions)} (deciding measure, input set) "
        f"combinations"
        + (f", both ways over p in {len(mixed)}" if mixed else "")
        + _l2_clause(ok, grid, deciding)
        + "; reading (b), the dropout "
        f"mixture vs the deterministic model at the same parameters: {label_b}"
    )
    what = (
        "The verdict would change if the deciding measures moved together at matched fit: all significantly lower under "
        "dropout on both input sets (supported) or all higher (refuted); more seeds narrow the intervals. A measure that "
        "is significant in opposite directions at different p counts as neither lower nor higher."
    )
    return {
        "verdict": Verdict(NAME, verdict, summary),
        "rule": RULE,
        "what_would_change": what,
        "caveats": _caveats(config, ok, present),
        "columns": ["p", "runs", *(_LABEL.get(m, m) for m in present), "train NLL", "test NLL", "|theta|"],
        "rows": _per_p_rows(ok, present),
        "tables": tables,
        "evidence": _evidence(config, ok, grid, fam, fam_b, directions, deciding),
        "figure_captions": _captions(config, ok),
        "tests": {f"{m}|{s}|p={p:g}": c.as_dict() for (p, s, m), c in fam.items()},
        "reading_b": {"label": label_b, "tests": {f"{m}|{s}|p={p:g}": c.as_dict() for (p, s, m), c in fam_b.items()}},
        "matched_tests": {f"{m}|{s}|p={p:g}": c.as_dict() for (p, s, m), c in desc.items()},
    }


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
        (
            "c1_curvature.png",
            "matched",
            "C1 (a): dropout solution / plain solution at the same train NLL",
            "ratio dropout / plain (matched fit)",
        ),
        (
            "c1_mixture.png",
            "mixture",
            "C1 (b): dropout mixture / deterministic model, same parameters",
            "ratio m-mixture / deterministic",
        ),
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
                    means.append(g)
                    los.append(lo if math.isfinite(lo) else g)
                    his.append(hi if math.isfinite(hi) else g)
                means_a = np.array(means, dtype=float)
                err = [
                    np.clip(means_a - np.array(los, dtype=float), 0, None),
                    np.clip(np.array(his, dtype=float) - means_a, 0, None),
                ]
                ax.errorbar(
                    np.array(grid) + dx,
                    means_a,
                    yerr=err,
                    marker="o",
                    capsize=3,
                    color=colour,
                    label=f"{SET_WORDS[s]}: geometric mean, 95% CI (dots: seeds)",
                )
            ax.axhline(1.0, color="0.5", lw=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("dropout rate p")
            ax.set_ylabel(ylabel)
            ax.set_title(WORDS[m], fontsize=8)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
        fig.suptitle(f"{title}; {setting_name(config)} (below 1: flatter)", fontsize=9)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        path = folder / name
        save_figure(fig, path)
        paths.append(path)
    return paths
