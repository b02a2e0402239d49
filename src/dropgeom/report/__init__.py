"""Figures and the report of a run directory (``report.md`` and a self-contained ``report.html``).

:func:`render_report` reads only the run directory (``config.json`` and the
stored unit records), so ``dropgeom report DIR`` re-renders a finished or
partial run without recomputing anything. It writes ``figures/*.png``
(matplotlib, Agg backend), ``summary.json`` (the verdicts and their numbers),
``report.md`` and ``report.html``, each atomically.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..rundir import FINISHED, RunDir, atomic_write_json, atomic_write_text
from .html import markdown_to_html
from .markdown import build_markdown, table

__all__ = ["render_report", "markdown_to_html", "table", "completeness", "config_values"]


def config_values(text: str, config: Any) -> str:
    """Replace ``config.<name>`` references (in backticks or not) by the config's values, for readers.

    A list becomes ``{a, b, c}``, a number or name itself; unknown names are left alone.

    Example:
        >>> from dropgeom.config import RunConfig
        >>> config_values("p in `config.c1_p_grid`, width config.width", RunConfig.from_preset("quick"))
        'p in {0, 0.2, 0.4, 0.7}, width 16'
    """

    def value(match: "re.Match[str]") -> str:
        name = match.group(1) or match.group(2)
        if not hasattr(config, name):
            return match.group(0)
        v = getattr(config, name)
        fmt = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # noqa: E731
        return "{" + ", ".join(fmt(x) for x in v) + "}" if isinstance(v, (list, tuple)) else fmt(v)

    return re.sub(r"`{1,2}config\.(\w+)`{1,2}|\bconfig\.(\w+)", value, text)


def _first_paragraph(doc: str) -> str:
    """A module docstring after its title, up to its example, with reST markup turned into markdown."""
    paras = [p.strip() for p in (doc or "").split("\n\n") if p.strip()]
    keep = []
    for p in paras[1:]:
        if p.startswith(("Example", "Raises")):
            break
        keep.append(p)

    def flow(p: str) -> str:  # a bullet list keeps one line per bullet; prose is one line
        if not p.startswith("* "):
            return " ".join(p.split())
        return "\n".join("* " + " ".join(b.split()) for b in re.split(r"(?m)^\* ", p) if b.strip())

    text = "\n\n".join(flow(p) for p in keep)
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"`\1`", text)  # :func:`~a.b.name` -> `name`
    return text.replace("``", "`").replace("**", "")


def _provisional(verdict: Any, done: int, expected: int) -> Any:
    """The same verdict labelled ``provisional (k of n units): <verdict>``."""
    label = f"provisional ({done} of {expected} units): {verdict.verdict}"
    if dataclasses.is_dataclass(verdict):
        return dataclasses.replace(verdict, verdict=label)
    verdict.verdict = label  # pragma: no cover - a non-dataclass verdict
    return verdict


def completeness(units: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]) -> Tuple[int, int]:
    """``(finished, expected)``: how many of the claim's units have a finished record (status ok or diverged).

    Example:
        >>> completeness([{"key": "a"}, {"key": "b"}], [{"key": "a", "status": "ok"}, {"key": "b", "status": "error"}])
        (1, 2)
    """
    keys = {u["key"] for u in units}
    done = {r.get("key") for r in records if r.get("status") in FINISHED and r.get("key") in keys}
    return len(done), len(keys)


def render_report(run_dir: Union[str, Path], experiments: Optional[Mapping[str, Any]] = None) -> Path:
    """Render figures, ``summary.json``, ``report.md`` and ``report.html`` for ``run_dir``; return the ``report.md`` path.

    ``experiments`` maps claim names to experiment modules (``units``,
    ``summarize``, ``figures``, ``TITLE``); the caller passes them (default:
    :data:`dropgeom.experiments.EXPERIMENTS`). A claim whose units have not all
    finished gets the verdict ``provisional (k of n units): ...``; one with no
    finished unit gets no verdict (``no data (0 of n units)``).

    Raises:
        FileNotFoundError: ``run_dir`` holds no run (no ``config.json``).
        OSError: a file of the report cannot be written (e.g. a read-only folder).
    """
    if experiments is None:
        from ..experiments.sweep import EXPERIMENTS as experiments  # type: ignore[no-redef]

    rd = RunDir(run_dir) if Path(run_dir).is_dir() else None
    if rd is None or not rd.config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json); run `dropgeom reproduce --out {run_dir}` first")
    config = rd.load_config()
    summaries: Dict[str, Dict[str, Any]] = {}
    figures: Dict[str, List[Path]] = {}
    records: Dict[str, List[Dict[str, Any]]] = {}
    titles: Dict[str, str] = {}
    docs: Dict[str, str] = {}
    units: Dict[str, Tuple[int, int]] = {}
    rd.figures.mkdir(parents=True, exist_ok=True)
    for name in config.experiments:
        mod = experiments[name]
        recs = rd.records(name)
        records[name] = recs
        units[name] = done, expected = completeness(mod.units(config), recs)
        titles[name] = mod.TITLE
        docs[name] = config_values(_first_paragraph(mod.__doc__ or ""), config)
        if done == 0:
            summaries[name] = {
                "verdict": _NoData(name, f"no data (0 of {expected} units)", "no unit of this claim has finished; "
                                   "run the same `dropgeom reproduce` command again to compute them"),
                "columns": [], "rows": [],
            }
            figures[name] = []
            continue
        summary = dict(mod.summarize(config, recs))
        for key in ("rule", "rule_b", "what_would_change"):
            if isinstance(summary.get(key), str):
                summary[key] = config_values(summary[key], config)
        if done < expected:
            for key in ("verdict", "verdict_b"):
                if key in summary:
                    summary[key] = _provisional(summary[key], done, expected)
        summaries[name] = summary
        figures[name] = mod.figures(config, recs, rd.figures)
    summary_json = {
        name: {
            **{k: s[k].as_dict() for k in ("verdict", "verdict_b") if k in s},
            **{k: s[k] for k in ("rule", "what_would_change", "caveats") if k in s},
            "evidence": s.get("evidence", []),
            "tests": s.get("tests", {}),
            "runs": len(records[name]),
            "units_finished": units[name][0],
            "units_expected": units[name][1],
        }
        for name, s in summaries.items()
    }
    atomic_write_json(rd.root / "summary.json", summary_json)
    text = build_markdown(rd.root, config, summaries, figures, records, titles, docs, units=units)
    atomic_write_text(rd.root / "report.md", text)
    atomic_write_text(rd.root / "report.html", markdown_to_html(text, base=rd.root))
    return rd.root / "report.md"


@dataclasses.dataclass
class _NoData:
    """The verdict row of a claim without any finished unit."""

    claim: str
    verdict: str
    evidence: str

    def as_dict(self) -> Dict[str, str]:
        return {"claim": self.claim, "verdict": self.verdict, "evidence": self.evidence}
