"""The typed summary of a run directory (:class:`~dropgeom.summary.RunSummary`), built from its records.

:func:`summarize_run` reads only the run directory (``config.json``, the unit records and
``timings.json``), asks each claim's module for its verdicts, tables and figures (``summarize``,
``figures``; figures are written to ``figures/``) and its ``ABOUT`` text, and returns the summary the
report renders (:func:`dropgeom.report.render_report`). A claim whose units have not all finished gets
the verdict ``provisional (k of n units): ...``; one with no finished unit gets no verdict
(``no data (0 of n units)``).

Example:
    >>> from dropgeom.config import RunConfig
    >>> config_values("p in `config.c1_p_grid`, width config.width", RunConfig.from_preset("quick"))
    'p in {0, 0.2, 0.4, 0.7}, width 16'
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..curvature._common import default_tol, projection_tolerance
from ..options import TangentSolver
from ..rundir import FINISHED, MARKER, RunDir
from ..summary import ClaimSummary, Figure, RunSummary, Table, Verdict, VerdictEntry
from .sweep import EXPERIMENTS

#: the stochastic curvature estimator's solvers whose tangent projections and solves are exact (not capped CG)
EXACT_SOLVERS = frozenset({TangentSolver.SVD.value, TangentSolver.GRAM.value})

__all__ = ["summarize_run", "claim_summary", "config_values", "completeness", "scope_caveats"]


def config_values(text: str, config: Any) -> str:
    """Replace ``config.<name>`` references (in backticks or not) by the config's values, for readers.

    A list becomes ``{a, b, c}``, a number or name itself; unknown names are left alone.
    """

    def value(match: "re.Match[str]") -> str:
        name = match.group(1) or match.group(2)
        if not hasattr(config, name):
            return match.group(0)
        v = getattr(config, name)
        fmt = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # noqa: E731
        return "{" + ", ".join(fmt(x) for x in v) + "}" if isinstance(v, (list, tuple)) else fmt(v)

    return re.sub(r"`{1,2}config\.(\w+)`{1,2}|\bconfig\.(\w+)", value, text)


def completeness(units: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]) -> Tuple[int, int]:
    """``(finished, expected)``: how many of the claim's units have a finished record (status ok or diverged).

    Example:
        >>> completeness([{"key": "a"}, {"key": "b"}], [{"key": "a", "status": "ok"}, {"key": "b", "status": "error"}])
        (1, 2)
    """
    keys = {u["key"] for u in units}
    done = {r.get("key") for r in records if r.get("status") in FINISHED and r.get("key") in keys}
    return len(done), len(keys)


def _models_caveat(config: Any) -> List[str]:
    """One line per claim of the run: the models, data and training each claim's verdict rests on."""
    from .regularizers import IMAGE_MLP_WIDTH

    train = f"the first {config.max_train} training samples" if config.max_train else "all training samples"
    pcs = f"{config.input_dim} principal components" if config.input_dim else "all features"
    opt = f"{config.epochs} epochs of Adam (lr {config.lr}, batch {config.batch_size})"
    lines = {
        "C1": f"C1: float64 MLPs of width {config.width} and depth {config.depth} on `{config.dataset}` ({train}, {pcs}), {opt}.",
        "C2": f"C2: float64 MLPs of widths {list(config.c2_widths)} x depths {list(config.c2_depths)} x activations "
        f"{', '.join(config.c2_activations)} on {', '.join(f'`{d}`' for d in (config.c2_datasets or (config.dataset,)))} "
        f"({pcs}; {config.max_train or 'all'} training samples"
        + (f", {config.c2_train_size} on Fashion-MNIST" if config.c2_train_size else "")
        + f"), {opt}, dropout at p = {config.c2_p}.",
        "C3": "C3: settings (data set-architecture-training size-optimizer) "
        f"{', '.join(config.c3_grad_settings or ())} (gradients) and {', '.join(config.c3_sweep_settings or ())} (strength "
        f"sweeps): float64 MLPs of width {config.width} on the bundled sets' {pcs}, an MLP 784-{IMAGE_MLP_WIDTH}-"
        f"{IMAGE_MLP_WIDTH}-10 on Fashion-MNIST's pixels and a two-block CNN on the images (settings `cnn`); Adam (lr {config.lr}) or SGD (lr "
        f"{config.c3_sgd_lr}), batch {config.batch_size}"
        + (
            f", at most {config.epochs} epochs and about {config.c3_max_steps} optimizer steps"
            if config.c3_max_steps
            else f", {config.epochs} epochs"
        )
        + f"; Wager's regime: logistic / softmax regression on {', '.join(config.c3_wager_datasets or ())}.",
    }
    out = [lines[name] for name in config.experiments if name in lines]
    return out + [f"{config.seeds} seed(s). The verdicts hold for these regimes, not for every network."]


