"""The report of a run directory (``report.md`` and a self-contained ``report.html``), rendered from its typed summary.

:func:`render_report` receives a :class:`~dropgeom.summary.RunSummary` -- verdicts, tables, evidence,
caveats and figures, built by the experiments (:func:`dropgeom.experiments.run_summary.summarize_run`)
-- and imports no experiment code. It writes ``summary.json`` (the verdicts and their numbers),
``report.md`` and ``report.html`` into the summary's run directory, each atomically.
:func:`dropgeom.pipeline.render_run` does both steps for a run directory, so ``dropgeom report DIR``
re-renders a finished or partial run without recomputing anything.
"""

from __future__ import annotations

from pathlib import Path

from ..rundir import atomic_write_json, atomic_write_text
from ..summary import RunSummary
from .html import markdown_to_html
from .markdown import build_markdown, table

__all__ = ["render_report", "markdown_to_html", "table", "build_markdown"]


def render_report(summary: RunSummary) -> Path:
    """Write ``summary.json``, ``report.md`` and ``report.html`` of ``summary`` into its run directory; return the ``report.md`` path.

    Raises:
        TypeError: ``summary`` is not a :class:`~dropgeom.summary.RunSummary`.
        OSError: a file of the report cannot be written (e.g. a read-only folder).
    """
    if not isinstance(summary, RunSummary):
        raise TypeError(f"render_report needs a dropgeom.summary.RunSummary, got {type(summary).__name__}")
    root = Path(summary.root)
    atomic_write_json(root / "summary.json", summary.to_json())
    text = build_markdown(summary)
    atomic_write_text(root / "report.md", text)
    atomic_write_text(root / "report.html", markdown_to_html(text, base=root))
    return root / "report.md"
