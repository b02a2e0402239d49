r"""Dense linear-algebra kernels the curvature engines share.

:func:`gram` forms :math:`X^\top X` (the Kronecker factors :math:`A` and :math:`B` of KFAC, theory.md section 2) by
blocks of its upper triangle: :math:`\tfrac{k+1}{2k}` of the multiply-adds of one ``X.T @ X`` for ``k`` blocks
(torch exposes no symmetric rank-k update, BLAS ``syrk``), with the lower triangle copied from the upper one and
the diagonal blocks symmetrised, so the result is symmetric to the last bit.

Example:
    >>> import torch
    >>> X = torch.randn(50, 1100, dtype=torch.float64)
    >>> torch.equal(gram(X), gram(X).T) and torch.allclose(gram(X), X.T @ X)
    True
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["gram"]

#: Columns per block of :func:`gram`; narrower matrices take one ``X.T @ X``.
GRAM_BLOCK = 128


def gram(X: Tensor, block: int = GRAM_BLOCK) -> Tensor:
    r"""The Gram matrix :math:`X^\top X` (``[d, d]``) of ``X`` (``[m, d]``), exactly symmetric.

    Raises:
        ValueError: ``X`` is not 2-D or ``block`` is not positive.

    Example:
        >>> import torch
        >>> gram(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([[10., 14.],
                [14., 20.]])
    """
    if X.dim() != 2:
        raise ValueError(f"gram needs a 2-D matrix, got shape {tuple(X.shape)}")
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    d = X.shape[1]
    if d <= block:
        return X.T @ X
    out = X.new_empty(d, d)
    for i in range(0, d, block):
        upper = X[:, i : i + block].T @ X[:, i:]  # rows i..i+block of the upper triangle and the diagonal block
        w = min(block, d - i)
        out[i : i + w, i : i + w] = 0.5 * (upper[:, :w] + upper[:, :w].T)  # symmetric to the last bit
        out[i : i + w, i + w :] = upper[:, w:]
        out[i + w :, i : i + w] = upper[:, w:].T
    return out
