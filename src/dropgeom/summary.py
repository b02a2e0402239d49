"""The typed summary of a run: what the report renders, built by the experiments (issue #8, item 5).

The experiments (:mod:`dropgeom.experiments.summary`) turn a run directory into a :class:`RunSummary`:
one :class:`ClaimSummary` per claim with its verdicts (each with the rule that gave it), tables,
evidence, caveats and figures, and the counts of its runs. The report
(:func:`dropgeom.report.render_report`) renders that object and imports no experiment code, so what a
report says is decided by the experiments' summary builders alone. This module imports nothing from
dropgeom (base layer).

Example:
    >>> v = Verdict("C1", "inconclusive", "nothing significant")
    >>> claim = ClaimSummary("C1", "C1: a title", verdicts=(VerdictEntry("verdict", v, rule="a rule"),))
    >>> claim.to_json()["verdict"]["verdict"], claim.to_json()["rule"]
    ('inconclusive', 'a rule')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

__all__ = ["Verdict", "VerdictEntry", "Table", "Figure", "ClaimSummary", "RunSummary"]


@dataclass
class Verdict:
    """A claim's verdict (a :class:`~dropgeom.options.VerdictLabel` value, or a provisional / no-data label), and why."""

    claim: str
    verdict: str
    evidence: str

    def as_dict(self) -> Dict[str, str]:
        return {"claim": self.claim, "verdict": self.verdict, "evidence": self.evidence}


@dataclass(frozen=True)
class VerdictEntry:
    """One verdict of a claim and the rule that gave it; ``key`` names it in ``summary.json`` (``verdict``, ``verdict_b``).

    ``rule``: ``None`` when the claim states none (then ``summary.json`` has no ``rule`` for it).
    """

    key: str
    verdict: Verdict
    rule: Optional[str] = None


@dataclass(frozen=True)
class Table:
    """A table of the report: column names, rows (``{column: cell}``) and an optional bold title above it."""

    columns: Sequence[str]
    rows: Sequence[Mapping[str, Any]]
    title: str = ""


@dataclass(frozen=True)
class Figure:
    """A figure file of the run directory and its caption."""

    path: Path
    caption: str


@dataclass(frozen=True)
class ClaimSummary:
    """Everything the report says about one claim, in the order it says it.

    ``about``: the design and the rule in words (with the run's config values); ``units``: ``(finished,
    expected)``; ``failures``: the diverged or failed runs (``{"unit", "status", "detail"}``); ``seconds``: the
    compute seconds of each run. ``what_would_change`` and ``caveats`` are ``None`` when the claim has none
    (and then absent from ``summary.json``); ``tests`` holds the statistics behind the verdicts.
    """

    name: str
    title: str
    about: str = ""
    verdicts: Tuple[VerdictEntry, ...] = ()
    tables: Tuple[Table, ...] = ()
    symbols: Tuple[Tuple[str, str], ...] = ()
    evidence: Tuple[str, ...] = ()
    what_would_change: Optional[str] = None
    caveats: Optional[Tuple[str, ...]] = None
    figures: Tuple[Figure, ...] = ()
    tests: Mapping[str, Any] = field(default_factory=dict)
    units: Tuple[int, int] = (0, 0)
    runs: int = 0
    failures: Tuple[Mapping[str, Any], ...] = ()
    seconds: Tuple[float, ...] = ()

    @property
    def complete(self) -> bool:
        """Whether every unit of the claim has finished."""
        return self.units[0] >= self.units[1]

    def to_json(self) -> Dict[str, Any]:
        """The claim's entry of ``summary.json``: its verdicts and their numbers."""
        out: Dict[str, Any] = {e.key: e.verdict.as_dict() for e in self.verdicts}
        for e in self.verdicts:  # ``verdict`` -> ``rule``, ``verdict_b`` -> ``rule_b``
            if e.rule is not None:
                out["rule" + e.key[len("verdict") :]] = e.rule
        if self.what_would_change is not None:
            out["what_would_change"] = self.what_would_change
        if self.caveats is not None:
            out["caveats"] = list(self.caveats)
        out.update(
            evidence=list(self.evidence),
            tests=self.tests,
            runs=self.runs,
            units_finished=self.units[0],
            units_expected=self.units[1],
        )
        return out


@dataclass(frozen=True)
class RunSummary:
    """The summary of a run directory: its config, what every verdict rests on, and one summary per claim.

    ``config`` is the run's config (the report prints its preset, data set, seeds and JSON); ``caveats``
    the scope of every verdict; ``sessions`` the invocations of ``reproduce`` (``timings.json``).
    """

    root: Path
    config: Any
    claims: Tuple[ClaimSummary, ...]
    caveats: Tuple[str, ...] = ()
    sessions: Tuple[Mapping[str, Any], ...] = ()

    def to_json(self) -> Dict[str, Any]:
        """``summary.json``: ``{claim name: ClaimSummary.to_json()}``."""
        return {c.name: c.to_json() for c in self.claims}
