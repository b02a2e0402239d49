"""Independent float64 brute-force references for the invariant curvature measures, the sharpness
measures and the dropout-mixture manifold (theory.md sections 3 and 4.3).

Built from ``torch.autograd.functional`` (dense Jacobians and Hessians), dense
pseudo-inverses and explicit loops over masks; nothing here imports ``dropgeom``.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
from torch import Tensor
from torch.autograd.functional import hessian

from . import curvature as ref

D64 = torch.float64


def nll_sum(family: str, eta: Tensor, y: Tensor) -> Tensor:
    """``sum_i -log p(y_i | eta_i)`` up to terms free of eta (categorical: class indices; gaussian: sigma = 1)."""
    if family == "categorical":
        return -(eta.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(eta, -1)).sum()
    if family == "gaussian":
        return 0.5 * ((eta - y) ** 2).sum()
    raise ValueError(family)


def natural_gradient_direction(eta_fn: Callable[[Tensor], Tensor], theta: Tensor, family: str, y: Tensor) -> Tensor:
    """``g^+ J^T r`` with ``r = d nll_sum / d eta`` (dense pseudo-inverse)."""
    R = ref.build(eta_fn, theta, family)
    eta = eta_fn(theta).detach().requires_grad_(True)
    r = torch.autograd.grad(nll_sum(family, eta, y), eta)[0].reshape(-1)
    return torch.linalg.pinv(R.g, hermitian=True) @ (R.J.T @ r)


def loss_hessian(eta_fn: Callable[[Tensor], Tensor], theta: Tensor, family: str, y: Tensor) -> Tensor:
    """Dense Hessian of the mean NLL, ``[P, P]``."""
    n = eta_fn(theta).shape[0]
    return hessian(lambda th: nll_sum(family, eta_fn(th), y) / n, theta.detach())


def fisher_mean(eta_fn: Callable[[Tensor], Tensor], theta: Tensor, family: str) -> Tensor:
    """``(1/n) J^T G J``."""
    R = ref.build(eta_fn, theta, family)
    return R.g / eta_fn(theta).shape[0]


def sam_on_circle(eta_fn, theta: Tensor, family: str, y: Tensor, radius: float, points: int = 20001) -> float:
    """Brute-force max of ``L(theta + eps) - L(theta)`` over ``|eps| = radius`` for P = 2 (a fine grid on the circle)."""
    n = eta_fn(theta).shape[0]
    t = torch.linspace(0, 2 * math.pi, points, dtype=D64)
    base = float(nll_sum(family, eta_fn(theta), y)) / n
    best = -math.inf
    with torch.no_grad():
        for a in t:
            e = radius * torch.stack([a.cos(), a.sin()])
            best = max(best, float(nll_sum(family, eta_fn(theta + e), y)) / n - base)
    return best


def mixture_eta(logits_fn: Callable[[Tensor, Tensor], Tensor], theta: Tensor, units: int, p: float, kind: str) -> Tensor:
    """``log sum_m w_m softmax(logits(theta, m))`` (kind m) or ``sum_m w_m logits`` (kind e), over all 2^units masks."""
    outs, ws = [], []
    for bits in itertools.product((0.0, 1.0), repeat=units):
        b = torch.tensor(bits, dtype=D64)
        k = int(b.sum())
        ws.append(((1 - p) ** k) * (p ** (units - k)))
        outs.append(logits_fn(theta, b / (1 - p)))
    w = torch.tensor(ws, dtype=D64)
    eta = torch.stack(outs)  # [M, n, K]
    if kind == "e":
        return torch.einsum("m,mnk->nk", w, eta)
    return torch.log(torch.einsum("m,mnk->nk", w, torch.softmax(eta, -1)))


def glm_input_dropout_limit(w: Tensor, b: Tensor, x: Tensor) -> Tensor:
    r"""``lim_{p->0} gamma^2_e / p^2`` of the m-mixture of a logistic GLM with input dropout.

    Input dropout keeps ``x_j / (1-p)`` or drops it. Every moment of the mask
    noise is of order ``p`` (a rare jump, not a diffusion), so to first order in
    ``p`` only the all-kept mask (probability ``1 - d p``, ``eta + p a + O(p^2)``
    with ``a = w . x``) and the masks dropping one unit ``j`` (probability ``p``,
    ``eta - w_j x_j``) count:
    ``E sigma = sigma + p [sigma' a - d sigma + sum_j sigma(eta - w_j x_j)] + O(p^2)``,
    and with ``logit(sigma + e) = eta + e / sigma' + O(e^2)``:
    ``eta_mix = eta + p c + O(p^2)``, ``c = a + sum_j [sigma(eta - w_j x_j) - sigma(eta)] / sigma'(eta)``.
    The GLM part is e-flat (linear in theta), so the normal vectors are ``p (I - P_T) d2 c``
    projected at the GLM: ``gamma^2 / p^2 -> g^{ac} g^{bd} <N[c]_ab, N[c]_cd>_G``.
    """
    d = w.numel()

    def glm(th):
        return (x @ th[:d] + th[d])[:, None]

    def corr(th):
        eta = x @ th[:d] + th[d]
        sig = torch.sigmoid(eta)
        jumps = torch.sigmoid(eta[:, None] - x * th[:d]) - sig[:, None]  # [n, d]
        return ((x @ th[:d]) + jumps.sum(1) / (sig * (1 - sig)))[:, None]

    theta = torch.cat([w.reshape(-1), b.reshape(-1)]).to(D64)
    P = theta.numel()
    R = ref.build(glm, theta, "bernoulli")
    Hc = ref.hessian_outputs(corr, theta).reshape(-1, P, P)
    PT = R.J @ torch.linalg.pinv(R.g, hermitian=True) @ R.J.T @ R.G
    N = Hc - torch.einsum("ij,jab->iab", PT, Hc)
    gi = torch.linalg.pinv(R.g, hermitian=True)
    return torch.einsum("ac,bd,iab,ij,jcd->", gi, gi, N, R.G, N)


def regularised_natural_gradient_direction(
    eta_fn: Callable[[Tensor], Tensor], ref_fn: Callable[[Tensor], Tensor], theta: Tensor, family: str, y: Tensor, weight: float
) -> Tensor:
    """``(g + weight g_ref)^+ J^T r`` with dense Fisher matrices of both input sets (pseudo-inverse)."""
    R = ref.build(eta_fn, theta, family)
    Rr = ref.build(ref_fn, theta, family)
    eta = eta_fn(theta).detach().requires_grad_(True)
    r = torch.autograd.grad(nll_sum(family, eta, y), eta)[0].reshape(-1)
    return torch.linalg.pinv(R.g + weight * Rr.g, hermitian=True) @ (R.J.T @ r)
