"""Independent float64 brute-force references for embedding curvature (theory.md section 3).

Built only from ``torch.autograd.functional.jacobian`` / ``hessian``, closed-form
log-partition functions written out here and dense pseudo-inverses of the
full ``nK x nK`` metric; nothing here imports ``dropgeom``.

The alpha-curvature is computed through *expectation coordinates*: with
``M(theta) = grad A(eta(theta))`` (stacked means), the alpha-second derivative
is the interpolation ``(1+alpha)/2 d2 eta + (1-alpha)/2 G^+ d2 M`` (alpha = -1:
the construction in m-coordinates with metric ``G^{-1}``), projected
G-orthogonally off ``range(J)`` with ``P_T = J g^+ J^T G``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd.functional import hessian, jacobian

D64 = torch.float64


def log_partition(family: str, eta: Tensor) -> Tensor:
    """``sum_i A(eta_i)`` over the rows of ``eta`` (``[n, K]``; theory.md's table, gaussian sigma = 1)."""
    if family == "categorical":
        return torch.log(torch.exp(eta).sum(-1)).sum()
    if family == "bernoulli":
        return torch.log1p(torch.exp(eta)).sum()
    if family == "gaussian":
        return 0.5 * (eta**2).sum()
    if family == "poisson":
        return torch.exp(eta).sum()
    if family == "normal":
        return (-(eta[:, 0] ** 2) / (4 * eta[:, 1]) - 0.5 * torch.log(-2 * eta[:, 1])).sum()
    raise ValueError(family)


def _means(family: str, eta: Tensor) -> Tensor:
    """Stacked means ``grad A(eta_i)`` (``[n, K]``), differentiable in ``eta``."""
    if not eta.requires_grad:
        eta = eta.detach().requires_grad_(True)
    return torch.autograd.grad(log_partition(family, eta), eta, create_graph=True)[0]


def _metric(family: str, eta: Tensor, create_graph: bool = False) -> Tensor:
    """``G = blockdiag(A''(eta_i))`` (``[nK, nK]``): the Hessian of ``sum_i A(eta_i)``."""
    n, K = eta.shape
    return hessian(lambda e: log_partition(family, e), eta, create_graph=create_graph, vectorize=True).reshape(n * K, n * K)


@dataclass
class Reference:
    J: Tensor  # [nK, P]
    H: Tensor  # [nK, P, P]   d2 eta
    HM: Tensor  # [nK, P, P]  d2 M
    G: Tensor  # [nK, nK]
    g: Tensor  # [P, P]


def hessian_outputs(fn: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    """``d_a d_b fn(theta)`` for every output entry: ``[*out, P, P]`` (one ``hessian`` per output)."""
    shape = fn(theta).shape
    flat = [hessian(lambda th: fn(th).reshape(-1)[i], theta) for i in range(shape.numel())]
    return torch.stack(flat).reshape(*shape, theta.numel(), theta.numel())


def build(eta_fn: Callable[[Tensor], Tensor], theta: Tensor, family: str) -> Reference:
    """Dense Jacobian, Hessians of ``eta`` and of ``M``, metric ``G`` and ``g`` (sum convention)."""
    theta = theta.detach().to(D64)
    eta = eta_fn(theta).detach()
    n, K = eta.shape
    P = theta.numel()
    J = jacobian(eta_fn, theta).reshape(n * K, P)
    H = hessian_outputs(eta_fn, theta).reshape(n * K, P, P)
    HM = hessian_outputs(lambda t: _means(family, eta_fn(t)), theta).reshape(n * K, P, P)
    G = _metric(family, eta)
    return Reference(J=J, H=H, HM=HM, G=G, g=J.T @ G @ J)


def alpha_second(ref: Reference, alpha: float) -> Tensor:
    """``(1+alpha)/2 d2 eta + (1-alpha)/2 G^+ d2 M``, ``[nK, P, P]``."""
    Gp = torch.linalg.pinv(ref.G, hermitian=True)
    return 0.5 * (1 + alpha) * ref.H + 0.5 * (1 - alpha) * torch.einsum("ij,jab->iab", Gp, ref.HM)


def normal_vectors(ref: Reference, alpha: float) -> Tensor:
    """``N^alpha_ab = (I - J g^+ J^T G) D2_alpha``, ``[nK, P, P]``."""
    PT = ref.J @ torch.linalg.pinv(ref.g, hermitian=True) @ ref.J.T @ ref.G
    D = alpha_second(ref, alpha)
    return D - torch.einsum("ij,jab->iab", PT, D)


def gamma2(ref: Reference, alpha: float = 1.0, damping: Optional[float] = None) -> Tensor:
    """``g^{ac} g^{bd} <N_ab, N_cd>_G`` (``g^+``, or ``(g + lambda I)^{-1}`` with ``lambda = damping * max eig``)."""
    N = normal_vectors(ref, alpha)
    if damping is None:
        gi = torch.linalg.pinv(ref.g, hermitian=True)
    else:
        lam = damping * torch.linalg.eigvalsh(ref.g)[-1]
        gi = torch.linalg.inv(ref.g + lam * torch.eye(ref.g.shape[0], dtype=D64))
    return torch.einsum("ac,bd,iab,ij,jcd->", gi, gi, N, ref.G, N)


def connection(ref: Reference, alpha: float) -> Tensor:
    """``Gamma^(alpha)_{ab,c} = <D2_alpha_ab, d_c eta>_G``, ``[P, P, P]``."""
    return torch.einsum("iab,ij,jc->abc", alpha_second(ref, alpha), ref.G, ref.J)


def metric_derivative(eta_fn: Callable[[Tensor], Tensor], theta: Tensor, family: str) -> Tensor:
    """``d_a g_bc`` by autograd of ``g(theta) = J^T G J``, ``[a, b, c]``."""

    def g_of(th: Tensor) -> Tensor:
        eta = eta_fn(th)
        n, K = eta.shape
        J = jacobian(eta_fn, th, create_graph=True).reshape(n * K, -1)
        G = _metric(family, eta, create_graph=True)
        return J.T @ G @ J

    return jacobian(g_of, theta.detach().to(D64)).permute(2, 0, 1)


def normal_curvature(ref: Reference, v: Tensor, alpha: float = 1.0) -> Tensor:
    """``|N(v, v)|_G / |J v|_G^2``."""
    N = torch.einsum("iab,a,b->i", normal_vectors(ref, alpha), v, v)
    Jv = ref.J @ v
    return torch.sqrt(N @ ref.G @ N) / (Jv @ ref.G @ Jv)
