r"""Dense (exact) curvature objects for small models.

Everything here forms the Hessian tensor ``d_a d_b eta`` (``[n, K, P, P]``),
so it is limited to small models (at most :data:`MAX_DENSE_PARAMS` parameters
and a Hessian within the dense memory limit); larger models must use
``embedding_curvature(..., method="stochastic")``.

Formulas (theory.md section 3, sum convention ``G = blockdiag(Sigma_i)``,
``g = J^T G J``), with ``T`` the third cumulant (skewness) tensor of the product
family ``S``:

* alpha-connection (Amari 1985, eq. 2.27 specialised to a curved exponential family)
  ``Gamma^(alpha)_{ab,c} = <d_a d_b eta, d_c eta>_G + (1 - alpha)/2 T(d_a eta, d_b eta, d_c eta)``;
* skewness tensor ``T_abc = sum_i A'''(eta_i)[d_a eta_i, d_b eta_i, d_c eta_i]``;
* alpha-normal vectors
  ``N^alpha_ab = (I - P_T) (d_a d_b eta + (1 - alpha)/2 G^+ A'''[d_a eta, d_b eta, .])``,
  whose G-inner product with a normal ``w`` is the alpha-embedding curvature
  ``H_alpha(a, b, w) = H_e(a, b, w) + (1 - alpha)/2 T(d_a eta, d_b eta, w)``.
  For alpha = -1 the bracket equals ``G^+ d_a d_b M`` (expectation coordinates
  ``M = mu(eta)``: ``d_a d_b M = G d_a d_b eta + A'''[d_a eta, d_b eta, .]``), so the
  construction is the same one carried out in m-coordinates with metric ``G^{-1}``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.func import jacfwd, jacrev, vmap

from ..manifold import ModelManifold, memory_guard
from ._common import check_alpha, check_manifold, skew_whitened, whiten, whitening

__all__ = ["alpha_connection", "skewness_tensor", "MAX_DENSE_PARAMS"]

#: Largest number of parameters the dense methods accept.
MAX_DENSE_PARAMS = 2000


def dense_projection_fits(manifold: ModelManifold) -> bool:
    """Whether :func:`~dropgeom.curvature._common.range_basis` (a dense SVD of ``S^T J``) is cheap: at most
    :data:`MAX_DENSE_PARAMS` parameters and a Jacobian of at most ``2^24`` entries."""
    return manifold.num_params <= MAX_DENSE_PARAMS and manifold.n * manifold.num_outputs * manifold.num_params <= 2**24


def check_dense_size(manifold: ModelManifold, what: str) -> None:
    """Raise if the dense Hessian tensor of ``manifold`` is too large, pointing to the stochastic method."""
    P = manifold.num_params
    if P > MAX_DENSE_PARAMS:
        raise ValueError(
            f"{what}: the model has P={P} parameters, more than the dense limit of {MAX_DENSE_PARAMS}; "
            "use embedding_curvature(..., method='stochastic') (matrix-free), or restrict the manifold "
            "to fewer parameters with ModelManifold(..., param_names=...)"
        )
    memory_guard(
        5 * manifold.n * manifold.num_outputs * P * P,  # Hessian, skewness, whitened and normal copies
        manifold.dtype,
        f"{what}: about 5 copies of the Hessian tensor [n={manifold.n}, K={manifold.num_outputs}, P={P}, P={P}]",
        "use embedding_curvature(..., method='stochastic') or fewer inputs/parameters",
    )


def hessian_tensor(manifold: ModelManifold) -> Tensor:
    """``d_a d_b eta`` for all outputs, ``[n, K, P, P]`` (``jacfwd`` over ``jacrev``, per sample)."""
    theta = manifold.theta

    if manifold.model is None or not manifold.inputs:  # closed-form manifold: no sample axis to map over
        return jacfwd(jacrev(lambda th: manifold.forward(manifold.unflatten(th))))(theta)

    def one(xs: Tuple[Tensor, ...]) -> Tensor:
        single = tuple(x.unsqueeze(0) for x in xs)
        return jacfwd(jacrev(lambda th: manifold.forward(manifold.unflatten(th), single)[0]))(theta)

    P, K = manifold.num_params, manifold.num_outputs
    chunk = max(1, min(manifold.n, int(64 * 1024**2 // max(1, K * P * P * theta.element_size()))))
    try:
        return vmap(one, chunk_size=chunk)(manifold.inputs)
    except (RuntimeError, NotImplementedError):
        return torch.stack([one(tuple(x[i] for x in manifold.inputs)) for i in range(manifold.n)])


class DenseGeometry:
    """Dense whitened Jacobian, Hessian and third-cumulant terms of a small manifold."""

    def __init__(self, manifold: ModelManifold, what: str) -> None:
        check_dense_size(manifold, what)
        self.m = manifold
        self.eta, self.S, self.S_pinv = whitening(manifold)
        P = manifold.num_params
        self.J = manifold.jacobian()  # [n, K, P]
        self.Jw = whiten(self.S, self.J.permute(2, 0, 1)).permute(1, 2, 0).reshape(-1, P)  # [nR, P]
        self.H = hessian_tensor(manifold)  # [n, K, P, P]
        self._skew: Optional[Tensor] = None

    def skew_whitened(self) -> Tensor:
        """Whitened ``G^+ A'''[d_a eta, d_b eta, .]``, ``[n, R, P, P]``."""
        if self._skew is None:
            P = self.m.num_params
            ju = self.J.permute(2, 0, 1)  # [P, n, K]
            a = ju[:, None].expand(P, P, *ju.shape[1:])
            b = ju[None, :].expand(P, P, *ju.shape[1:])
            self._skew = skew_whitened(self.m, self.eta, self.S_pinv, a, b).permute(2, 3, 0, 1)
        return self._skew

    def whitened_second(self, alpha: float) -> Tensor:
        """Whitened alpha-second derivatives ``S^T d_a d_b eta + (1-alpha)/2 S^+ t_ab``, ``[nR, P, P]``."""
        P = self.m.num_params
        Y = torch.einsum("nkr,nkab->nrab", self.S, self.H)
        if alpha != 1.0:
            Y = Y + 0.5 * (1.0 - alpha) * self.skew_whitened()
        return Y.reshape(-1, P, P)

    def tangent_basis(self, rcond: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Thin SVD of the whitened Jacobian truncated at its numerical rank: ``U [nR, r], s [r], V [P, r]``."""
        U, s, Vh = torch.linalg.svd(self.Jw, full_matrices=False)
        if rcond is None:
            rcond = max(self.Jw.shape) * torch.finfo(self.Jw.dtype).eps
        r = int((s > rcond * s[0]).sum()) if s.numel() and s[0] > 0 else 0
        return U[:, :r], s[:r], Vh[:r].T


def _metric_weighted_third(geo: DenseGeometry) -> Tensor:
    """``T_abc`` (sum convention), ``[P, P, P]``: ``<G^+ t_ab, d_c eta>_G`` in whitened coordinates."""
    P = geo.m.num_params
    return torch.einsum("jab,jc->abc", geo.skew_whitened().reshape(-1, P, P), geo.Jw)


def skewness_tensor(manifold: ModelManifold) -> Tensor:
    r"""Skewness tensor of the model manifold in its parameter coordinates (dense, small models).

    .. math::  T_{abc} = \sum_i A'''(\eta_i)[\partial_a \eta_i, \partial_b \eta_i, \partial_c \eta_i]

    (sum convention over the ``n`` inputs; theory.md section 3; Amari 1985, eq. 2.30: the third
    cumulant of the score). Zero for the ``gaussian`` family. It is the
    difference of the m- and e-connections:
    ``T = Gamma^(-1) - Gamma^(1)``.

    Args:
        manifold: a model manifold with at most ``MAX_DENSE_PARAMS`` parameters.

    Returns:
        Tensor ``[P, P, P]``, symmetric in all three indices.

    Raises:
        TypeError: ``manifold`` is not a :class:`~dropgeom.ModelManifold` (a ``StreamedManifold`` included).
        ValueError: the manifold has more than :data:`MAX_DENSE_PARAMS` parameters.
        MemoryError: the dense Hessian tensor ``[n, K, P, P]`` would exceed the memory limit.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> m = ModelManifold.from_function(lambda th: th[None, :], torch.zeros(1, dtype=torch.float64), "poisson")
        >>> skewness_tensor(m)   # A''' = e^eta = 1 at eta = 0
        tensor([[[1.]]], dtype=torch.float64)
    """
    check_manifold(manifold, "skewness_tensor")
    geo = DenseGeometry(manifold, "skewness_tensor")
    return _metric_weighted_third(geo)


def alpha_connection(manifold: ModelManifold, alpha: float = 1.0) -> Tensor:
    r"""Coefficients of Amari's alpha-connection on the model manifold (dense, small models).

    .. math::

        \Gamma^{(\alpha)}_{ab,c} = \langle \partial_a \partial_b \eta, \partial_c \eta \rangle_G
            + \frac{1-\alpha}{2} T_{abc}

    (sum convention ``G = blockdiag(Sigma_i)``; theory.md section 3; Amari 1985, section 2.3 and
    section 4 for curved exponential families). ``alpha = 1`` is the
    e-connection, ``alpha = -1`` the m-connection
    ``<d_a d_b M, d_c eta>`` (expectation coordinates ``M``). The duality
    ``d_a g_bc = Gamma^(alpha)_{ab,c} + Gamma^(-alpha)_{ac,b}`` holds for every alpha.

    Args:
        manifold: a model manifold with at most ``MAX_DENSE_PARAMS`` parameters.
        alpha: the connection (finite real).

    Returns:
        Tensor ``[P, P, P]`` indexed ``[a, b, c]`` (symmetric in ``a, b``).

    Raises:
        TypeError: ``manifold`` is not a :class:`~dropgeom.ModelManifold` (a ``StreamedManifold`` included).
        ValueError: ``alpha`` is not a finite real number; the manifold has more than
            :data:`MAX_DENSE_PARAMS` parameters.
        MemoryError: the dense Hessian tensor ``[n, K, P, P]`` would exceed the memory limit.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> rho = 2.0   # mean on a circle of radius rho (gaussian, identity covariance)
        >>> m = ModelManifold.from_function(
        ...     lambda th: rho * torch.stack([th.cos(), th.sin()], -1), torch.tensor([0.3], dtype=torch.float64), "gaussian")
        >>> alpha_connection(m, alpha=1.0)   # <eta'', eta'> = 0 at constant speed
        tensor([[[0.]]], dtype=torch.float64)
    """
    check_manifold(manifold, "alpha_connection")
    alpha = check_alpha(alpha)
    geo = DenseGeometry(manifold, "alpha_connection")
    P = manifold.num_params
    Y = torch.einsum("nkr,nkab->nrab", geo.S, geo.H).reshape(-1, P, P)
    gamma = torch.einsum("jab,jc->abc", Y, geo.Jw)
    if alpha != 1.0:
        gamma = gamma + 0.5 * (1.0 - alpha) * _metric_weighted_third(geo)
    return gamma
