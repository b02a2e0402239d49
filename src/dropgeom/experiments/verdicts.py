"""A claim's verdict: the labels a pre-stated rule can give, the verdict record, and number formatting for reports.

Example:
    >>> Verdict("C1", VerdictLabel.INCONCLUSIVE.value, "nothing significant").as_dict()["verdict"]
    'inconclusive'
    >>> fmt_ci(1.23456, 0.5, 2.0)
    '1.23 [0.5, 2]'
"""

from __future__ import annotations

import math

from ..options import VerdictLabel
from ..summary import Verdict  # the record a verdict is, shared with the report's typed summary

__all__ = ["VerdictLabel", "Verdict", "fmt", "fmt_ci"]


def fmt(x: float, digits: int = 3) -> str:
    """A number for tables: 3 significant digits, 'nan' for missing."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def fmt_ci(mean: float, lo: float, hi: float) -> str:
    return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"


#: the resolution of every report figure (readable at the report's column width and when zoomed)
