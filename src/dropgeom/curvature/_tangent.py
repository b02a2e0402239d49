r"""Tangent-space linear algebra of the stochastic embedding-curvature estimator (theory.md section 3; private).

The estimator needs, with ``A = S^T J`` the whitened Jacobian (``[nR, P]``) and ``g = A^T A``:

* the sampling solve ``u = (g + lambda I)^{-1} (A^T z + sqrt(lambda) z')`` (``lambda = 0``: ``g^+ A^T z``);
* the normal part ``(I - Pi) y`` of whitened vectors ``y``, ``Pi`` the orthogonal projector onto ``range(A)``;
* ``lambda_max(g)`` for the relative damping.

Three solvers (:class:`~dropgeom.options.TangentSolver`), chosen by size (:func:`tangent_solver`):

* ``svd``: ``A`` in memory (:func:`~dropgeom.curvature.dense.dense_projection_fits`), its thin SVD; exact.
* ``gram``: the ``nR x nR`` Gram matrix ``K = A A^T``, formed column by column from ``nR`` pairs of
  vector-Jacobian and Jacobian-vector products (no ``P``-sized matrix; over batches and ranks each rank forms its
  rows of ``K e_i`` from the all-reduced ``A^T e_i`` and the rows are gathered, so every rank holds the same ``K``,
  :func:`gram_matrix`), and its eigendecomposition
  ``K = W diag(w) W^T`` truncated at ``w > nR eps w_max``. Then ``Pi = W W^T`` (``range(K) = range(A)``),
  ``lambda_max(g) = w_max``, and by the push-through identity ``(g + lambda I)^{-1} A^T = A^T (K + lambda I)^{-1}``
  and Woodbury ``(g + lambda I)^{-1} = (I - A^T (K + lambda I)^{-1} A) / lambda``:
  ``u = A^T W diag(1/(w + lambda)) W^T (z - A z' / sqrt(lambda)) + z' / sqrt(lambda)``. Exact up to the cutoff
  (``K`` squares the condition number of ``A``: directions with singular values below ``sqrt(nR eps) s_max`` count as
  normal; the projection residual ``|A^T r| / |A^T y|`` says whether that mattered; in float32, ``sqrt(nR eps)`` is
  about 1e-2 and the estimate was biased 50-fold on a 4-16-3 tanh MLP, under the warning threshold: so
  ``embedding_curvature`` runs a float32 model off the SVD path on a float64 copy, in memory and streamed). For
  ``nR <=`` :data:`MAX_GRAM_ROWS`, whatever ``P``, in memory or streamed.
* ``cg``: conjugate gradients on ``g`` (:meth:`~dropgeom.curvature._common.LinearisedManifold.project_out`), capped
  at ``cg_max_iter``: for ``nR >`` :data:`MAX_GRAM_ROWS`, in memory or streamed. On a badly conditioned ``g`` it
  stops short (a
  :class:`~dropgeom.curvature._common.ProjectionWarning`; the tangent remainder biases ``gamma^2`` upward).
  LSMR on ``min |A x - y|`` (conditioning ``kappa(A)`` instead of ``kappa(A)^2``) was measured as no cure: without
  reorthogonalisation it, too, needed about 3000 iterations (for a rank of 114) to get the normal part to 1e-3,
  as ``|y| / |(I - Pi) y|`` is about 200 there (docs/theory.md section 3).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from ..operators import conjugate_gradient
from ..options import TangentSolver
from ._common import LinearisedManifold, ProjectionWarning, _relative, projection_tolerance, range_basis, unwhiten, whiten

__all__: list = []

#: Largest ``n R`` (inputs times whitened outputs) for which the ``gram`` solver forms ``A A^T``.
MAX_GRAM_ROWS = 4096
#: Elements the rows of ``K`` formed together may use (products and activations): sets the block size of :func:`gram_matrix`.
GRAM_BLOCK_ELEMENTS = 2**24


def _alone(t: Tensor) -> Tensor:
    """The sum over ranks of one process: ``t`` itself."""
    return t


def _unsolved_warning(worst: float, what: str, cg_max_iter: int) -> None:
    warnings.warn(
        f"embedding_curvature(method='stochastic'): {what} stopped at relative residual "
        f"{worst:.1e} (cg_max_iter={cg_max_iter}); g is badly conditioned: the samples of u, v ~ N(0, g^+) "
        "are inaccurate along its flattest directions. Pass damping=..., or raise cg_max_iter.",
        RuntimeWarning,
        stacklevel=5,
    )


class Tangent:
    """Base of the solvers: the products, whitening and tolerances they share, and the residual bookkeeping."""

    name: TangentSolver = TangentSolver.CG
    exact_sampling: bool = False  # whether ``sample`` is exact (else its residual is checked)

    def __init__(self, lin: LinearisedManifold, S: Tensor, tol: float, max_iter: int) -> None:
        self.lin, self.S, self.tol, self.max_iter = lin, S, tol, max_iter
        #: the sum over ranks of per-rank partial sums (identity in one process; :class:`GramTangent` over ranks)
        self.total: Callable[[Tensor], Tensor] = _alone
        self.P = lin.m.num_params
        #: largest relative projection residual ``|A^T r| / |A^T y|`` so far (0 where exact by construction)
        self.residual = 0.0

    def A(self, X: Tensor) -> Tensor:
        """``A x`` for the rows of ``X`` (``[m, P]``) -> ``[m, n, R]``."""
        return whiten(self.S, self.lin.jvp(X))

    def At(self, Y: Tensor) -> Tensor:
        """``A^T y`` for ``Y`` (``[m, n, R]``) -> ``[m, P]``."""
        return self.lin.vjp(unwhiten(self.S, Y))

    def top(self) -> Optional[float]:
        """``lambda_max(g)`` where the solver knows it, else None (power iteration)."""
        return None

    def sample(self, z: Tensor, zp: Optional[Tensor], lam: float) -> Tensor:
        """``(g + lam I)^{-1} (A^T z + sqrt(lam) z')`` for ``z`` ``[m, n, R]``, ``z'`` ``[P, m]`` -> ``[P, m]``."""
        b = self.rhs(z, zp, lam)
        x = conjugate_gradient(lambda M: self.lin.metric_matmat(self.S, M) + lam * M, b, tol=self.tol, max_iter=self.max_iter)
        self.check_sample(x, b, lam, "conjugate gradients")
        return x

    def rhs(self, z: Tensor, zp: Optional[Tensor], lam: float) -> Tensor:
        """The right-hand side ``A^T z + sqrt(lam) z'`` (``[P, m]``) of the sampling solve."""
        b = self.At(z).T
        return b if zp is None else b + math.sqrt(lam) * zp

    def check_sample(self, x: Tensor, b: Tensor, lam: float, what: str) -> bool:
        """Warn (and return True) when ``(g + lam I) x = b`` holds only above the tolerance."""
        resid = self.lin.metric_matmat(self.S, x) + lam * x - b
        worst = float((resid.norm(dim=0) / b.norm(dim=0).clamp_min(torch.finfo(b.dtype).tiny)).max())
        if worst <= projection_tolerance(self.tol):
            return False
        _unsolved_warning(worst, what, self.max_iter)
        return True

    def normal(self, Y: Tensor) -> Tensor:
        """The whitened normal part ``(I - Pi) Y`` of ``Y`` (``[m, n, R]``)."""
        r = self.lin.project_out(self.S, Y, self.tol, self.max_iter)
        self.residual = max(self.residual, self.lin.last_projection_residual)
        return r

    def record(self, Y: Tensor, r: Tensor, how: str, b0: Optional[Tensor] = None) -> None:
        """Keep the relative residual ``|A^T r| / |A^T Y|`` of a projection ``r`` of ``Y`` (``b0``: the norms
        ``|A^T Y|`` where known); warn above the tolerance."""
        b0 = self.At(Y).norm(dim=1) if b0 is None else b0
        res = _relative(self.At(r).norm(dim=1), b0, self.lin._rounding(self.S, Y, self.total))
        self.residual = max(self.residual, res)
        if res > projection_tolerance(self.tol):
            warnings.warn(
                f"the projection onto the tangent space ({how}) stopped at relative residual |J^T S r| / |J^T S Y| = "
                f"{res:.1e}: the tangent part left in the remainder makes the normal part, so gamma^2, too large.",
                ProjectionWarning,
                stacklevel=4,
            )


class SvdTangent(Tangent):
    """Thin SVD of ``A`` in memory: ``Pi = U U^T``, ``g = V diag(s^2) V^T``; exact."""

    name = TangentSolver.SVD
    exact_sampling = True

    def __init__(self, lin: LinearisedManifold, S: Tensor, tol: float, max_iter: int) -> None:
        super().__init__(lin, S, tol, max_iter)
        self.U, self.s, self.V, _ = range_basis(lin.m, S)

    def top(self) -> Optional[float]:
        return float(self.s[0]) ** 2 if self.s.numel() else None

    def sample(self, z: Tensor, zp: Optional[Tensor], lam: float) -> Tensor:
        return solve_dense(self.rhs(z, zp, lam), self.s, self.V, lam)

    def normal(self, Y: Tensor) -> Tensor:
        y = Y.reshape(Y.shape[0], -1)
        return (y - (y @ self.U) @ self.U.T).reshape(Y.shape)


def solve_dense(b: Tensor, s: Tensor, V: Tensor, lam: float) -> Tensor:
    """``(g + lambda I)^{-1} b`` (``lambda > 0``) or ``g^+ b`` (``lambda = 0``) for ``g = V diag(s^2) V^T``, the
    metric from the truncated SVD of ``S^T J`` (:func:`~dropgeom.curvature._common.range_basis`): exact, where
    conjugate gradients stop short on a badly conditioned ``g`` (theory.md section 3)."""
    c = V.T @ b  # [r, m]
    inside = V @ (c / (s * s + lam).unsqueeze(1))
    return inside if lam == 0.0 else inside + (b - V @ c) / lam


def gram_matrix(tangent: "GramTangent", max_elements: Optional[int] = None) -> Tensor:
    """``K = A A^T`` (``[nR, nR]``, every rank the same), ``c`` rows at a time: ``K e_i = A (A^T e_i)``, one
    vector-Jacobian and one Jacobian-vector product per row, so nothing ``P``-sized beyond ``c`` rows of ``A`` is
    held. Over ranks, each rank passes its share of ``e_i`` (zero off its rows; ``A^T`` sums over ranks), gets its
    rows of ``K e_i`` back and writes them into a zero ``[c, nR]`` block that ``total`` sums over ranks: adding
    zeros is exact, so this is an all-gather, and every rank holds the same bits of ``K``.

    Raises:
        Nothing of its own; what the products and ``torch.distributed`` raise passes through.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> from dropgeom.curvature._common import LinearisedManifold, whitening
        >>> m = ModelManifold(torch.nn.Linear(2, 3).double(), torch.randn(4, 2, dtype=torch.float64))
        >>> _, S, _ = whitening(m)
        >>> GramTangent(LinearisedManifold(m), S, 1e-9, 100, m.n).W.shape[0]   # nR = 4 inputs x 3
        12
    """
    max_elements = GRAM_BLOCK_ELEMENTS if max_elements is None else max_elements
    m = tangent.lin.m
    n, R, lo, hi = tangent.n, tangent.R, tangent.lo, tangent.hi
    nR = n * R
    per_col = tangent.P + max(1, m.activation_numel()) * n + nR
    c = max(1, min(nR, max_elements // per_col))
    S = tangent.S
    K = torch.empty(nR, nR, dtype=S.dtype, device=S.device)
    for i in range(0, nR, c):  # the same chunks on every rank: A^T and total are collective
        k = min(c, nR - i)
        E = torch.zeros(k, hi - lo, dtype=S.dtype, device=S.device)  # this rank's rows of e_i, ..., e_{i+k-1}
        j = torch.arange(max(i, lo), max(i, lo, min(i + k, hi)), device=S.device)  # empty off this rank's rows
        E[j - i, j - lo] = 1.0
        block = torch.zeros(k, nR, dtype=S.dtype, device=S.device)
        block[:, lo:hi] = tangent.A(tangent.At(E.reshape(k, -1, R))).reshape(k, -1)
        K[i : i + k] = tangent.total(block)
    return 0.5 * (K + K.T)


class GramTangent(Tangent):
    """Eigendecomposition of ``K = A A^T`` (module docstring); exact up to the cutoff ``w > nR eps w_max``.

    Over ranks (a streamed linearisation) this rank holds the inputs ``rows`` of ``n``, so the rows ``lo:hi`` of
    ``A`` and of ``W``; ``total`` sums over ranks. ``K``, its eigendecomposition and every ``W^T y`` are the same on
    every rank (:func:`gram_matrix`), so the samples ``u, v`` are too.
    """

    name = TangentSolver.GRAM
    exact_sampling = True

    def __init__(
        self,
        lin: LinearisedManifold,
        S: Tensor,
        tol: float,
        max_iter: int,
        n: int,
        rows: Optional[slice] = None,
        total: Callable[[Tensor], Tensor] = _alone,
    ) -> None:
        super().__init__(lin, S, tol, max_iter)
        self.n, self.R, self.total = n, S.shape[-1], total
        rows = slice(0, n) if rows is None else rows
        self.lo, self.hi = rows.start * self.R, rows.stop * self.R  # this rank's rows of A (and W)
        w, W = torch.linalg.eigh(gram_matrix(self))
        w, W = w.flip(0), W.flip(1)  # descending
        # the cutoff of range_basis, applied to the matrix decomposed (K, whose rounding is eps |K|)
        keep = w > w.shape[0] * torch.finfo(w.dtype).eps * w[0] if w[0] > 0 else torch.zeros_like(w, dtype=torch.bool)
        self.w, self.W = w[keep], W[:, keep]
        self.W_rows = self.W[self.lo : self.hi]

    def top(self) -> Optional[float]:
        return float(self.w[0]) if self.w.numel() else None

    def coefficients(self, y: Tensor) -> Tensor:
        """``W^T y`` (``[m, r]``) for this rank's rows ``y`` (``[m, (hi - lo)]``) of whitened vectors, summed over ranks."""
        return self.total(y @ self.W_rows)

    def sample(self, z: Tensor, zp: Optional[Tensor], lam: float) -> Tensor:
        m = z.shape[0]
        y = z.reshape(m, -1)
        if zp is not None:
            y = y - self.A(zp.T).reshape(m, -1) / math.sqrt(lam)
        c = self.coefficients(y) / (self.w + lam)  # [m, r]: W^T y / (w + lam)
        x = self.At((c @ self.W_rows.T).reshape(z.shape)).T  # [P, m]
        return x if zp is None else x + zp / math.sqrt(lam)

    def normal(self, Y: Tensor) -> Tensor:
        y = Y.reshape(Y.shape[0], -1)
        r = (y - self.coefficients(y) @ self.W_rows.T).reshape(Y.shape)
        self.record(Y, r, f"eigendecomposition of the {self.W.shape[0]} x {self.W.shape[0]} Gram matrix S^T J J^T S")
        return r


def tangent_solver(
    lin: LinearisedManifold,
    S: Tensor,
    n: int,
    tol: float,
    max_iter: int,
    dense_fits: bool,
    rows: Optional[slice] = None,
    total: Callable[[Tensor], Tensor] = _alone,
) -> Tangent:
    """The solver for the sizes at hand (module docstring): ``svd`` where ``S^T J`` fits in memory (``dense_fits``;
    never for streamed inputs), ``gram`` where ``n R <= MAX_GRAM_ROWS`` (in memory, or over batches and ranks: this
    rank's inputs ``rows`` of ``n``, ``total`` summing over ranks), ``cg`` above.

    Raises:
        Nothing of its own; what the solver's products raise passes through.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> from dropgeom.curvature._common import LinearisedManifold, whitening
        >>> m = ModelManifold(torch.nn.Linear(2, 3).double(), torch.randn(4, 2, dtype=torch.float64))
        >>> _, S, _ = whitening(m)
        >>> tangent_solver(LinearisedManifold(m), S, m.n, 1e-9, 100, dense_fits=False).name.value
        'gram'
    """
    if dense_fits:
        return SvdTangent(lin, S, tol, max_iter)
    if n * S.shape[-1] <= MAX_GRAM_ROWS:
        return GramTangent(lin, S, tol, max_iter, n, rows, total)
    return Tangent(lin, S, tol, max_iter)
