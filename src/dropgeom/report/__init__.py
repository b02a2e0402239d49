"""Figures and the report of a run directory (``report.md`` and a self-contained ``report.html``).

:func:`render_report` reads only the run directory (``config.json`` and the
stored unit records), so ``dropgeom report DIR`` re-renders a finished or
partial run without recomputing anything. It writes ``figures/*.png``
(matplotlib, Agg backend), ``summary.json`` (the verdicts and their numbers),
``report.md`` and ``report.html``, each atomically.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Union

from ..rundir import RunDir, atomic_write_json, atomic_write_text
from .html import markdown_to_html
from .markdown import build_markdown, table

__all__ = ["render_report", "markdown_to_html", "table"]


def _first_paragraph(doc: str) -> str:
    """The paragraph after a module docstring's title, with reST markup turned into markdown."""
    paras = [p.strip() for p in (doc or "").split("\n\n") if p.strip()]
    keep = paras[1:2] + [p for p in paras[2:] if p.startswith(("Test:", "**"))]
    text = "\n\n".join(" ".join(p.split()) for p in keep)
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"`\1`", text)  # :func:`~a.b.name` -> `name`
    return text.replace("``", "`").replace("**", "")


def render_report(run_dir: Union[str, Path]) -> Path:
    """Render figures, ``summary.json``, ``report.md`` and ``report.html`` for ``run_dir``; return the ``report.md`` path.

    Raises ``FileNotFoundError`` when ``run_dir`` holds no run (no ``config.json``).
    """
    from ..experiments.sweep import EXPERIMENTS

    rd = RunDir(run_dir) if Path(run_dir).exists() else None
    if rd is None or not rd.config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json); run `dropgeom reproduce --out {run_dir}` first")
    config = rd.load_config()
    summaries: Dict[str, Dict[str, Any]] = {}
    figures: Dict[str, List[Path]] = {}
    records: Dict[str, List[Dict[str, Any]]] = {}
    titles: Dict[str, str] = {}
    docs: Dict[str, str] = {}
    rd.figures.mkdir(parents=True, exist_ok=True)
    for name in config.experiments:
        mod = EXPERIMENTS[name]
        recs = rd.records(name)
        records[name] = recs
        summaries[name] = mod.summarize(config, recs)
        figures[name] = mod.figures(config, recs, rd.figures)
        titles[name] = mod.TITLE
        docs[name] = _first_paragraph(mod.__doc__ or "")
    summary_json = {
        name: {
            **{k: s[k].as_dict() for k in ("verdict", "verdict_b") if k in s},
            "evidence": s.get("evidence", []),
            "tests": s.get("tests", {}),
            "runs": len(records[name]),
        }
        for name, s in summaries.items()
    }
    atomic_write_json(rd.root / "summary.json", summary_json)
    text = build_markdown(rd.root, config, summaries, figures, records, titles, docs)
    atomic_write_text(rd.root / "report.md", text)
    atomic_write_text(rd.root / "report.html", markdown_to_html(text, base=rd.root))
    return rd.root / "report.md"
