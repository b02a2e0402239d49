"""``report.md`` of a run summary: verdicts, tables, evidence, figures, failures, timings, config.

Example:
    >>> print(table(["a", "b"], [{"a": "1", "b": "x|y"}]))
    | a | b |
    |---|---|
    | 1 | x\\|y |
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, List, Mapping, Sequence, Tuple

from ..summary import ClaimSummary, RunSummary

__all__ = ["table", "build_markdown"]


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


def build_markdown(summary: RunSummary) -> str:
    """Assemble the report text of ``summary`` (figure links are relative to its run directory).

    An incomplete claim (``units`` finished < expected) is flagged in its section and in the run summary.
    Each claim's section has its ``about`` text, its verdicts (each beside its rule), tables, symbols,
    evidence, what would change the verdict, caveats and figures (with captions), each when present.
    """
    parts: List[str] = _header(summary)
    missing = {c.name: c.units for c in summary.claims if not c.complete}
    parts += _verdicts(summary, missing)
    for claim in summary.claims:
        parts += _claim_section(claim, Path(summary.root))
    parts.append("## Scope and caveats\n")
    parts.append("\n".join(f"- {line}" for line in summary.caveats) + "\n")
    parts += _failures(summary, missing)
    parts += _timings(summary)
    parts.append("## Config\n")
    parts.append("```json\n" + summary.config.to_json() + "\n```\n")
    parts.append("Metrics of every run: `metrics/<claim>.jsonl` and `metrics/<claim>.csv`; figures in `figures/`.\n")
    return "\n".join(parts)


def _header(summary: RunSummary) -> List[str]:
    from .. import __version__

    config = summary.config
    return [
        "# dropgeom: does dropout training behave as the paper claims?\n",
        f"Run directory `{summary.root}`, preset `{config.preset}`, data `{config.dataset}`, {config.seeds} seed(s); "
        f"dropgeom {__version__}; rendered {time.strftime('%Y-%m-%d %H:%M:%S')}.\n",
        "Claims (Kimura & Hino, arXiv 2206.10936): C1 dropout flattens the model manifold; "
        "C2 the strength of dropout's regularization depends on the amount of curvature; "
        "C3 dropout essentially corresponds to a regularization that depends on the Fisher information. "
        "Numbers are means over seeds with 95% Student-t intervals in brackets; positive quantities (curvatures and "
        "their ratios) are geometric means with the interval taken on the log scale.\n",
    ]


def _verdicts(summary: RunSummary, missing: Mapping[str, Tuple[int, int]]) -> List[str]:
    parts = ["## Verdicts\n"]
    if missing:
        parts.append(
            "**This run is incomplete**: "
            + "; ".join(f"{n} has {k} of {t} units" for n, (k, t) in missing.items())
            + ". Verdicts on incomplete claims are provisional, and a claim without data has none; "
            "run the same `dropgeom reproduce` command again to finish the run.\n"
        )
    rows = [e.verdict.as_dict() for c in summary.claims for e in c.verdicts]
    parts.append(table(["claim", "verdict", "evidence"], rows) + "\n")
    return parts


def _claim_section(c: ClaimSummary, root: Path) -> List[str]:
    parts = [f"## {c.title}\n"]
    if not c.complete:
        parts.append(
            f"**Incomplete: {c.units[0]} of {c.units[1]} units finished.** The numbers below use the finished units only.\n"
        )
    if c.about:
        parts.append(c.about + "\n")
    for e in c.verdicts:
        v = e.verdict.as_dict()
        parts.append(f"**Verdict ({v['claim']}): {v['verdict']}.**" + (f" Rule: {e.rule}" if e.rule else "") + "\n")
    for t in c.tables:
        if t.title:
            parts.append(f"**{t.title}**\n")
        parts.append(table(t.columns, t.rows) + "\n")
    if c.symbols:
        parts.append("Symbols: " + "; ".join(f"{k}: {v}" for k, v in c.symbols) + ".\n")
    if c.evidence:
        parts.append("Evidence:\n")
        parts.append("\n".join(f"- {line}" for line in c.evidence) + "\n")
    if c.what_would_change:
        parts.append(f"What would change the verdict: {c.what_would_change}\n")
    if c.caveats:
        parts.append("Caveats of this claim:\n")
        parts.append("\n".join(f"- {line}" for line in c.caveats) + "\n")
    for fig in c.figures:
        rel = Path(fig.path).relative_to(root).as_posix()
        caption = str(fig.caption).replace("]", ")").replace("[", "(")
        parts.append(f"![{caption}]({rel})\n")
    return parts


def _failures(summary: RunSummary, missing: Mapping[str, Tuple[int, int]]) -> List[str]:
    parts = ["## Diverged and failed runs\n"]
    bad = [row for c in summary.claims for row in c.failures]
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
    return parts


def _timings(summary: RunSummary) -> List[str]:
    parts = ["## Timings\n"]
    rows = [
        {
            "experiment": c.name,
            "runs": str(c.runs),
            "compute seconds (sum)": f"{sum(c.seconds):.1f}",
            "seconds per run": f"{(sum(c.seconds) / len(c.seconds)) if c.seconds else 0:.2f}",
        }
        for c in summary.claims
    ]
    parts.append(table(["experiment", "runs", "compute seconds (sum)", "seconds per run"], rows) + "\n")
    if summary.sessions:
        parts.append(
            f"{len(summary.sessions)} invocation(s) of `reproduce` on this folder; wall time of each: "
            + ", ".join(f"{s.get('seconds', 0):.1f} s ({_status(s)})" for s in summary.sessions)
            + " (a resumed invocation skips finished runs).\n"
        )
    return parts