def scope_caveats(
    config: Any, records: Union[Mapping[str, Sequence[Mapping[str, Any]]], Sequence[Mapping[str, Any]]]
) -> List[str]:
    """What every verdict rests on, computed from the config and the records: each claim's models and data, and the
    curvature set-up (claim-specific caveats come with each claim's summary).

    ``records`` maps claim names to their records (a plain sequence of records is taken as one unnamed claim).

    Example:
        >>> from dropgeom.config import RunConfig
        >>> scope_caveats(RunConfig.from_preset("quick"), {})[0][:33]
        'C1: float64 MLPs of width 16 and '
    """
    by_claim = dict(records) if isinstance(records, Mapping) else {"": list(records)}
    out = _models_caveat(config)
    for name, recs in by_claim.items():
        curv = [r["curvature"] for r in recs if isinstance(r.get("curvature"), Mapping) and "num_params" in r["curvature"]]
        if curv:
            out.append(_curvature_caveat(config, curv, name))
    return out


def _curvature_caveat(config: Any, curv: Sequence[Mapping[str, Any]], claim: str = "") -> str:
    ratios = [c["n_inputs"] * max(c["num_outputs"] - 1, 1) / c["num_params"] for c in curv if "num_outputs" in c]
    lo, hi = min(ratios, default=0.0), max(ratios, default=0.0)
    ratio = (
        (f"; n(K-1)/P {lo:.1f}" if f"{lo:.1f}" == f"{hi:.1f}" else f"; n(K-1)/P between {lo:.1f} and {hi:.1f}") if ratios else ""
    )
    methods = sorted({str(c["method"]) for c in curv if "method" in c})
    span = lambda key: (  # noqa: E731
        f"{min(c[key] for c in curv)}"
        if min(c[key] for c in curv) == max(c[key] for c in curv)
        else f"{min(c[key] for c in curv)}-{max(c[key] for c in curv)}"
    )
    line = (
        f"Curvature{f' ({claim})' if claim else ''}: over {span('n_inputs')} inputs, on {span('num_params')} "
        f"parameters{ratio} (the claim's section says which inputs and parameters), "
        f"damping {config.damping} x the largest eigenvalue of g"
        + (f"; method {', '.join(methods)}." if methods else "; the measures of the claim's section.")
    )
    if "stochastic" in methods:
        errs = [
            c["gamma2_damped_stderr"] / c["gamma2_damped"]
            for c in curv
            if c.get("method") == "stochastic" and c.get("gamma2_damped", 0) > 0 and "gamma2_damped_stderr" in c
        ]
        rel = f" (relative standard error {min(errs):.2g}-{max(errs):.2g})" if errs else ""
        stoch = [c for c in curv if c.get("method") == "stochastic"]
        exact = sum(c.get("solver") in EXACT_SOLVERS for c in stoch)
        how = (
            "its solves and projections exact (a dense SVD of S^T J, or the eigendecomposition of S^T J J^T S)"
            if exact == len(stoch)
            else f"with at most {config.curvature_cg_iter or '2P + 100'} conjugate-gradient iterations per solve"
            + (f" ({exact} of {len(stoch)} runs solved exactly, by an SVD or the Gram matrix)" if exact else "")
        )
        # the records say how many pairs they averaged (C2 has its own count, c2_curvature_samples)
        counts = sorted({int(c["n_samples"]) for c in stoch if "n_samples" in c})
        default = (config.c2_curvature_samples if claim == "C2" else 0) or config.curvature_samples
        pairs = str(default) if not counts else f"{counts[0]}" + (f"-{counts[-1]}" if len(counts) > 1 else "")
        line += (
            f" The stochastic damped gamma^2 averages {pairs} sample pairs{rel}, {how}; the "
            "undamped gamma^2 is not estimated then (its estimate is heavy-tailed on a badly conditioned g, theory.md 3)."
        )
        unknown = len(stoch) - sum("solver" in c for c in stoch)
        if unknown:  # records of an older dropgeom: capped CG, residual unknown, possibly too large
            line += (
                f" {unknown} of {len(stoch)} of these records predate the exact solver and the projection check "
                "(dropgeom before 2026-12-05): their capped conjugate gradients may have left them too large; "
                "rerun those units in a new folder to be sure."
            )
        # the records' projections (float64 experiments): above the flag of the estimator's own warning they did
        # not converge
        worst = [c["projection_residual"] for c in curv if c.get("method") == "stochastic" and "projection_residual" in c]
        flag = projection_tolerance(default_tol(torch.float64))
        failed = [r for r in worst if r > flag]
        if failed:
            line += (
                f" In {len(failed)} of {len(worst)} of these the projections onto the tangent space did not converge "
                f"(relative residual up to {max(failed):.1e}): their gamma^2 are too large (the tangent remainder adds "
                "to the normal part)."
            )
    return line


