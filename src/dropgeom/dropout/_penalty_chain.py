"""The penalty's chain strategy (theory.md section 4.4): explicit propagation through a
top-level ``nn.Sequential`` of Linear / elementwise modules downstream of the dropout layers.

Quadratic form: the probes ``Sigma^{1/2}`` (``exact``) or ``Sigma^{1/2} xi`` (``mc``) are
pulled back by explicit matmuls (``w -> w @ W``, ``w -> w * a'(z)``); ``unit`` pushes the
rank-1 tangent ``h_j W[:, j]`` of one unit per sample forward. Divergence form: the
dropped outputs are rank-1 changes of the first downstream Linear's output pushed through
the rest (or, with one ReLU or LeakyReLU and an affine rest, one matmul plus the kink crossings).
Curvature terms: ``B_j`` from the dropped outputs and one forward tangent along the
all-ones mask; ``C_jj`` in closed form where it applies, else second-order forward
propagation (exact, chunked) or Hutchinson (sampled). See :mod:`dropgeom.dropout.chain`.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from ..families import ExponentialFamily
from ._common import chunk_for
from .chain import Chain
from .masks import mask_variance
from ._penalty_draws import _Draws

__all__: List[str] = []


def _chain_layers(
    chain: Chain,
    fam: ExponentialFamily,
    others: List[str],
    ps: Dict[str, float],
    form: str,
    estimator: str,
    draws: _Draws,
    chunk_size: Optional[int],
    r: Optional[Tensor],
    prob: Optional[Tensor],
) -> Tensor:
    """The layers without a closed form, by explicit propagation through a Linear/elementwise chain
    (``chain.py``); ``r`` (the residual ``mu - t(y)``) adds the curvature term."""
    eta = chain.eta
    n, kdim = eta.shape
    total = eta.new_zeros(())
    if form == "quadratic":
        if estimator == "exact":  # as few probes as Sigma's rank allows (categorical: K - 1 columns)
            sq = fam.reduced_cov_sqrt(eta)  # [n, K, R]
        else:  # the sampled probes keep the K-column root (the draws are [n, K])
            sq = fam.cov_sqrt_with_mean(eta, prob)  # [n, K, K]; categorical: from the shared softmax
        if estimator == "unit":
            for k in others:
                u = chain.h(k).shape[1]
                pos, _, t = chain.tangent_per_sample(k, draws.units[k])
                d = chain.forward_tangent(pos, t)  # [n, K]: d eta_i / d m_{i j_i}
                fis = u * torch.einsum("nkr,nk->nr", sq, d).pow(2).sum() / n
                total = total + 0.5 * mask_variance(ps[k]) * fis
        else:
            probes = sq.permute(2, 0, 1).contiguous() if estimator == "exact" else torch.einsum("nkr,nr->nk", sq, draws.probe)
            for k, w in chain.pull_back(probes, others).items():
                # sum_ij h_ij^2 sum_r w_rij^2: the probes summed first (half the passes over [R, n, U])
                sq_w = w.pow(2) if w.dim() == 2 else w.pow(2).sum(0)
                total = total + 0.5 * mask_variance(ps[k]) * (sq_w * chain.h(k).pow(2)).sum() / n
        if r is not None:
            for k in others:
                curv = _chain_curvature(chain, k, r, draws.hutchinson.get(k), chunk_size)
                total = total + 0.5 * mask_variance(ps[k]) * curv / n
        return total
    for k in others:
        u = chain.h(k).shape[1]
        if estimator != "exact":
            pos, base, t = chain.tangent_per_sample(k, draws.units[k])
            dropped = chain.push(pos, base - t)
            total = total + ps[k] * u * fam.kl_to_each(eta, dropped, prob).sum() / n
            if r is not None:  # B_j: <r, eta^(-j) - eta> here, <r, d_j eta> below
                total = total + ps[k] * u * ((dropped - eta) * r).sum() / n
            continue
        shift = chain.relu_shift(k)
        if shift is not None:  # every eta^(-j) - eta by one matmul and the kink crossings, [n, K, U]
            total = total + ps[k] * fam.kl_shift(eta, shift, prob).sum() / n
            if r is not None:
                total = total + ps[k] * torch.bmm(r.unsqueeze(1), shift).sum() / n
            continue
        pos, base, _ = chain._start(k)
        chunk = chunk_size or chunk_for(n, max(base.shape[1], kdim), 2**22)
        for s in range(0, u, chunk):
            units = torch.arange(s, min(u, s + chunk), device=eta.device)
            pos, states = chain.dropped(k, units)
            dropped = chain.push(pos, states)  # [c, n, K]
            total = total + ps[k] * fam.kl_to_each(eta, dropped, prob).sum() / n
            if r is not None:
                total = total + ps[k] * ((dropped - eta) * r).sum() / n
    if r is not None:  # sum_j <r_i, d_j eta_i> of B_j: eta's derivative along the all-ones mask direction
        for k in others:
            total = total + ps[k] * (chain.along_mask(k) * r).sum() / n
    return total


def _chain_curvature(chain: Chain, k: str, r: Tensor, v: Optional[Tensor], chunk_size: Optional[int]) -> Tensor:
    """``sum_ij <r_i, d^2 eta_i / d m_j^2>`` of layer ``k`` on the chain path (not divided by ``n``).

    Closed form when it applies (:meth:`Chain.curvature_rank1`: exact, the draw is not
    used); otherwise second-order forward propagation: of every unit's tangent in chunks
    (exact, ``v`` is ``None``), or of one Rademacher combination ``sum_j v_ij t_j`` per
    sample (Hutchinson, ``E D2 eta[v, v] = sum_j d^2 eta / d m_j^2``, as on the generic path)."""
    closed = chain.curvature_rank1(k, r)
    if closed is not None:
        return closed.sum()
    if v is not None:
        pos, t = chain.tangent_along(k, v)
        return (chain.second(pos, t.unsqueeze(0))[0] * r).sum()
    h = chain.h(k)
    n, u = h.shape
    pos, base, _ = chain._start(k)
    chunk = chunk_size or chunk_for(n, max(base.shape[1], r.shape[1]), 2**22)
    total = r.new_zeros(())
    for s in range(0, u, chunk):
        units = torch.arange(s, min(u, s + chunk), device=r.device)
        pos, _, t = chain.tangents(k, units)
        total = total + (chain.second(pos, t) * r).sum()
    return total
