r"""Shared building blocks of the curvature code (private).

Everything is expressed in *whitened* output coordinates: with ``S_i`` a square
root of ``Sigma_i`` (``family.cov_sqrt``, ``[n, K, R]``), an output-space vector
``y`` (``[n, K]``) is represented by ``S^T y`` (``[n, R]``), so that
``<x, y>_G = (S^T x) . (S^T y)`` with ``G = blockdiag(Sigma_i)`` (sum convention).
This handles a singular ``Sigma_i`` (categorical: rank ``K - 1``) without a
special case: the null direction of ``G`` simply vanishes, and the G-orthogonal
projection onto ``range(J)`` becomes the Euclidean projection onto
``range(S^T J)``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.func import jvp, vjp

from .._utils import vmap_or_loop
from ..dispatch import StreamedManifold
from ..manifold import ModelManifold
from ..operators import conjugate_gradient

__all__: list = []


def check_manifold(manifold: object, fn: str) -> ModelManifold:
    if isinstance(manifold, StreamedManifold):
        raise TypeError(
            f"{fn}() needs a ModelManifold of inputs in memory, got a StreamedManifold: {fn}() is not streamed over "
            "batches (dropgeom.dispatch.streamed_functions() lists those that are)"
        )
    if not isinstance(manifold, ModelManifold):
        raise TypeError(f"{fn}() needs a ModelManifold, got {type(manifold).__name__}")
    return manifold


def check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite real number (1: e-curvature, -1: m-curvature), got {alpha!r}")
    return float(alpha)


def check_cg_options(cg_tol: object, cg_max_iter: object) -> None:
    """Validate user conjugate-gradient settings (``None``: the default): ``cg_tol`` in ``(0, 1)``, ``cg_max_iter >= 1``."""
    if cg_tol is not None and (isinstance(cg_tol, bool) or not isinstance(cg_tol, (int, float)) or not 0 < cg_tol < 1):
        raise ValueError(f"cg_tol must lie in (0, 1), got {cg_tol!r}")
    if cg_max_iter is not None and (isinstance(cg_max_iter, bool) or not isinstance(cg_max_iter, int) or cg_max_iter < 1):
        raise ValueError(f"cg_max_iter must be a positive integer, got {cg_max_iter!r}")


def check_damping(damping: object) -> Optional[float]:
    if damping is None:
        return None
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ValueError(
            f"damping must be None or a finite number >= 0 (relative to the largest eigenvalue of g), got {damping!r}"
        )
    return float(damping)


def range_basis(manifold: ModelManifold, S: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(U, s, V, S^T J)``: the thin SVD of the whitened Jacobian ``S^T J`` (``[nR, P]``, returned last) truncated
    to its numerical rank (singular values above ``max(nR, P) eps s_max``). ``U`` spans the whitened tangent space, so
    ``y - U U^T y`` is the exact normal part of a whitened vector ``y`` (theory.md section 3). Dense: for
    manifolds whose Jacobian fits in memory (:func:`dropgeom.curvature.dense.dense_projection_fits`)."""
    P = manifold.num_params
    J = manifold.jacobian()
    jw = whiten(S, J.permute(2, 0, 1)).permute(1, 2, 0).reshape(-1, P)  # [nR, P]
    U, s, Vh = torch.linalg.svd(jw, full_matrices=False)
    r = int((s > max(jw.shape) * torch.finfo(jw.dtype).eps * s[0]).sum()) if s[0] > 0 else 0
    return U[:, :r], s[:r], Vh[:r].T, jw


def normal_part(
    Y: Tensor, basis: Optional[Tensor], lin: "LinearisedManifold", S: Tensor, tol: float, max_iter: Optional[int]
) -> Tensor:
    """The whitened normal part ``(I - Pi) Y`` of whitened vectors ``Y`` (``[m, n, R]``; theory.md section 3):
    exact with an orthonormal tangent ``basis`` (``[nR, r]``, :func:`range_basis`), else by conjugate gradients
    (:meth:`LinearisedManifold.project_out`, which records the residual it reached)."""
    if basis is None:
        return lin.project_out(S, Y, tol, max_iter)
    y = Y.reshape(Y.shape[0], -1)
    return (y - (y @ basis) @ basis.T).reshape(Y.shape)


class ProjectionWarning(RuntimeWarning):
    """The matrix-free projection onto the tangent space did not converge: normal parts, hence curvatures, are
    biased upward (the tangent remainder adds to them; theory.md section 3)."""