def _provisional(verdict: Verdict, done: int, expected: int) -> Verdict:
    """The same verdict labelled ``provisional (k of n units): <verdict>``."""
    return dataclasses.replace(verdict, verdict=f"provisional ({done} of {expected} units): {verdict.verdict}")


def _noting_divergences(verdict: Verdict, diverged: int, done: int) -> Verdict:
    """The verdict's evidence ending in how many finished units diverged: a diverged unit is finished (rerunning
    repeats it) but carries no data, so the verdict rests on fewer seeds than the preset's, and the loss may not be
    at random (e.g. the largest ``p``); a reader of the verdict table must see that, not only the failures section."""
    if not diverged:
        return verdict
    note = f"; {diverged} of {done} finished units diverged and are not in the test (see the failures)"
    return dataclasses.replace(verdict, evidence=verdict.evidence + note)


def _diverged(units: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]], part: Optional[str]) -> Tuple[int, int]:
    """``(diverged, finished)``: the claim's units (``part``'s alone, when a verdict rests on one part, as C3a on
    ``grad`` and C3b on ``objectives``: the module's ``VERDICT_PARTS``) that diverged, and that finished."""
    keys = {u["key"] for u in units}
    mine = [r for r in records if r.get("key") in keys and (part is None or r.get("part") == part)]
    return sum(1 for r in mine if r.get("status") == "diverged"), completeness(units, mine)[0]


