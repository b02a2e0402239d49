"""The dense linear algebra behind :mod:`dropgeom.operators`: conjugate gradients, the top eigenpairs of a
symmetric matrix, and the argument checks the operators share.

:func:`conjugate_gradient` solves ``A x = b`` for a symmetric positive definite ``A`` given by its product;
:func:`top_eigenpairs` uses ``eigh``, or Lanczos (ARPACK) for a few eigenpairs of a large matrix. Both are
re-exported by :mod:`dropgeom.operators`.

Example:
    >>> import torch
    >>> top_eigenpairs(torch.diag(torch.tensor([2.0, 7.0])), 1)[0]
    tensor([7.])
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["conjugate_gradient", "top_eigenpairs"]


def _as_matrix(v: Tensor, p: int) -> Tuple[Tensor, bool]:
    if v.dim() == 1:
        if v.shape[0] != p:
            raise ValueError(f"vector must have P={p} entries, got {tuple(v.shape)}")
        return v[:, None], True
    if v.dim() == 2 and v.shape[0] == p:
        return v, False
    raise ValueError(f"expected a vector [P={p}] or a matrix [P={p}, m], got {tuple(v.shape)}")


def conjugate_gradient(mv: Callable[[Tensor], Tensor], b: Tensor, tol: float = 1e-10, max_iter: Optional[int] = None) -> Tensor:
    r"""Solve ``A x = b`` for symmetric positive definite ``A`` given as ``mv`` (Hestenes & Stiefel 1952).

    ``b`` may be ``[P]`` or ``[P, m]`` (columns solved together). Stops when
    ``|r| <= tol |b|`` for every column or after ``max_iter`` (default ``2 P``) steps.

    .. math::  \alpha_k = \frac{r_k^T r_k}{p_k^T A p_k},\quad x_{k+1} = x_k + \alpha_k p_k,\quad
               r_{k+1} = r_k - \alpha_k A p_k,\quad p_{k+1} = r_{k+1} + \frac{r_{k+1}^T r_{k+1}}{r_k^T r_k} p_k

    Raises:
        TypeError: ``b`` is not a tensor.
        ValueError: ``b`` is neither ``[P]`` nor ``[P, m]``; ``max_iter`` is neither ``None`` nor an
            int ``>= 0``. What ``mv`` raises passes through.

    Example:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x = conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.tensor([1.0, 2.0], dtype=torch.float64))
        True
    """
    if not isinstance(b, Tensor):
        raise TypeError(f"b must be a tensor [P] or [P, m], got {type(b).__name__}")
    if b.dim() not in (1, 2):
        raise ValueError(f"b must be a vector [P] or a matrix [P, m], got shape {tuple(b.shape)}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 0):
        raise ValueError(f"max_iter must be None or an int >= 0, got {max_iter!r}")
    squeeze = b.dim() == 1
    B = b[:, None] if squeeze else b
    x = torch.zeros_like(B)
    r = B.clone()
    p = r.clone()
    rs = (r * r).sum(0)
    bnorm = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
    max_iter = 2 * B.shape[0] if max_iter is None else max_iter
    for _ in range(max_iter):
        if bool((rs.sqrt() <= tol * bnorm).all()):
            break
        Ap = mv(p)
        denom = (p * Ap).sum(0)
        alpha = torch.where(denom > 0, rs / denom, torch.zeros_like(rs))
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = (r * r).sum(0)
        beta = torch.where(rs > 0, rs_new / rs, torch.zeros_like(rs))
        p = r + beta * p
        rs = rs_new
    return x[:, 0] if squeeze else x


def top_eigenpairs(matrix: Tensor, k: int, tol: float = 1e-8) -> Tuple[Tensor, Tensor]:
    """The ``k`` largest eigenpairs of a symmetric matrix (values descending, vectors ``[m, k]``).

    A full ``eigh`` costs ``O(m^3)`` whatever ``k``; for a few eigenpairs of a
    large matrix, Lanczos (ARPACK through :func:`scipy.sparse.linalg.eigsh`)
    needs only products and is far faster, so it is used when ``m > 256`` and
    ``k <= m / 4``.

    Raises:
        ValueError: ``matrix`` is not a square ``[m, m]`` matrix; ``k`` is not an int in ``[1, m]``.

    Example:
        >>> import torch
        >>> top_eigenpairs(torch.diag(torch.tensor([1.0, 5.0, 3.0])), 2)[0]
        tensor([5., 3.])
    """
    if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"matrix must be a square [m, m] tensor, got {shape}")
    m = matrix.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= m:
        raise ValueError(f"k must be an int in [1, m={m}], got {k!r}")
    if m <= 256 or 4 * k > m:
        evals, evecs = torch.linalg.eigh(matrix)
        return evals.flip(0)[:k], evecs.flip(1)[:, :k]
    from scipy.sparse.linalg import eigsh

    a = matrix.detach().cpu().double().numpy()
    v0 = np.ones(m) / np.sqrt(m)  # deterministic start vector
    evals, evecs = eigsh(a, k=k, which="LA", tol=tol, v0=v0)
    order = np.argsort(evals)[::-1]
    return (
        torch.as_tensor(evals[order].copy(), dtype=matrix.dtype, device=matrix.device),
        torch.as_tensor(evecs[:, order].copy(), dtype=matrix.dtype, device=matrix.device),
    )


def lanczos_top_eigenpairs(
    matmat: Callable[[Tensor], Tensor], size: int, k: int, tol: float, dtype: torch.dtype, device: torch.device
) -> Tuple[Tensor, Tensor]:
    """The ``k`` largest eigenpairs of the symmetric ``[size, size]`` operator ``matmat`` (``[size, m] -> [size, m]``)
    by implicitly restarted Lanczos (ARPACK through :func:`scipy.sparse.linalg.eigsh`), values descending."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    def matvec(x: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(x), dtype=dtype, device=device).reshape(size, -1)
        return matmat(t).detach().cpu().double().numpy().reshape(x.shape)

    op = LinearOperator((size, size), matvec=matvec, matmat=matvec, dtype=np.float64)
    evals, evecs = eigsh(op, k=k, which="LA", tol=tol, v0=np.ones(size) / np.sqrt(size))
    order = np.argsort(evals)[::-1]
    return (
        torch.as_tensor(evals[order].copy(), dtype=dtype, device=device),
        torch.as_tensor(evecs[:, order].copy(), dtype=dtype, device=device),
    )


def _check_damping(damping: float) -> None:
    if not (isinstance(damping, (int, float)) and np.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