def projection_tolerance(tol: float) -> float:
    """The relative residual above which a conjugate-gradient solve or projection counts as not converged:
    ``max(1e3 tol, 1e-6)`` (``|J^T S r| / |J^T S Y|`` for a projection, ``|(g + lambda I) x - b| / |b|`` for the
    stochastic estimator's sampling solves)."""
    return max(1e3 * tol, 1e-6)


def _relative(bn: Tensor, b0: Optional[Tensor], floor: Tensor) -> float:
    """The largest ``(bn - floor) / b0`` over the columns whose ``b0`` is above ``floor`` (rounding level: those
    columns were normal from the start), 0 where there is none."""
    if b0 is None or bn.numel() == 0:
        return 0.0
    floor = floor.to(bn)
    ratio = (bn - floor).clamp_min(0) / b0.clamp_min(torch.finfo(b0.dtype).tiny)
    return float(torch.where(b0 > floor, ratio, torch.zeros_like(ratio)).max())


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual at which conjugate gradients stop, by precision."""
    return 1e-9 if dtype == torch.float64 else 1e-5


def default_max_iter(num_params: int) -> int:
    """CG iteration cap per pass: ``2 P + 100`` (on an ill-conditioned ``g`` CG needs more
    than ``P`` steps in floating point, as the Krylov basis loses orthogonality;
    projections add restarted refinement passes on top)."""
    return 2 * num_params + 100


def whitening(manifold: ModelManifold) -> tuple[Tensor, Tensor, Tensor]:
    """``(eta, S, S_pinv)``: outputs ``[n, K]``, ``S`` (``[n, K, R]``, ``S S^T = Sigma``)
    and its per-sample pseudo-inverse ``[n, R, K]``."""
    eta = manifold.eta()
    S = manifold.family.cov_sqrt(eta)
    return eta, S, torch.linalg.pinv(S)


def whiten(S: Tensor, y: Tensor) -> Tensor:
    """``S^T y`` for ``y`` of shape ``[..., n, K]`` -> ``[..., n, R]``."""
    return torch.einsum("nkr,...nk->...nr", S, y)


def unwhiten(S: Tensor, z: Tensor) -> Tensor:
    """``S z`` for ``z`` of shape ``[..., n, R]`` -> ``[..., n, K]``."""
    return torch.einsum("nkr,...nr->...nk", S, z)


def skew_whitened(manifold: ModelManifold, eta: Tensor, S_pinv: Tensor, ju: Tensor, jv: Tensor) -> Tensor:
    r"""Whitened ``G^+ A'''[J u, J v, .]``: ``S^+ t`` with ``t_i = A'''(eta_i)[J_i u, J_i v, .]``.

    ``S^+ t`` is the whitened representative of ``G^+ t`` because ``t`` lies in
    ``range(Sigma_i)`` (``A`` is invariant along the null directions of ``Sigma``).
    Batched over leading axes of ``ju, jv`` (``[..., n, K]``).
    """
    fam = manifold.family
    lead = ju.shape[:-2]
    a = ju.reshape(-1, *ju.shape[-2:])
    b = jv.reshape(-1, *jv.shape[-2:])

    def one(x: Tensor, y: Tensor) -> Tensor:
        return fam.third_cumulant(eta, x, y)

    t = vmap_or_loop(one, a, b)
    return torch.einsum("nrk,mnk->mnr", S_pinv, t).reshape(*lead, *S_pinv.shape[:2])


class LinearisedManifold:
    """Batched first and second directional derivatives of a manifold (``torch.func``).

    Columns are batched with ``vmap``; if a layer has no batching rule the
    products fall back to a loop over columns.
    """

    def __init__(self, manifold: ModelManifold) -> None:
        self.m = manifold
        self.params = manifold.params
        self._vjp_fn: Optional[Callable] = None
        #: ``|J^T S r| / |J^T S Y|`` (largest over columns) of the last :meth:`project_out`
        self.last_projection_residual = 0.0

    def _map(self, fn: Callable, *cols: Tensor) -> Tensor:
        return vmap_or_loop(fn, *cols)

    def jvp(self, V: Tensor) -> Tensor:
        """``J v`` for each row of ``V`` (``[m, P]``) -> ``[m, n, K]``."""
        m = self.m

        def one(v: Tensor) -> Tensor:
            return jvp(m.forward, (self.params,), (m.unflatten(v),))[1]

        return self._map(one, V)

    def vjp(self, W: Tensor) -> Tensor:
        """``J^T w`` for each ``w`` in ``W`` (``[m, n, K]``) -> ``[m, P]``."""
        if self._vjp_fn is None:
            _, self._vjp_fn = vjp(self.m.forward, self.params)
        fn = self._vjp_fn

        def one(w: Tensor) -> Tensor:
            return self.m.flatten(fn(w)[0])

        return self._map(one, W)

    def d2(self, U: Tensor, V: Tensor) -> Tensor:
        """``D2 eta[u, v]`` for each pair of rows (``[m, P]``) -> ``[m, n, K]`` (forward over forward)."""
        m = self.m

        def one(u: Tensor, v: Tensor) -> Tensor:
            pu, pv = m.unflatten(u), m.unflatten(v)

            def along_u(p):
                return jvp(m.forward, (p,), (pu,))[1]

            return jvp(along_u, (self.params,), (pv,))[1]

        return self._map(one, U, V)

    def metric_matmat(self, S: Tensor, V: Tensor) -> Tensor:
        """``g V = J^T G J V`` (sum convention) for ``V`` of shape ``[P, m]``."""
        jv = self.jvp(V.T)
        return self.vjp(unwhiten(S, whiten(S, jv))).T

    def _rounding(self, S: Tensor, Y: Tensor, total: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        """``|J^T S y|`` at rounding level for each column ``y`` of ``Y`` (``[m]``): ``1e3 eps |y|`` times the
        typical gain ``|J^T S z| / |z|`` of a (fixed-seed) random whitened ``z``. A column whose tangent part is
        below it is normal already, and its residual is noise, not a failed projection. ``total`` (a sum over
        ranks, each holding its rows of ``Y``) makes the norms global, so every rank gets the same floor."""
        z = torch.randn(Y.shape[1:], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        z = z.to(dtype=Y.dtype, device=Y.device).unsqueeze(0)
        zz, yy = (z * z).sum().reshape(1), (Y * Y).reshape(Y.shape[0], -1).sum(1)
        if total is not None:
            zz, yy = total(zz), total(yy)
        gain = self.vjp(unwhiten(S, z)).norm() / zz.sqrt()
        return 1e3 * torch.finfo(Y.dtype).eps * gain * yy.sqrt()

    def project_out(self, S: Tensor, Y: Tensor, tol: float, max_iter: Optional[int], refinements: int = 4) -> Tensor:
        """Whitened normal part ``(I - Pi) Y`` of whitened vectors ``Y`` (``[m, n, R]``).

        ``Pi`` projects onto ``range(S^T J)``: least squares ``min_x |Y - S^T J x|``
        solved by conjugate gradients on ``g x = J^T S Y`` (CGNR), the residual
        formed explicitly (no cancellation in ``|Y|^2 - |Pi Y|^2``), then
        projected again (iterative refinement, up to ``refinements`` passes)
        until ``|J^T S r| <= tol |J^T S Y|``: on an ill-conditioned ``g`` one CG
        pass loses orthogonality and leaves a tangent remainder. The relative
        residual reached is kept in :attr:`last_projection_residual`; above
        :func:`projection_tolerance` a :class:`ProjectionWarning` says that the
        result is too large (the tangent remainder is orthogonal to the normal
        part, so it only adds to ``|r|^2``).

        Raises:
            Nothing of its own; warns (:class:`ProjectionWarning`) when it does not converge.
        """
        r = Y
        b0 = prev = None
        checked = False
        for _ in range(1 + refinements):
            b = self.vjp(unwhiten(S, r)).T  # [P, m]
            bn = b.norm(dim=0)
            if b0 is None:
                b0 = bn
            elif bool((bn <= tol * b0).all()) or bool((bn > 0.5 * prev).all()):
                checked = True
                break  # converged, or a further pass would not improve
            prev = bn
            x = conjugate_gradient(lambda M: self.metric_matmat(S, M), b, tol=tol, max_iter=max_iter)
            r = r - whiten(S, self.jvp(x.T))
        if not checked:  # the refinement passes ran out: the residual of the last one
            bn = self.vjp(unwhiten(S, r)).T.norm(dim=0)
        self.last_projection_residual = _relative(bn, b0, self._rounding(S, Y))
        if self.last_projection_residual > projection_tolerance(tol):
            warnings.warn(
                f"the projection onto the tangent space stopped at relative residual |J^T S r| / |J^T S Y| = "
                f"{self.last_projection_residual:.1e} (conjugate gradients capped at {max_iter} iterations, "
                f"{1 + refinements} passes; g is badly conditioned): the tangent part left in the remainder makes "
                "the normal part, so gamma^2 and kappa, too large. Raise cg_max_iter, or use method='dense' where "
                "P allows.",
                ProjectionWarning,
                stacklevel=3,
            )
        return r
