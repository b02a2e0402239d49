"""Per-field checks of :class:`dropgeom.config.RunConfig`: each returns the field's problems as readable sentences.

A check takes the field's name and value (and its bounds or choices) and returns a list of messages, empty when
the value is valid; :data:`dropgeom.config.CHECKS` lists which check each field gets, so every problem of a
config is reported at once.

Example:
    >>> _integer("seeds", 0, lo=1)
    ['seeds must be in [1, inf], got 0']
    >>> _probs("c1_p_grid", (0.0, 1.2))
    ['c1_p_grid: dropout probability 1.2 is outside [0, 1)']
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Tuple

__all__ = ["_integer", "_number", "_positive", "_probs", "_choices", "_ints", "_strengths", "_check"]


def _integer(name: str, v: Any, lo: int, hi: Optional[int] = None) -> List[str]:
    if isinstance(v, bool) or not isinstance(v, int):
        return [f"{name} must be an integer, got {v!r}"]
    if v < lo or (hi is not None and v > hi):
        return [f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}"]
    return []


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _positive(name: str, v: Any) -> List[str]:
    return [] if _number(v) and v > 0 else [f"{name} must be a finite positive number, got {v!r}"]


def _probs(name: str, v: Any, allow_zero: bool = True) -> List[str]:
    out = [f"{name} must not be empty"] if isinstance(v, tuple) and not v else []
    for p in v if isinstance(v, tuple) else (v,):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0) or (p == 0 and not allow_zero):
            out.append(f"{name}: dropout probability {p!r} is outside {'[0' if allow_zero else '(0'}, 1)")
    return out


def _choices(name: str, v: Any, allowed: Tuple[str, ...]) -> List[str]:
    out = [f"{name} must not be empty"] if isinstance(v, tuple) and not v else []
    out += [
        f"{name}: unknown value {x!r}; choose from {list(allowed)}"
        for x in (v if isinstance(v, tuple) else (v,))
        if x not in allowed
    ]
    return out


def _ints(name: str, v: Any, lo: int) -> List[str]:
    out = [] if v else [f"{name} must not be empty"]
    return out + [
        f"{name}: {x!r} must be an integer >= {lo}" for x in v if isinstance(x, bool) or not isinstance(x, int) or x < lo
    ]


def _strengths(name: str, v: Any) -> List[str]:
    out = [] if v else [f"{name} must not be empty"]
    return out + [
        f"{name}: {x!r} is not a positive number (a log grid needs values > 0)" for x in v if not (_number(x) and x > 0)
    ]


def _check(ok: Callable[[Any], bool], message: str) -> Callable[[str, Any], List[str]]:
    """A one-off check: ``message`` (formatted with ``name`` and ``v``) unless ``ok(v)``."""
    return lambda name, v: [] if ok(v) else [message.format(name=name, v=v)]
