"""Additive parts of a curvature operator, for sums over batches and processes (theory.md section 2).

:func:`operator_parts` lists the tensors whose sums over disjoint sets of inputs give the operator of the union
(dense, diagonal, blocks; KFAC's factors with the input factor weighted by the batch size), and
:func:`operator_from_parts` builds the operator back from summed parts. Streaming and ``torch.distributed``
all-reduce use them (:mod:`dropgeom.streaming`).

Example:
    >>> import torch
    >>> from dropgeom.operators import DiagonalOperator
    >>> a, b = DiagonalOperator(torch.tensor([1.0, 2.0])), DiagonalOperator(torch.tensor([3.0, 4.0]))
    >>> parts = [x + y for x, y in zip(operator_parts(a, 1), operator_parts(b, 1))]
    >>> operator_from_parts(a, parts, count=2, scale=0.5).diag()
    tensor([2., 3.])
"""

from __future__ import annotations

from typing import List, Sequence

from torch import Tensor

from .operators import BlockDiagonalOperator, CurvatureOperator, DenseOperator, DiagonalOperator, KFACOperator, KroneckerBlock

__all__ = ["operator_parts", "operator_from_parts"]


def operator_parts(op: CurvatureOperator, n: int) -> List[Tensor]:
    """The additive pieces of a *sum*-reduced operator over ``n`` inputs, in a fixed order.

    Dense, diagonal and block operators are plain sums over inputs; a KFAC block's input factor ``A`` is a mean
    over the chunk's inputs (docs/theory.md section 2), so it enters as ``n A``. Adding the parts of the operators
    of disjoint chunks (or all-reducing them across processes) and passing the totals to
    :func:`operator_from_parts` gives the operator of all inputs.

    Raises:
        TypeError: for an implicit operator (it has no stored pieces; sum its products instead).

    Example:
        >>> import torch
        >>> a, b = DiagonalOperator(torch.ones(3)), DiagonalOperator(2 * torch.ones(3))
        >>> total = [x + y for x, y in zip(operator_parts(a, 4), operator_parts(b, 6))]
        >>> operator_from_parts(a, total, count=10, scale=0.1).diag()
        tensor([0.3000, 0.3000, 0.3000])
    """
    if isinstance(op, DenseOperator):
        return [op.dense().clone()]
    if isinstance(op, DiagonalOperator):
        return [op.diag().clone()]
    if isinstance(op, BlockDiagonalOperator):
        return [b.clone() for b in op.blocks]
    if isinstance(op, KFACOperator):
        return [t for kb in op.kron_blocks for t in (kb.A * n, kb.B.clone())] + [b.clone() for b, _ in op.dense_blocks]
    raise TypeError(f"an operator of type {type(op).__name__} has no additive parts")


def operator_from_parts(
    template: CurvatureOperator, parts: Sequence[Tensor], count: int, scale: float, **meta
) -> CurvatureOperator:
    """The operator of the same structure as ``template`` from summed :func:`operator_parts` over ``count`` inputs.

    ``scale`` multiplies the sums (``1/count`` for the mean, 1 for the sum); KFAC's input factors are divided by
    ``count``.

    Raises:
        TypeError: for an implicit template.
    ``meta`` overrides the template's metadata (``kind``, ``structure``, ``reduction``, ``n``).
    """
    n = count
    info = dict(kind=template.kind, structure=template.structure, reduction=template.reduction, n=count)
    info.update(meta)
    if isinstance(template, DenseOperator):
        return DenseOperator(parts[0] * scale, **info)
    if isinstance(template, DiagonalOperator):
        return DiagonalOperator(parts[0] * scale, **info)
    if isinstance(template, BlockDiagonalOperator):
        return BlockDiagonalOperator([b * scale for b in parts], template.index, template.size, names=template.names, **info)
    if isinstance(template, KFACOperator):
        k = len(template.kron_blocks)
        kron = [
            KroneckerBlock(
                A=parts[2 * j] / n,
                B=parts[2 * j + 1] * scale,
                weight_index=kb.weight_index,
                bias_index=kb.bias_index,
                name=kb.name,
            )
            for j, kb in enumerate(template.kron_blocks)
        ]
        dense = [(b * scale, idx) for b, (_, idx) in zip(parts[2 * k :], template.dense_blocks)]
        return KFACOperator(kron, dense, template.size, template.dtype, template.device, **info)
    raise TypeError(f"an operator of type {type(template).__name__} has no additive parts")
