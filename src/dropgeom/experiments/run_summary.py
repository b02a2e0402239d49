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

from ..rundir import FINISHED, RunDir
from ..summary import ClaimSummary, Figure, RunSummary, Table, Verdict, VerdictEntry
from .sweep import EXPERIMENTS

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


def scope_caveats(config: Any, records: Sequence[Mapping[str, Any]]) -> List[str]:
    """What every verdict rests on, computed from the records: model sizes and the curvature set-up (claim-specific
    caveats come with each claim's summary)."""
    train = f"the first {config.max_train} training samples" if config.max_train else "all training samples"
    out = [
        f"Models: float64 MLPs of width {config.width} (C1, C3) and widths {list(config.c2_widths)} x depths "
        f"{list(config.c2_depths)} (C2) on `{config.dataset}` ({train}) projected on {config.input_dim or 'all'} principal "
        f"components, {config.epochs} epochs of Adam (lr {config.lr}, batch {config.batch_size}); {config.seeds} seed(s). "
        "The verdicts hold for this regime, not for every network."
    ]
    curv = [r["curvature"] for r in records if isinstance(r.get("curvature"), Mapping) and "num_params" in r["curvature"]]
    if curv:
        out.append(_curvature_caveat(config, curv))
    return out


def _curvature_caveat(config: Any, curv: Sequence[Mapping[str, Any]]) -> str:
    ratios = [c["n_inputs"] * max(c["num_outputs"] - 1, 1) / c["num_params"] for c in curv if "num_outputs" in c]
    ratio = f"; n(K-1)/P between {min(ratios):.1f} and {max(ratios):.1f}" if ratios else ""
    methods = sorted({str(c.get("method", "?")) for c in curv})
    line = (
        f"Curvature: over {min(c['n_inputs'] for c in curv)}-{max(c['n_inputs'] for c in curv)} inputs, "
        f"on {min(c['num_params'] for c in curv)}-{max(c['num_params'] for c in curv)} parameters{ratio} (each claim's "
        "section says which inputs and parameters), "
        f"damping {config.damping} x the largest eigenvalue of g; method {', '.join(methods)}."
    )
    if "stochastic" in methods:
        errs = [
            c["gamma2_damped_stderr"] / c["gamma2_damped"]
            for c in curv
            if c.get("method") == "stochastic" and c.get("gamma2_damped", 0) > 0 and "gamma2_damped_stderr" in c
        ]
        rel = f" (relative standard error {min(errs):.2g}-{max(errs):.2g})" if errs else ""
        line += (
            f" The stochastic damped gamma^2 averages {config.curvature_samples} sample pairs{rel}, with at most "
            f"{config.curvature_cg_iter or '2P + 100'} conjugate-gradient iterations per solve; the undamped gamma^2 is not "
            "estimated then (on a badly conditioned g its matrix-free estimate is slow and heavy-tailed, theory.md 3)."
        )
    return line


def _provisional(verdict: Verdict, done: int, expected: int) -> Verdict:
    """The same verdict labelled ``provisional (k of n units): <verdict>``."""
    return dataclasses.replace(verdict, verdict=f"provisional ({done} of {expected} units): {verdict.verdict}")


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
    done, expected = completeness(mod.units(config), records)
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
            v = s[key] if done >= expected else _provisional(s[key], done, expected)
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
        FileNotFoundError: ``run_dir`` holds no run (no ``config.json``).
        OSError: a figure cannot be written (e.g. a read-only folder).
    """
    experiments = EXPERIMENTS if experiments is None else experiments
    rd = RunDir(run_dir) if Path(run_dir).is_dir() else None
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
    every = [r for rs in records.values() for r in rs]
    return RunSummary(rd.root, config, claims, tuple(scope_caveats(config, every)), tuple(sessions))
