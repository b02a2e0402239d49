"""``report.md`` of a run directory: verdicts, tables, evidence, figures, failures, timings, config.

Example:
    >>> print(table(["a", "b"], [{"a": "1", "b": "x|y"}]))
    | a | b |
    |---|---|
    | 1 | x\\|y |
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["table", "build_markdown", "caveats"]


def caveats(config: Any, records: Dict[str, List[Mapping[str, Any]]]) -> List[str]:
    """What every verdict rests on, computed from the records: model sizes and the curvature set-up (claim-specific
    caveats come with each claim's summary)."""
    train = f"the first {config.max_train} training samples" if config.max_train else "all training samples"
    out = [
        f"Models: float64 MLPs of width {config.width} (C1, C3) and widths {list(config.c2_widths)} x depths "
        f"{list(config.c2_depths)} (C2) on `{config.dataset}` ({train}) projected on {config.input_dim or 'all'} principal "
        f"components, {config.epochs} epochs of Adam (lr {config.lr}, batch {config.batch_size}); {config.seeds} seed(s). "
        "The verdicts hold for this regime, not for every network."
    ]
    curv = [r["curvature"] for rs in records.values() for r in rs if isinstance(r.get("curvature"), Mapping) and "num_params" in r["curvature"]]
    if curv:
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
            errs = [c["gamma2_damped_stderr"] / c["gamma2_damped"] for c in curv if c.get("method") == "stochastic" and c.get("gamma2_damped", 0) > 0 and "gamma2_damped_stderr" in c]
            rel = f" (relative standard error {min(errs):.2g}-{max(errs):.2g})" if errs else ""
            line += (
                f" The stochastic damped gamma^2 averages {config.curvature_samples} sample pairs{rel}, with at most "
                f"{config.curvature_cg_iter or '2P + 100'} conjugate-gradient iterations per solve; the undamped gamma^2 is not "
                "estimated then (on a badly conditioned g its matrix-free estimate is slow and heavy-tailed, theory.md 3)."
            )
        out.append(line)
    # claim-specific caveats (C1's confound and controls, C2's baseline) come with each claim's summary
    return out


def _status(session: Mapping[str, Any]) -> str:
    status = str(session.get("status", "finished"))
    return "killed, or still running" if status == "running" else status


def table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub-flavoured markdown table (``|`` in cells escaped)."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def build_markdown(
    root: Path,
    config: Any,
    summaries: Dict[str, Dict[str, Any]],
    figures: Dict[str, List[Path]],
    records: Dict[str, List[Mapping[str, Any]]],
    titles: Dict[str, str],
    docs: Dict[str, str],
    units: Optional[Mapping[str, Tuple[int, int]]] = None,
) -> str:
    """Assemble the report text (figure links are relative to ``root``).

    ``units`` maps each claim to ``(finished, expected)`` units; an incomplete
    claim is flagged in its section and in the run summary. The optional keys
    of a summary are rendered when present: ``rule`` (quoted beside the
    verdict; ``rule_b`` beside ``verdict_b``), ``tables`` (``{"title", "columns",
    "rows"}``), ``symbols`` (``{symbol: meaning}``, printed before the evidence),
    ``figure_captions`` (``{figure file stem: caption}``, shown under the figure),
    ``caveats`` and ``what_would_change``.
    """
    from .. import __version__

    parts: List[str] = []
    parts.append("# dropgeom: does dropout training behave as the paper claims?\n")
    parts.append(
        f"Run directory `{root}`, preset `{config.preset}`, data `{config.dataset}`, {config.seeds} seed(s); "
        f"dropgeom {__version__}; rendered {time.strftime('%Y-%m-%d %H:%M:%S')}.\n"
    )
    parts.append(
        "Claims (Kimura & Hino, arXiv 2206.10936): C1 dropout flattens the model manifold; "
        "C2 the strength of dropout's regularization depends on the amount of curvature; "
        "C3 dropout essentially corresponds to a regularization that depends on the Fisher information. "
        "Numbers are means over seeds with 95% Student-t intervals in brackets; positive quantities (curvatures and "
        "their ratios) are geometric means with the interval taken on the log scale.\n"
    )
    verdicts = []
    for name, s in summaries.items():
        for key in ("verdict", "verdict_b"):
            if key in s:
                verdicts.append(s[key].as_dict())
    units = dict(units or {})
    missing = {n: (k, t) for n, (k, t) in units.items() if k < t}
    parts.append("## Verdicts\n")
    if missing:
        parts.append(
            "**This run is incomplete**: "
            + "; ".join(f"{n} has {k} of {t} units" for n, (k, t) in missing.items())
            + ". Verdicts on incomplete claims are provisional, and a claim without data has none; "
            "run the same `dropgeom reproduce` command again to finish the run.\n"
        )
    parts.append(table(["claim", "verdict", "evidence"], verdicts) + "\n")

    for name, s in summaries.items():
        parts.append(f"## {titles[name]}\n")
        if name in missing:
            k, t = missing[name]
            parts.append(f"**Incomplete: {k} of {t} units finished.** The numbers below use the finished units only.\n")
        if docs.get(name):
            parts.append(docs[name] + "\n")
        for key in ("verdict", "verdict_b"):
            if key in s:
                v = s[key].as_dict()
                rule = s.get("rule_b" if key == "verdict_b" else "rule")
                parts.append(f"**Verdict ({v['claim']}): {v['verdict']}.**" + (f" Rule: {rule}" if rule else "") + "\n")
        if s.get("columns"):
            parts.append(table(s["columns"], s["rows"]) + "\n")
        if "rows_b" in s:
            parts.append(table(s["columns_b"], s["rows_b"]) + "\n")
        for extra in s.get("tables", []) or []:
            if extra.get("title"):
                parts.append(f"**{extra['title']}**\n")
            parts.append(table(extra["columns"], extra["rows"]) + "\n")
        if s.get("symbols"):
            parts.append("Symbols: " + "; ".join(f"{k}: {v}" for k, v in dict(s["symbols"]).items()) + ".\n")
        if s.get("evidence"):
            parts.append("Evidence:\n")
            parts.append("\n".join(f"- {line}" for line in s["evidence"]) + "\n")
        if s.get("what_would_change"):
            parts.append(f"What would change the verdict: {s['what_would_change']}\n")
        if s.get("caveats"):
            parts.append("Caveats of this claim:\n")
            parts.append("\n".join(f"- {line}" for line in s["caveats"]) + "\n")
        captions = s.get("figure_captions", {}) or {}
        for fig in figures.get(name, []):
            rel = fig.relative_to(root).as_posix()
            caption = str(captions.get(fig.stem, fig.stem)).replace("]", ")").replace("[", "(")
            parts.append(f"![{caption}]({rel})\n")

    parts.append("## Scope and caveats\n")
    parts.append("\n".join(f"- {line}" for line in caveats(config, records)) + "\n")

    parts.append("## Diverged and failed runs\n")
    bad = [
        {"experiment": e, "unit": r.get("key", ""), "status": r.get("status", ""), "detail": r.get("error", r.get("diverged_objective", r.get("diverged", "")))}
        for e, rs in records.items()
        for r in rs
        if r.get("status") != "ok" or r.get("diverged")
    ]
    if bad:
        parts.append(
            "Diverged training (NaN or a loss above the threshold) is recorded and left out of the statistics; "
            "errors are retried when the same command is run again.\n"
        )
        parts.append(table(["experiment", "unit", "status", "detail"], bad) + "\n")
    elif missing:
        parts.append(
            "None of the finished runs diverged or failed; "
            + ", ".join(f"{t - k} unit(s) of {n}" for n, (k, t) in missing.items())
            + " have not run yet.\n"
        )
    else:
        parts.append("None: every run finished with finite losses.\n")

    parts.append("## Timings\n")
    trows = []
    for e, rs in records.items():
        secs = [float(r.get("seconds", 0.0)) for r in rs]
        trows.append(
            {
                "experiment": e,
                "runs": str(len(rs)),
                "compute seconds (sum)": f"{sum(secs):.1f}",
                "seconds per run": f"{(sum(secs) / len(secs)) if secs else 0:.2f}",
            }
        )
    parts.append(table(["experiment", "runs", "compute seconds (sum)", "seconds per run"], trows) + "\n")
    tpath = root / "timings.json"
    if tpath.exists():
        sessions = json.loads(tpath.read_text()).get("sessions", [])
        if sessions:
            parts.append(
                f"{len(sessions)} invocation(s) of `reproduce` on this folder; wall time of each: "
                + ", ".join(f"{s.get('seconds', 0):.1f} s ({_status(s)})" for s in sessions)
                + " (a resumed invocation skips finished runs).\n"
            )
    parts.append("## Config\n")
    parts.append("```json\n" + config.to_json() + "\n```\n")
    parts.append("Metrics of every run: `metrics/<claim>.jsonl` and `metrics/<claim>.csv`; figures in `figures/`.\n")
    return "\n".join(parts)
