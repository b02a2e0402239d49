r"""Dense linear-algebra kernels the curvature engines share.

:func:`gram` forms :math:`X^\top X` (the Kronecker factors :math:`A` and :math:`B` of KFAC, theory.md section 2) by
blocks of its upper triangle: :math:`\tfrac{k+1}{2k}` of the multiply-adds of one ``X.T @ X`` for ``k`` blocks
(torch exposes no symmetric rank-k update, BLAS ``syrk``), with the lower triangle copied from the upper one and
the diagonal blocks symmetrised, so the result is symmetric to the last bit. :func:`outer_sum` forms
:math:`\sum_{m,t} x_{mt} x_{mt}^\top` of a stack ``[..., T, d]`` in whatever memory layout it comes (a convolution's
channel-first patches and output gradients): row-major stacks go to :func:`gram`, channel-first ones to batched
``[d, T] @ [T, d]`` products, so that no transposed copy of the stack is made.

Example:
    >>> import torch
    >>> X = torch.randn(50, 1100, dtype=torch.float64)
    >>> torch.equal(gram(X), gram(X).T) and torch.allclose(gram(X), X.T @ X)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gram", "outer_sum"]

#: Columns per block of :func:`gram`; narrower matrices take one ``X.T @ X``.
GRAM_BLOCK = 128

#: Bytes of the ``[m, d, d]`` partial products :func:`outer_sum` keeps alive at once.
OUTER_SUM_BYTES = 16 * 1024**2


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


def outer_sum(X: Tensor, max_bytes: int = OUTER_SUM_BYTES) -> Tensor:
    r"""The sum of outer products :math:`\sum_{m,t} x_{mt} x_{mt}^\top` (``[d, d]``) over every row of ``X`` (``[..., T, d]``).

    Equals ``gram(X.reshape(-1, d))`` (up to rounding) and is exactly symmetric, but takes ``X`` in any memory layout
    without copying it: the leading axes are read in memory order; when the rows ``x_mt`` are contiguous the stack is
    one :func:`gram`, when the positions ``t`` are (channel-first: ``X`` a transposed view of ``[..., d, T]``) it is a
    sum of batched ``[d, T] @ [T, d]`` products, ``max_bytes`` of them alive at a time.

    Raises:
        ValueError: ``X`` has fewer than 2 dims or ``max_bytes`` is not positive.

    Example:
        >>> import torch
        >>> Y = torch.randn(5, 3, 7, dtype=torch.float64)   # channel-first: [m, d, T]
        >>> X = Y.transpose(1, 2)                           # rows x_mt: [m, T, d], a view
        >>> torch.allclose(outer_sum(X), gram(X.reshape(-1, 3))), torch.equal(outer_sum(X), outer_sum(X).T)
        (True, True)
    """
    if X.dim() < 2:
        raise ValueError(f"outer_sum needs a stack of rows [..., T, d], got shape {tuple(X.shape)}")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    k = X.dim() - 2
    lead = sorted(range(k), key=lambda i: X.stride(i), reverse=True)  # leading axes in memory order
    X = X.permute(*lead, k, k + 1).reshape(-1, *X.shape[-2:])  # [m, T, d]; a view when those axes are dense
    d = X.shape[-1]
    if X.shape[1] == 1 or X.stride(-1) == 1:
        return gram(X.reshape(-1, d))
    Xt = X.transpose(1, 2)  # [m, d, T]: contiguous for a channel-first stack
    step = max(1, max_bytes // (d * d * X.element_size()))
    out = X.new_zeros(d, d)
    for s in range(0, X.shape[0], step):
        out += torch.bmm(Xt[s : s + step], X[s : s + step]).sum(0)
    return 0.5 * (out + out.T)
