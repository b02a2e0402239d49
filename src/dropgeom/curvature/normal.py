r"""Normal curvature of the model manifold along one direction (theory.md section 3)."""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
from torch import Tensor

from ..manifold import ModelManifold
from ._common import (
    LinearisedManifold,
    check_alpha,
    check_cg_options,
    check_manifold,
    default_max_iter,
    default_tol,
    skew_whitened,
    whiten,
    whitening,
)
from .dense import MAX_DENSE_PARAMS

__all__ = ["normal_curvature"]


def normal_curvature(
    manifold: ModelManifold,
    v: Union[Tensor, Mapping[str, Tensor]],
    alpha: float = 1.0,
    *,
    method: str = "auto",
    cg_tol: Optional[float] = None,
    cg_max_iter: Optional[int] = None,
) -> Tensor:
    r"""Normal curvature of the model manifold along the parameter direction ``v``.

    .. math::  \kappa(v) = \frac{|N^\alpha(v, v)|_G}{|J v|_G^2},\qquad
               N^\alpha(v, v) = (I - P_T)\big(D^2\eta[v, v] + \tfrac{1-\alpha}{2} G^+ A'''[Jv, Jv, \cdot]\big)

    (theory.md section 3; sum-convention ``G``, so ``kappa`` scales as
    ``n^{-1/2}`` with the number of inputs). Invariant under rescaling of ``v``;
    needs only the projection onto ``range(J)`` -- a least-squares problem
    ``min_x |S^T (y - J x)|`` -- never ``g^+``, so it stays well defined when
    ``g`` is badly conditioned.

    Invariance: **invariant** under every reparametrisation ``theta = phi(theta')``
    when ``v`` is transformed as a tangent vector (``v' = Dphi^{-1} v``, so that
    ``J' v' = J v``): it depends only on the tangent vector (the second
    fundamental form). For several directions use
    :func:`~dropgeom.curvature.normal_curvatures` (one projection for all).

    Args:
        manifold: the model manifold.
        v: direction, a flat vector ``[P]`` or a dict of named tensors.
        alpha: 1 (e, default), -1 (m) or any real.
        method: ``"dense"`` (rank-revealing least squares on the dense whitened
            Jacobian), ``"cg"`` (matrix-free: conjugate gradients on ``g``) or
            ``"auto"`` (dense up to 2000 parameters and a small Jacobian).
        cg_tol, cg_max_iter: conjugate-gradient settings (``"cg"``).

    Returns:
        0-dim tensor ``kappa``.

    Raises:
        TypeError: ``manifold`` is not a :class:`~dropgeom.ModelManifold` (a ``StreamedManifold`` included).
        ValueError: ``alpha`` is not a finite real number; an unknown ``method``; ``cg_tol`` outside
            ``(0, 1)`` or ``cg_max_iter`` not a positive int; ``v`` of the wrong shape (or a dict
            missing a parameter), non-finite, zero, or in the null space of ``J`` (``|J v|_G = 0``).

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> rho = 2.0   # circle of radius rho: normal curvature 1/rho
        >>> m = ModelManifold.from_function(
        ...     lambda th: rho * torch.stack([th.cos(), th.sin()], -1), torch.tensor([0.3], dtype=torch.float64), "gaussian")
        >>> round(float(normal_curvature(m, torch.tensor([1.0], dtype=torch.float64))), 6)
        0.5
    """
    check_manifold(manifold, "normal_curvature")
    alpha = check_alpha(alpha)
    if method not in ("auto", "dense", "cg"):
        raise ValueError(f"method must be 'auto', 'dense' or 'cg', got {method!r}")
    check_cg_options(cg_tol, cg_max_iter)
    v = _unit_direction(manifold, v)
    eta, S, S_pinv = whitening(manifold)
    lin = LinearisedManifold(manifold)
    jv = lin.jvp(v[None])  # [1, n, K]
    speed2 = (whiten(S, jv) ** 2).sum()
    if speed2 <= 0:
        raise ValueError("direction v lies in the null space of J in the G-metric (|J v|_G = 0): no curvature defined")
    Y = whiten(S, lin.d2(v[None], v[None]))
    if alpha != 1.0:
        Y = Y + 0.5 * (1.0 - alpha) * skew_whitened(manifold, eta, S_pinv, jv, jv)
    return _normal_part(manifold, lin, S, Y, method, cg_tol, cg_max_iter).norm() / speed2


def _unit_direction(manifold: ModelManifold, v: Union[Tensor, Mapping[str, Tensor]]) -> Tensor:
    """``v`` as a flat unit vector ``[P]`` on the manifold's dtype and device (``kappa`` is scale invariant; unit
    norm keeps the numbers tame), or a ``ValueError`` naming what is wrong with it."""
    if isinstance(v, Mapping):
        v = manifold.flatten(manifold._as_params(v, "direction"))
    if not isinstance(v, Tensor) or v.dim() != 1 or v.numel() != manifold.num_params:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"direction v must be a flat vector with P={manifold.num_params} entries, got {shape}")
    v = v.to(dtype=manifold.dtype, device=manifold.device)
    if not torch.isfinite(v).all():
        raise ValueError("direction v contains non-finite values (NaN or inf)")
    if not bool((v != 0).any()):
        raise ValueError("direction v is zero; the normal curvature needs a non-zero direction")
    return v / v.norm()


def _normal_part(
    manifold: ModelManifold,
    lin: LinearisedManifold,
    S: Tensor,
    Y: Tensor,
    method: str,
    cg_tol: Optional[float],
    cg_max_iter: Optional[int],
) -> Tensor:
    """``(I - P_T) Y`` in whitened coordinates, flat ``[nR]``: rank-revealing least squares on the dense whitened
    Jacobian (``dense``) or conjugate gradients on ``g`` (``cg``); ``auto`` picks dense while it is small."""
    n, K, P = manifold.n, manifold.num_outputs, manifold.num_params
    if method == "auto":
        method = "dense" if P <= MAX_DENSE_PARAMS and n * K * P <= 2**24 else "cg"
    if method == "dense":
        J = manifold.jacobian()
        Jw = whiten(S, J.permute(2, 0, 1)).permute(1, 2, 0).reshape(-1, P)
        U, s, _ = torch.linalg.svd(Jw, full_matrices=False)
        r = int((s > max(Jw.shape) * torch.finfo(Jw.dtype).eps * s[0]).sum()) if s[0] > 0 else 0
        y = Y.reshape(-1)
        return y - U[:, :r] @ (U[:, :r].T @ y)
    tol = default_tol(manifold.dtype) if cg_tol is None else cg_tol
    return lin.project_out(S, Y, tol, default_max_iter(P) if cg_max_iter is None else cg_max_iter)
