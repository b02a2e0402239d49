"""Additive parts of a curvature operator, for sums over batches and processes (theory.md section 2).

:func:`operator_parts` lists the tensors whose sums over disjoint sets of inputs give the operator of the union
(dense, diagonal, blocks; KFAC's factors with the input factor weighted by the batch size), :func:`operator_layout`
what else an operator is made of (its type, index sets and metadata, no matrices), and :func:`operator_from_parts`
builds the operator back from a layout and summed parts. Streaming, chunked ``fisher()`` and ``torch.distributed``
all-reduce use them (:mod:`dropgeom.streaming`): a sum over batches keeps the running totals and a layout, not the
first batch's operator (whose matrices would double the memory the totals take).

Example:
    >>> import torch
    >>> from dropgeom.operators import DiagonalOperator
    >>> a, b = DiagonalOperator(torch.tensor([1.0, 2.0])), DiagonalOperator(torch.tensor([3.0, 4.0]))
    >>> parts = [x + y for x, y in zip(operator_parts(a, 1), operator_parts(b, 1))]
    >>> operator_from_parts(a, parts, count=2, scale=0.5).diag()
    tensor([2., 3.])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor

from .operators import BlockDiagonalOperator, CurvatureOperator, DenseOperator, DiagonalOperator, KFACOperator, KroneckerBlock

__all__ = ["OperatorLayout", "operator_layout", "operator_parts", "operator_from_parts", "sum_parts"]


@dataclass(frozen=True)
class OperatorLayout:
    """An operator without its matrices: what :func:`operator_from_parts` needs besides the summed parts.

    ``cls`` is the operator's class; ``info`` its metadata (``kind``, ``structure``, ``reduction``, ``n``);
    ``size``, ``dtype``, ``device`` its shape and placement; ``kron`` each Kronecker block's
    ``(weight_index, bias_index, name)``; ``index`` the index sets of block-diagonal blocks or of KFAC's dense
    blocks; ``names`` the block names.
    """

    cls: Type[CurvatureOperator]
    info: Dict[str, Any]
    size: int
    dtype: torch.dtype
    device: torch.device
    kron: Tuple[Tuple[Any, Any, str], ...] = ()
    index: Tuple[Tensor, ...] = ()
    names: Tuple[str, ...] = ()


def operator_layout(op: CurvatureOperator) -> OperatorLayout:
    """The :class:`OperatorLayout` of ``op`` (it holds index sets and metadata, none of the matrices).

    Raises:
        TypeError: for an implicit operator (it has no stored pieces).

    Example:
        >>> import torch
        >>> layout = operator_layout(DiagonalOperator(torch.ones(3), kind="exact"))
        >>> layout.cls.__name__, layout.size, layout.info["kind"]
        ('DiagonalOperator', 3, 'exact')
    """
    info = dict(kind=op.kind, structure=op.structure, reduction=op.reduction, n=op.meta.n)
    base = dict(info=info, size=op.size, dtype=op.dtype, device=op.device)
    if isinstance(op, (DenseOperator, DiagonalOperator)):
        return OperatorLayout(type(op), **base)
    if isinstance(op, BlockDiagonalOperator):
        return OperatorLayout(BlockDiagonalOperator, index=tuple(op.index), names=tuple(op.names), **base)
    if isinstance(op, KFACOperator):
        kron = tuple((kb.weight_index, kb.bias_index, kb.name) for kb in op.kron_blocks)
        return OperatorLayout(KFACOperator, kron=kron, index=tuple(idx for _, idx in op.dense_blocks), **base)
    raise TypeError(f"an operator of type {type(op).__name__} has no additive parts")


def operator_parts(op: CurvatureOperator, n: int, copy: bool = True) -> List[Tensor]:
    """The additive pieces of a *sum*-reduced operator over ``n`` inputs, in a fixed order.

    Dense, diagonal and block operators are plain sums over inputs; a KFAC block's input factor ``A`` is a mean
    over the chunk's inputs (docs/theory.md section 2), so it enters as ``n A``. Adding the parts of the operators
    of disjoint chunks (or all-reducing them across processes) and passing the totals to
    :func:`operator_from_parts` gives the operator of all inputs.

    ``copy=False`` returns the operator's own matrices (KFAC's input factors scaled in place): for a caller that
    drops ``op`` and may then add into the parts in place.

    Raises:
        TypeError: for an implicit operator (it has no stored pieces; sum its products instead).

    Example:
        >>> import torch
        >>> a, b = DiagonalOperator(torch.ones(3)), DiagonalOperator(2 * torch.ones(3))
        >>> total = [x + y for x, y in zip(operator_parts(a, 4), operator_parts(b, 6))]
        >>> operator_from_parts(a, total, count=10, scale=0.1).diag()
        tensor([0.3000, 0.3000, 0.3000])
    """
    own = (lambda t: t.clone()) if copy else (lambda t: t)
    if isinstance(op, DenseOperator):
        return [own(op.dense())]
    if isinstance(op, DiagonalOperator):
        return [own(op.diag())]
    if isinstance(op, BlockDiagonalOperator):
        return [own(b) for b in op.blocks]
    if isinstance(op, KFACOperator):
        return [t for kb in op.kron_blocks for t in (kb.A * n if copy else kb.A.mul_(n), own(kb.B))] + [
            own(b) for b, _ in op.dense_blocks
        ]
    raise TypeError(f"an operator of type {type(op).__name__} has no additive parts")


def sum_parts(total: Optional[List[Tensor]], op: CurvatureOperator, n: int) -> List[Tensor]:
    """``total`` plus the parts of ``op`` (over ``n`` inputs), added in place; the parts of ``op`` when ``total`` is
    None. ``op`` must not be used afterwards: its matrices may become the totals (no copy is made).

    Raises:
        TypeError: for an implicit operator (as :func:`operator_parts`).

    Example:
        >>> import torch
        >>> total = sum_parts(None, DiagonalOperator(torch.ones(2)), 3)
        >>> sum_parts(total, DiagonalOperator(torch.tensor([1.0, 2.0])), 5)
        [tensor([2., 3.])]
    """
    parts = operator_parts(op, n, copy=False)
    if total is None:
        return parts
    for acc, part in zip(total, parts):
        acc.add_(part)
    return total


def _part_count(layout: OperatorLayout) -> int:
    """How many tensors :func:`operator_parts` lists for an operator of this layout."""
    if layout.cls in (DenseOperator, DiagonalOperator):
        return 1
    return 2 * len(layout.kron) + len(layout.index)  # KFAC: (n A, B) per Kronecker block, then the dense blocks


def operator_from_parts(
    template: Union[CurvatureOperator, OperatorLayout], parts: Sequence[Tensor], count: int, scale: float, **meta
) -> CurvatureOperator:
    r"""The operator of ``template``'s structure (an operator or its :func:`operator_layout`) from summed
    :func:`operator_parts` over ``count`` inputs.

    ``scale`` multiplies the sums (``1/count`` for the mean, 1 for the sum); KFAC's input factors are divided by
    ``count``. ``meta`` overrides the template's metadata (``kind``, ``structure``, ``reduction``, ``n``).

    .. math::  F = \mathrm{scale} \sum_b F_b, \qquad A = \frac{1}{\mathrm{count}} \sum_b n_b A_b \ \ (\text{KFAC})

    (theory.md section 2: the Fisher is a sum over inputs, KFAC's input factor a mean.)

    Raises:
        TypeError: for an implicit template, or one that is neither an operator nor an :class:`OperatorLayout`.
        ValueError: ``count`` is not a positive int; ``parts`` does not hold the number of tensors the layout has.

    Example:
        >>> import torch
        >>> layout = operator_layout(DiagonalOperator(torch.ones(2)))
        >>> operator_from_parts(layout, [torch.tensor([2.0, 4.0])], count=2, scale=0.5).diag()
        tensor([1., 2.])
    """
    if not isinstance(template, (CurvatureOperator, OperatorLayout)):
        raise TypeError(f"template must be a curvature operator or an OperatorLayout, got {type(template).__name__}")
    layout = template if isinstance(template, OperatorLayout) else operator_layout(template)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count (the number of inputs summed) must be a positive int, got {count!r}")
    expected = _part_count(layout)
    if len(parts) != expected:
        raise ValueError(f"a {layout.cls.__name__} layout takes {expected} parts, got {len(parts)}")
    n = count
    info = dict(layout.info, n=count)
    info.update(meta)
    if layout.cls is DenseOperator:
        return DenseOperator(parts[0] * scale, **info)
    if layout.cls is DiagonalOperator:
        return DiagonalOperator(parts[0] * scale, **info)
    if layout.cls is BlockDiagonalOperator:
        return BlockDiagonalOperator([b * scale for b in parts], list(layout.index), layout.size, names=layout.names, **info)
    k = len(layout.kron)
    kron = [
        KroneckerBlock(A=parts[2 * j] / n, B=parts[2 * j + 1] * scale, weight_index=w, bias_index=b, name=name)
        for j, (w, b, name) in enumerate(layout.kron)
    ]
    dense = [(b * scale, idx) for b, idx in zip(parts[2 * k :], layout.index)]
    return KFACOperator(kron, dense, layout.size, layout.dtype, layout.device, **info)
