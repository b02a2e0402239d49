"""The random numbers of one penalty evaluation, drawn in one fixed order (theory.md section 4.4).

Every strategy of :func:`~dropgeom.dropout.penalty` (closed form, ``_penalty_chain``,
``_penalty_generic``) reads its draws from one :class:`_Draws`, so the paths consume the
same draws in the same order and agree for the same generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__: List[str] = []


def _rademacher(shape: Tuple[int, ...], like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    b = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * b - 1).to(like.dtype)


@dataclass
class _Draws:
    """Every random number of one penalty evaluation (see :func:`_draw`)."""

    units: Dict[str, Tensor] = field(default_factory=dict)  # [n]: one unit per sample
    probe: Optional[Tensor] = None  # [n, R]: Rademacher, the quadratic ``mc`` probe Sigma^{1/2} xi
    hutchinson: Dict[str, Tensor] = field(default_factory=dict)  # [n, *unit shape]: Rademacher


def _draw(
    form: str,
    estimator: str,
    curvature: bool,
    closed: List[str],
    others: List[str],
    shapes: Dict[str, Tuple[int, ...]],
    like: Tensor,
    rank: int,
    generator: Optional[torch.Generator],
) -> _Draws:
    """Draw every random number, in one fixed order, before any term is computed.

    Quadratic form: ``mc``: one probe ``xi`` ``[n, R]``; ``unit``: one unit per sample and
    layer; then, with the curvature term and a sampled estimator, one Rademacher mask
    direction per sample and layer (Hutchinson). Divergence form (sampled): one unit per
    sample and layer, closed-form layers first. Only layers without a closed form draw
    in the quadratic form (the closed form is exact and free there). Both paths consume
    the same draws, so they give the same value for the same generator wherever they
    use the same estimator."""
    n = like.shape[0]
    out = _Draws()

    def unit(k: str) -> Tensor:
        return torch.randint(0, math.prod(shapes[k]), (n,), generator=generator, device=like.device)

    if estimator == "exact":
        return out
    if form == "divergence":
        for k in closed + others:
            out.units[k] = unit(k)
        return out
    if others and estimator == "mc":
        out.probe = _rademacher((n, rank), like, generator)
    if estimator == "unit":
        for k in others:
            out.units[k] = unit(k)
    if curvature:
        for k in others:
            out.hutchinson[k] = _rademacher((n, *shapes[k]), like, generator)
    return out
