r"""The penalty's generic strategy (theory.md section 4.4): autograd / ``torch.func`` with respect to the masks.

Every dropout site -- modules of every kind, attention-weight and functional dropout --
is multiplied by an all-ones mask in the shared forward pass (``_penalty_sites``), and:

* **exact**: quadratic: ``R`` reverse-mode products with respect to the masks (one batched
  backward with ``create_graph``); divergence: one forward pass per unit (``vmap`` over
  units); curvature: a forward-over-forward pass per unit.
* **mc** (unbiased): quadratic: one probe ``w_i = Sigma_i^{1/2} xi_i`` with Rademacher ``xi``
  (one backward); divergence: one randomly dropped unit per sample,
  ``U * KL(eta_i || eta_i^(-j_i))`` (one forward); Gaussian curvature: Hutchinson
  ``E_v D2 eta[v, v] = sum_j d^2 eta / d m_j^2`` with per-sample Rademacher ``v``.
* **unit** (unbiased): quadratic: one random unit ``j_i`` per sample, ``d_j eta`` by one
  forward-mode pass along the one-hot mask; otherwise as ``mc``.

Alpha dropout (theory.md section 4.5) is differentiated along its mask line
``h~ = m (h + ALPHA) - ALPHA`` (``m = 0``: the dropped value). Its variance factor is that of
the actual perturbation, ``Var h~_j = V_alpha (h_j + ALPHA)^2`` with
``V_alpha = p / (1 + p ALPHA^2)``, and its curvature terms add the drift of its mean,
``E h~ = a (1 - p) h``: ``(a (1 - p) - 1) D`` (quadratic) or ``-p (1 + ALPHA^2)/2 D``
(divergence, theory.md 4.5) with ``D = (1/n) sum_ij <r_i, d eta_i / d h~_ij h_ij>``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import jvp

from .._intercept import ALPHA, alpha_affine, alpha_mode
from ..families import ExponentialFamily
from ._common import chunk_for, chunked_vmap
from .explicit import forward_with_masks
from .masks import ALPHA_KINDS, DROPOUT_TYPES, mask_variance
from ._penalty_draws import _Draws

__all__: List[str] = []

#: modules that are linear, affine or piecewise linear (``a'' = 0`` almost everywhere)
_PIECEWISE_LINEAR_MODULES = DROPOUT_TYPES + (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
)


def _piecewise_linear_after(model: nn.Module, name: str) -> bool:
    """True if ``model`` is a plain top-level ``nn.Sequential`` and every module after ``name``
    is (piecewise) linear: then ``d^2 eta / d m_j^2 = 0`` wherever it exists (autodiff, and
    the forward-over-forward passes of the generic path, give exactly 0 too), so the
    Gaussian curvature term ``C_jj`` of that layer is zero."""
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        return False
    keys = list(model._modules)
    if name not in keys:
        return False
    return all(type(m) in _PIECEWISE_LINEAR_MODULES for m in list(model)[keys.index(name) + 1 :])


def layer_variance(kind: str, p: float) -> float:
    """The variance factor of the quadratic form: ``p / (1 - p)`` (multiplicative masks) or, for
    alpha dropout, ``p / (1 + p ALPHA^2)`` (``Var h~_j / (h_j + ALPHA)^2``, theory.md 4.5).

    Example:
        >>> layer_variance("dropout", 0.5), round(layer_variance("alpha", 0.5), 4)
        (1.0, 0.1964)
    """
    if kind in ALPHA_KINDS:
        return p / (1.0 + p * ALPHA * ALPHA)
    return mask_variance(p)


def _generic_layers(
    model: nn.Module,
    args: Tuple[Tensor, ...],
    fam: ExponentialFamily,
    eta: Tensor,
    others: List[str],
    masks: Dict[str, Tensor],
    ps: Dict[str, float],
    kinds: Dict[str, str],
    form: str,
    estimator: str,
    draws: _Draws,
    chunk_size: Optional[int],
    r: Optional[Tensor],
) -> Tensor:
    """The layers without a closed form by autograd / ``torch.func`` with respect to the masks
    (``masks``: the all-ones masks that multiply each layer's input in the recorded forward)."""
    with alpha_mode("line"):
        if form == "quadratic":
            total = _quadratic(model, args, fam, eta, others, masks, ps, kinds, estimator, draws, chunk_size, r)
        else:
            total = _divergence(model, args, fam, eta, others, masks, ps, estimator, draws, chunk_size, r)
    if r is not None:
        total = total + _alpha_drift(model, args, others, masks, ps, kinds, form, r, fam)
    return total


def _quadratic(
    model: nn.Module,
    args: Tuple[Tensor, ...],
    fam: ExponentialFamily,
    eta: Tensor,
    others: List[str],
    masks: Dict[str, Tensor],
    ps: Dict[str, float],
    kinds: Dict[str, str],
    estimator: str,
    draws: _Draws,
    chunk_size: Optional[int],
    r: Optional[Tensor],
) -> Tensor:
    """``sum_l V_l/2 sum_j F^mask_jj`` (plus ``V_l/2 sum_j C_jj`` with ``r``) of the generic layers."""
    n = eta.shape[0]
    total = eta.new_zeros(())
    ms = [masks[k] for k in others]
    # exact: as few columns as Sigma's rank allows (categorical: K - 1), one reverse product each
    sq = fam.reduced_cov_sqrt(eta) if estimator == "exact" else fam.cov_sqrt(eta)  # [n, K, R]
    grads: Sequence[Tensor]
    if estimator == "exact":  # R reverse-mode products, batched over the columns
        cot = sq.permute(2, 0, 1)
        try:
            grads = torch.autograd.grad(eta, ms, cot, create_graph=True, is_grads_batched=True)
        except (RuntimeError, NotImplementedError):
            cols = [torch.autograd.grad(eta, ms, cot[c], create_graph=True) for c in range(cot.shape[0])]
            grads = tuple(torch.stack([c[i] for c in cols]) for i in range(len(ms)))
    elif estimator == "mc":
        probe = torch.einsum("nkr,nr->nk", sq, draws.probe)
        grads = torch.autograd.grad(eta, ms, probe, create_graph=True)
    else:  # "unit": one random unit j_i per sample, U (d_j eta)^T Sigma (d_j eta) by one jvp
        units: List[Tensor] = []
        for k in others:
            shape = tuple(masks[k].shape[1:])
            u = math.prod(shape)
            onehot = torch.zeros(n, u, dtype=eta.dtype, device=eta.device)
            onehot[torch.arange(n, device=eta.device), draws.units[k]] = 1.0
            ones = torch.ones(n, *shape, dtype=eta.dtype, device=eta.device)

            def along(mm: Tensor, k: str = k) -> Tensor:
                return forward_with_masks(model, args, {k: mm})

            d = jvp(along, (ones,), (onehot.reshape(n, *shape),))[1]  # [n, K]
            units.append(math.sqrt(u) * torch.einsum("nkr,nk->nr", sq, d))
        grads = units
    for k, g in zip(others, grads):
        total = total + 0.5 * layer_variance(kinds[k], ps[k]) * g.pow(2).sum() / n
    curved = [k for k in others if not _piecewise_linear_after(model, k)]  # the others' C_jj is 0
    if r is not None and curved:
        vs = {k: layer_variance(kinds[k], ps[k]) for k in curved}
        total = total + _gaussian_curvature(model, args, curved, masks, r, vs, draws, chunk_size, fam)
    return total


def _divergence(
    model: nn.Module,
    args: Tuple[Tensor, ...],
    fam: ExponentialFamily,
    eta: Tensor,
    others: List[str],
    masks: Dict[str, Tensor],
    ps: Dict[str, float],
    estimator: str,
    draws: _Draws,
    chunk_size: Optional[int],
    r: Optional[Tensor],
) -> Tensor:
    """``sum_l p_l sum_j K_j`` (plus ``p_l sum_j B_j`` with ``r``) of the generic layers."""
    n, kdim = eta.shape
    total = eta.new_zeros(())
    for k in others:
        shape = tuple(masks[k].shape[1:])
        u = math.prod(shape)
        if estimator == "exact":  # one downstream forward per unit, vmapped over chunks of units
            chunk = chunk_size or chunk_for(n, max(u, kdim), 2**22)
            for s in range(0, u, chunk):
                e = torch.zeros(min(u, s + chunk) - s, u, dtype=eta.dtype, device=eta.device)
                e[torch.arange(e.shape[0]), torch.arange(s, s + e.shape[0])] = 1.0

                def drop(row: Tensor, k: str = k, shape=shape) -> Tensor:
                    return forward_with_masks(model, args, {k: (1.0 - row).reshape(1, *shape)})

                dropped = chunked_vmap(drop, e, e.shape[0])  # [c, n, K]; a loop where a layer cannot be vmapped
                c = dropped.shape[0]
                kl = fam.kl(eta.unsqueeze(0).expand(c, n, kdim).reshape(-1, kdim), dropped.reshape(-1, kdim))
                total = total + ps[k] * kl.sum() / n
                if r is not None:
                    total = total + ps[k] * ((dropped - eta.unsqueeze(0)) * r.unsqueeze(0)).sum() / n
        else:  # one randomly dropped unit per sample: one forward
            row = torch.ones(n, u, dtype=eta.dtype, device=eta.device)
            row[torch.arange(n), draws.units[k]] = 0.0
            dropped = forward_with_masks(model, args, {k: row.reshape(n, *shape)})
            total = total + ps[k] * u * fam.kl(eta, dropped).sum() / n
            if r is not None:
                total = total + ps[k] * u * ((dropped - eta) * r).sum() / n
    if r is not None:  # sum_j <r_i, d_j eta_i> of B_j: one backward for every layer
        grads = torch.autograd.grad(eta, [masks[k] for k in others], r, create_graph=True)
        for k, g in zip(others, grads):
            total = total + ps[k] * g.sum() / n
    return total


def _alpha_drift(
    model: nn.Module,
    args: Tuple[Tensor, ...],
    others: List[str],
    masks: Dict[str, Tensor],
    ps: Dict[str, float],
    kinds: Dict[str, str],
    form: str,
    r: Tensor,
    fam: ExponentialFamily,
) -> Tensor:
    """The drift of alpha dropout's mean in the curvature terms (theory.md 4.5): ``D`` is the
    derivative of ``(1/n) sum_i <r_i, eta_i>`` along ``h~ = (1 + t) h`` at every unit of the layer
    (one forward-mode pass), times ``a (1 - p) - 1`` (quadratic) or ``-p (1 + ALPHA^2) / 2`` (divergence)."""
    n = r.shape[0]
    total = r.new_zeros(())
    for k in [k for k in others if kinds[k] in ALPHA_KINDS]:
        ones = torch.ones_like(masks[k], requires_grad=False)

        def scaled(mm: Tensor, k: str = k) -> Tensor:
            return forward_with_masks(model, args, {k: mm})

        try:
            with alpha_mode("scale"):
                d = (r * jvp(scaled, (ones,), (ones,))[1]).sum() / n
        except (RuntimeError, NotImplementedError) as exc:
            raise ValueError(
                f"penalty: the curvature term of alpha-dropout layer {k!r} (family {fam.name!r}) needs a "
                f"forward-mode derivative through the modules after it, which failed ({exc}). Use curvature=False."
            ) from exc
        a, _ = alpha_affine(ps[k])
        coef = a * (1.0 - ps[k]) - 1.0 if form == "quadratic" else -0.5 * ps[k] * (1.0 + ALPHA * ALPHA)
        total = total + coef * d
    return total


def _gaussian_curvature(
    model: nn.Module,
    args: Tuple[Tensor, ...],
    generic: List[str],
    masks: Dict[str, Tensor],
    r: Tensor,
    vs: Dict[str, float],
    draws: _Draws,
    chunk_size: Optional[int],
    fam: ExponentialFamily,
) -> Tensor:
    """``sum_l V_l/2 (1/n) sum_ij <r_i, d^2 eta_i / d m_j^2>`` by forward-over-forward passes.

    Raises ``ValueError`` naming the layer when a module after it has no forward-mode derivative."""
    total = r.new_zeros(())
    for k in generic:
        try:
            v = draws.hutchinson.get(k)
            total = total + _gaussian_curvature_layer(model, args, k, masks, r, vs[k], v, chunk_size)
        except (RuntimeError, NotImplementedError) as exc:
            raise ValueError(
                f"penalty: the curvature term (family {fam.name!r}, form 'quadratic') is not supported for dropout "
                f"layer {k!r}: it needs second derivatives along the mask by forward-mode autodiff "
                f"(torch.func.jvp) through the modules after {k!r}, which failed ({exc}). Use curvature=False, "
                f"form='divergence' (its curvature term needs no forward mode), or restrict `layers`."
            ) from exc
    return total


def _gaussian_curvature_layer(
    model: nn.Module,
    args: Tuple[Tensor, ...],
    k: str,
    masks: Dict[str, Tensor],
    r: Tensor,
    var: float,
    v: Optional[Tensor],
    chunk_size: Optional[int],
) -> Tensor:
    """One layer's ``V/2 (1/n) sum_ij <r_i, d^2 eta_i / d m_j^2>`` (generic path)."""
    n = args[0].shape[0]
    shape = tuple(masks[k].shape[1:])
    u = math.prod(shape)

    def f(mask: Tensor) -> Tensor:
        return forward_with_masks(model, args, {k: mask})

    def second(t: Tensor, base: Tensor) -> Tensor:
        def along(mm: Tensor) -> Tensor:
            return jvp(f, (mm,), (t,))[1]

        return jvp(along, (base,), (t,))[1]

    if v is not None:  # Hutchinson over units, per sample (samples do not interact)
        q = second(v, torch.ones(n, *shape, dtype=r.dtype, device=r.device))
    else:  # one forward-over-forward pass per unit, vmapped over chunks of units
        chunk = chunk_size or chunk_for(n, max(u, r.shape[1]), 2**22)
        base = torch.ones(1, *shape, dtype=r.dtype, device=r.device)
        q = r.new_zeros(r.shape)
        for s in range(0, u, chunk):
            e = torch.zeros(min(u, s + chunk) - s, u, dtype=r.dtype, device=r.device)
            e[torch.arange(e.shape[0]), torch.arange(s, s + e.shape[0])] = 1.0
            q = q + chunked_vmap(lambda row: second(row.reshape(1, *shape), base), e, e.shape[0]).sum(0)
    return 0.5 * var * (r * q).sum() / n