def _runs(name: str, records: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The run counts of a claim: its failures (diverged or failed runs) and the compute seconds of each run."""
    failures = tuple(
        {
            "experiment": name,
            "unit": r.get("key", ""),
            "status": r.get("status", ""),
            "detail": r.get("error", r.get("diverged_objective", r.get("diverged", ""))),
        }
        for r in records
        if r.get("status") != "ok" or r.get("diverged")
    )
    return {"runs": len(records), "failures": failures, "seconds": tuple(float(r.get("seconds", 0.0)) for r in records)}


def _tables(s: Mapping[str, Any]) -> Tuple[Table, ...]:
    out = []
    if s.get("columns"):
        out.append(Table(s["columns"], s["rows"]))
    if "rows_b" in s:
        out.append(Table(s["columns_b"], s["rows_b"]))
    out += [Table(t["columns"], t["rows"], t.get("title") or "") for t in s.get("tables", []) or []]
    return tuple(out)


def claim_summary(name: str, mod: Any, config: Any, records: List[Dict[str, Any]], figures_dir: Path) -> ClaimSummary:
    """The :class:`~dropgeom.summary.ClaimSummary` of one claim's module from its records (figures written to ``figures_dir``)."""
    units = mod.units(config)
    done, expected = completeness(units, records)
    head = dict(
        name=name, title=mod.TITLE, about=config_values(mod.ABOUT, config), units=(done, expected), **_runs(name, records)
    )
    if done == 0:
        why = "no unit of this claim has finished; run the same `dropgeom reproduce` command again to compute them"
        return ClaimSummary(**head, verdicts=(VerdictEntry("verdict", Verdict(name, f"no data (0 of {expected} units)", why)),))
    s = dict(mod.summarize(config, records))
    text = lambda key: config_values(s[key], config) if isinstance(s.get(key), str) else s.get(key)  # noqa: E731
    verdicts = []
    for key, rule_key in (("verdict", "rule"), ("verdict_b", "rule_b")):
        if key in s:
            v = _noting_divergences(s[key], *_diverged(units, records, getattr(mod, "VERDICT_PARTS", {}).get(key)))
            v = v if done >= expected else _provisional(v, done, expected)
            verdicts.append(VerdictEntry(key, v, text(rule_key)))
    captions = s.get("figure_captions", {}) or {}
    return ClaimSummary(
        **head,
        verdicts=tuple(verdicts),
        tables=_tables(s),
        symbols=tuple(dict(s.get("symbols") or {}).items()),
        evidence=tuple(s.get("evidence", [])),
        what_would_change=text("what_would_change"),
        caveats=tuple(s["caveats"]) if "caveats" in s else None,
        figures=tuple(Figure(p, str(captions.get(p.stem, p.stem))) for p in mod.figures(config, records, figures_dir)),
        tests=s.get("tests", {}),
    )


def summarize_run(run_dir: Union[str, Path], experiments: Optional[Mapping[str, Any]] = None) -> RunSummary:
    """The :class:`~dropgeom.summary.RunSummary` of ``run_dir`` (writes its figures to ``figures/``).

    ``experiments`` maps claim names to experiment modules (default: :data:`dropgeom.experiments.EXPERIMENTS`).

    Raises:
        FileNotFoundError: ``run_dir`` holds no run (no ``config.json``), or is a file.
        OSError: a figure cannot be written (e.g. a read-only folder).
    """
    experiments = EXPERIMENTS if experiments is None else experiments
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise FileNotFoundError(f"{run_dir} is a file, not a run directory (a folder `dropgeom reproduce --out` wrote)")
    if path.is_dir() and not (path / "config.json").exists() and not (path / MARKER).exists() and any(path.iterdir()):
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json): a folder dropgeom did not write")
    rd = RunDir(run_dir) if path.is_dir() else None
    if rd is None or not rd.config_path.exists():
        raise FileNotFoundError(
            f"{run_dir} is not a run directory (no config.json); run `dropgeom reproduce --out {run_dir}` first"
        )
    config = rd.load_config()
    rd.figures.mkdir(parents=True, exist_ok=True)
    records = {name: rd.records(name) for name in config.experiments}
    claims = tuple(claim_summary(name, experiments[name], config, records[name], rd.figures) for name in config.experiments)
    tpath = rd.root / "timings.json"
    sessions = json.loads(tpath.read_text()).get("sessions", []) if tpath.exists() else []
    return RunSummary(rd.root, config, claims, tuple(scope_caveats(config, records)), tuple(sessions))
