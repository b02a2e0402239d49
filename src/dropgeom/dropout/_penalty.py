r"""The differentiable Fisher-dropout penalty (theory.md section 4.4).

Deterministic Fisher-dropout training minimises ``L_clean + penalty`` with

.. code-block:: text

    quadratic:   1/2 sum_l V_l sum_j F^mask_jj      V_l = p_l / (1 - p_l)
    divergence:  sum_l p_l sum_j K_j

(theory.md 4.2 for ``F^mask``, ``K``), plus, with ``curvature=True``, the matching
curvature term ``1/2 sum_l V_l sum_j C_jj`` or ``sum_l p_l sum_j B_j`` (needs targets).
The value equals what :func:`~dropgeom.dropout.terms` reports at the same
parameters; the result is a scalar tensor differentiable with respect to the
model's parameters (``.backward()`` reaches ``model.parameters()``).

How each layer is computed (``U`` units, ``R`` = rank of ``Sigma``):

* **closed form** (no extra pass): a dropout module followed only by the final
  ``nn.Linear`` of a top-level ``nn.Sequential``: ``d eta / d h~ = W_out``, so
  ``d_j eta_i = h_ij W_out[:, j]``, ``eta_i^(-j) = eta_i - h_ij W_out[:, j]`` and both
  curvature terms are exactly zero (eta is affine in the mask). Quadratic: always
  exact, ``O(n U K)`` (categorical: ``p @ W^2 - (p @ W)^2``; else ``O(n R U K)``).
  Divergence: exact ``O(n U K)``; with ``method="mc"`` one dropped unit per
  sample, ``O(n K)``.
* **chain** (``chain.py``): a top-level ``nn.Sequential`` whose modules downstream
  of the dropout layers are Linear / elementwise activations / Dropout / Flatten /
  Identity (one input tensor; with or without the curvature term). One forward pass records
  every module's input; its output is the result's ``eta`` so the
  clean loss needs no second forward. Quadratic: the probes are pulled back by
  explicit matmuls (``w -> w @ W``, ``w -> w * a'(z)``) -- autograd differentiates
  only a first-order graph; ``mc`` costs one extra backward-sized pass through the
  downstream layers (about 1.6x a forward+backward in total for the clean loss plus
  penalty on a two-hidden-layer MLP), ``exact`` ``R`` of them. Divergence: the
  dropped outputs are rank-1 changes ``z - h_j W[:, j]`` of the first downstream
  Linear's output pushed through the rest of the chain; ``mc``: one ``[n, width]``
  pass, ``exact``: ``U`` of them (chunked) -- except when a single ReLU and an affine
  rest follow that Linear (``Chain.dropped_relu``): then every ``eta^(-j)`` is
  ``eta - h_j J[:, j]`` (the Jacobian ``J = L D W`` from one matmul) corrected at the
  few coordinates where the drop crosses the ReLU's kink; exact, no per-unit pass.
  Curvature terms: ``B_j`` reuses the dropped outputs plus one forward tangent
  (``sum_j <r, d_j eta>`` = eta's derivative along the all-ones mask, whose tangent
  after the first Linear is its output less the bias); ``C_jj`` is zero where eta is affine in the mask, in
  closed form ``h_j^2 ((L^T r) a''(z)) @ W^2`` with one activation before an affine
  rest (one matmul), and otherwise second-order forward propagation of the unit
  tangents (``exact``, chunked) or of one Rademacher combination per sample
  (``mc`` / ``unit``: Hutchinson). Quadratic with ``method="unit"``: the
  same rank-1 tangent ``h_j W[:, j]`` of one random unit per sample is pushed forward
  (``t -> t W^T``, ``t -> a'(z) t``) to ``d_j eta``, and ``U (d_j eta)^T Sigma (d_j eta)``
  is unbiased at ``O(n width K)`` -- no matmul with the ``[width, U]`` weight at all.
* **generic** otherwise (``torch.func`` / autograd with respect to the masks):
  **exact**: quadratic: ``R`` reverse-mode products with respect to the
  masks (one batched backward with ``create_graph``); divergence: one forward pass
  of the downstream layers per unit (``vmap`` over units); curvature: a
  forward-over-forward pass per unit.
  **mc** (unbiased): quadratic: one probe ``w_i = Sigma_i^{1/2} xi_i`` with
  Rademacher ``xi`` (``E w w^T = Sigma``), i.e. one backward; divergence: one
  randomly dropped unit per sample, ``U * KL(eta_i || eta_i^(-j_i))``, i.e. one
  forward; Gaussian curvature: Hutchinson ``E_v D2 eta[v, v] = sum_j d^2 eta/dm_j^2``
  with per-sample Rademacher ``v`` (one forward-over-forward pass).
  **unit** (unbiased): quadratic: one random unit ``j_i`` per sample, ``d_j eta`` by one
  forward-mode pass (``jvp`` along the one-hot mask); otherwise as ``mc``.

Every random number is drawn by ``_draw`` before any term is computed, so both
paths consume the same draws in the same order.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor, nn
from torch.func import jvp

from ..families import ExponentialFamily
from ..manifold import eval_mode
from ..options import Estimator, PenaltyForm
from ._common import Inputs, as_tuple, check_output, chunk_for, chunked_vmap, family_of
from .chain import Chain, as_chain, run_chain, training_off
from ._legacy import legacy_signature, warn_deprecated
from ._penalty_result import PenaltyResult
from .explicit import forward_with_masks
from .masks import _CHANNEL_TYPES, DROPOUT_TYPES, PSpec, find_dropout, mask_variance, resolve_p

__all__ = ["penalty", "output_linear", "PenaltyResult"]

FORMS = ("quadratic", "divergence")
ESTIMATORS = ("exact", "mc", "unit")


#: modules that are linear, affine or piecewise linear (``a'' = 0`` almost everywhere)
_PIECEWISE_LINEAR_MODULES = DROPOUT_TYPES + (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Flatten, nn.Unflatten, nn.Identity,
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


def output_linear(model: nn.Module, name: str) -> Optional[nn.Linear]:
    """The final ``nn.Linear`` if dropout layer ``name`` is followed only by it in a top-level ``nn.Sequential``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
        >>> output_linear(net, "1")
        Linear(in_features=4, out_features=2, bias=True)
        >>> output_linear(net, "0") is None
        True
    """
    if not isinstance(model, nn.Sequential):
        return None
    keys = list(model._modules)
    if name not in keys:
        return None
    rest = [model._modules[k] for k in keys[keys.index(name) + 1 :]]
    if len(rest) == 1 and isinstance(rest[0], nn.Linear):
        return rest[0]
    return None


@contextlib.contextmanager
def _lazy_masks(model: nn.Module, mods: Dict[str, nn.Module], store: Dict[str, Tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Multiply each dropout input by a fresh all-ones mask that requires grad; record (h, mask)."""
    handles = []

    def make(name: str, mod: nn.Module):
        def hook(module: nn.Module, args: Tuple[Tensor, ...], output: Tensor) -> Tensor:
            h = args[0]
            unit = (h.shape[1],) if isinstance(mod, _CHANNEL_TYPES) else tuple(h.shape[1:])
            m = torch.ones(h.shape[0], *unit, dtype=h.dtype, device=h.device, requires_grad=True)
            store[name] = (h, m)
            mm = m.reshape(*m.shape, *([1] * (h.dim() - 2))) if isinstance(mod, _CHANNEL_TYPES) else m
            return h * mm

        return hook

    try:
        for name, mod in mods.items():
            handles.append(mod.register_forward_hook(make(name, mod)))
        yield
    finally:
        for h in handles:
            h.remove()


def _rademacher(shape, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    b = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * b - 1).to(like.dtype)


@legacy_signature(
    old=("family", "p", "form", "targets", "curvature", "layers", "estimator", "generator"), renamed={"estimator": "method"}
)
def penalty(
    model: nn.Module,
    inputs: Inputs,
    targets: Optional[Tensor] = None,
    *,
    family: Union[str, ExponentialFamily] = "categorical",
    p: PSpec = None,
    layers: Optional[Sequence[str]] = None,
    form: Union[str, PenaltyForm] = "quadratic",
    curvature: bool = False,
    method: Union[str, Estimator] = "exact",
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    return_output: Optional[bool] = None,
) -> PenaltyResult:
    r"""Fisher-dropout penalty: ``1/2 sum_l V_l sum_j F^mask_jj`` or ``sum_l p_l sum_j K_j`` (theory.md section 4.4).

    .. math::  \tfrac12 \sum_l V_l \sum_j F^{mask}_{jj}\ \ (\text{quadratic}), \qquad
               \sum_l p_l \sum_j K_j\ \ (\text{divergence}), \qquad V_l = \frac{p_l}{1 - p_l}

    Args:
        model: network with dropout modules (evaluated at ``m = 1`` in eval mode).
        inputs: the batch.
        targets: labels; needed only with ``curvature=True``.
        family: output family.
        p: drop probability (default each module's ``p``; float or dict per layer).
        layers: restrict to these dropout layers.
        form: ``"quadratic"`` (Fisher form) or ``"divergence"`` (KL to the dropout sub-models).
        curvature: add ``1/2 sum V C_jj`` (quadratic) or ``sum p B_j`` (divergence), by the
            same path and estimator as the Fisher term (theory.md 4.2).
        method: the estimator (:class:`~dropgeom.options.Estimator`; the keyword was
            ``estimator``, still accepted, deprecated): ``"exact"``, ``"mc"`` (unbiased, one
            probe ``Sigma^{1/2} xi`` per sample) or ``"unit"`` (unbiased, one random unit
            ``j_i`` per sample: ``U (d_j eta)^T Sigma (d_j eta)``, a forward-mode pass -- the
            cheapest on deep layers; for the divergence form and the curvature terms it equals
            ``"mc"``). See the module docstring. The quadratic form of a layer right before the
            output Linear is always exact.
        generator: seeds the ``mc`` / ``unit`` draws.
        chunk_size: units evaluated together by the exact divergence form.
        return_output: deprecated. ``True`` returns the pair ``(value, eta)``, ``False`` the
            bare ``value`` tensor, as before; omit it and read the result's fields.

    Returns:
        :class:`~dropgeom.dropout.PenaltyResult`: ``value``, a scalar tensor differentiable
        with respect to ``model.parameters()``, and ``eta``, the clean (eval-mode) output of
        the same forward pass, differentiable, so the clean loss can reuse it
        (``loss = family.nll(r.eta, y).mean() + r.value``) instead of running a second forward.

    Raises:
        ValueError: an unknown ``form`` or ``method``; ``p`` outside ``[0, 1)``;
            ``curvature=True`` without ``targets``, or with a family that has no
            residual ``mu - t(y)``, or (quadratic form, generic path) with a layer
            whose downstream modules have no forward-mode derivative (the error
            names the layer and the family); targets or outputs of the wrong shape;
            an unknown or unused dropout layer in ``layers``.
        TypeError: ``inputs`` is not a tensor or a tuple of tensors.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dropgeom.dropout import terms
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Dropout(0.2), nn.Linear(3, 3)).double()
        >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.randint(0, 3, (5,))
        >>> pen = penalty(net, x).value
        >>> pen.backward()
        >>> ref = 0.5 * 0.25 * terms(net, x, y).fisher
        >>> abs(pen.item() - ref) < 1e-12, net[0].weight.grad is not None
        (True, True)
    """
    with torch.enable_grad():  # derivatives w.r.t. the masks are needed even under no_grad
        pen, eta = _penalty(model, inputs, family, p, form, targets, curvature, layers, method, generator, chunk_size)
    if return_output is not None:
        warn_deprecated("penalty(return_output=...): read .value and .eta of the result", stacklevel=4)  # via the wrapper
        return cast(PenaltyResult, (pen, eta) if return_output else pen)  # the old return types, for one release
    return PenaltyResult(pen, eta)


def _penalty(
    model: nn.Module,
    inputs: Inputs,
    family: Union[str, ExponentialFamily],
    p: PSpec,
    form: str,
    targets: Optional[Tensor],
    curvature: bool,
    layers: Optional[Sequence[str]],
    estimator: str,
    generator: Optional[torch.Generator],
    chunk_size: Optional[int],
    fast: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Validate, run one forward pass, draw every random number, then sum the layers' terms.

    Three strategies share the forward pass and the draws (:func:`_draw`, so the order
    of random draws is fixed in one place): :func:`_closed_layer` for a dropout layer
    right before the output Linear, :func:`_chain_layers` on the chain fast path and
    :func:`_generic_layers` otherwise."""
    if form not in FORMS:
        raise ValueError(f"penalty: form must be one of {FORMS}, got {form!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"penalty: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if curvature and targets is None:
        raise ValueError("penalty: curvature=True needs targets (the residual r = mu - t(y) enters the curvature term)")
    fam = family_of(family)
    args = as_tuple(inputs)
    n = args[0].shape[0]
    mods = find_dropout(model, layers)
    ps = resolve_p(mods, p)
    names = list(mods)

    chain = None
    chain_mods = as_chain(model, names) if fast and len(args) == 1 else None
    if chain_mods is not None:
        with training_off(model):
            chain = run_chain(model, chain_mods, args[0], names)
    store: Dict[str, Tuple[Tensor, Tensor]] = {}
    if chain is not None:
        eta = chain.eta
        hs = {k: chain.h(k) for k in names}
    else:
        with eval_mode(model), _lazy_masks(model, mods, store):
            eta = model(*args)
        missing = [k for k in names if k not in store]
        if missing:
            raise ValueError(f"dropout layers {missing} were not used by the model's forward pass")
        hs = {k: store[k][0] for k in names}
    check_output(fam, eta.detach(), n)
    if targets is not None:
        fam.check_targets(targets, n, eta.shape[1])
    r = _residual(fam, eta, targets) if curvature else None

    closed = {k: output_linear(model, k) for k in names}
    closed = {k: lin for k, lin in closed.items() if lin is not None and hs[k].dim() == 2}
    others = [k for k in names if k not in closed]
    shapes = {k: (tuple(store[k][1].shape[1:]) if chain is None else tuple(hs[k].shape[1:])) for k in names}
    draws = _draw(form, estimator, curvature, list(closed), others, shapes, eta, fam.rank(eta.shape[1]), generator)
    # one mean parameter (categorical: softmax) shared by the family's helpers (on a busy CPU each op costs)
    prob = fam.mean(eta)

    total = eta.new_zeros(())
    for k, lin in closed.items():
        total = total + _closed_layer(fam, eta, hs[k], lin.weight, form, ps[k], draws.units.get(k), prob)
    if others:
        if chain is not None:
            total = total + _chain_layers(chain, fam, others, ps, form, estimator, draws, chunk_size, r, prob)
        else:
            total = total + _generic_layers(model, args, fam, eta, others, store, ps, form, estimator, draws,
                                            chunk_size, r)
    return total, eta


@dataclass
class _Draws:
    """Every random number of one penalty evaluation (see :func:`_draw`)."""

    units: Dict[str, Tensor] = field(default_factory=dict)  # [n]: one unit per sample
    probe: Optional[Tensor] = None  # [n, R]: Rademacher, the quadratic ``mc`` probe Sigma^{1/2} xi
    hutchinson: Dict[str, Tensor] = field(default_factory=dict)  # [n, *unit shape]: Rademacher


def _draw(
    form: str,
    estimator: str,
    curvature: bool,
    closed: List[str],
    others: List[str],
    shapes: Dict[str, Tuple[int, ...]],
    like: Tensor,
    rank: int,
    generator: Optional[torch.Generator],
) -> _Draws:
    """Draw every random number, in one fixed order, before any term is computed.

    Quadratic form: ``mc``: one probe ``xi`` ``[n, R]``; ``unit``: one unit per sample and
    layer; then, with the curvature term and a sampled estimator, one Rademacher mask
    direction per sample and layer (Hutchinson). Divergence form (sampled): one unit per
    sample and layer, closed-form layers first. Only layers without a closed form draw
    in the quadratic form (the closed form is exact and free there). Both paths consume
    the same draws, so they give the same value for the same generator wherever they
    use the same estimator."""
    n = like.shape[0]
    out = _Draws()

    def unit(k: str) -> Tensor:
        return torch.randint(0, math.prod(shapes[k]), (n,), generator=generator, device=like.device)

    if estimator == "exact":
        return out
    if form == "divergence":
        for k in closed + others:
            out.units[k] = unit(k)
        return out
    if others and estimator == "mc":
        out.probe = _rademacher((n, rank), like, generator)
    if estimator == "unit":
        for k in others:
            out.units[k] = unit(k)
    if curvature:
        for k in others:
            out.hutchinson[k] = _rademacher((n, *shapes[k]), like, generator)
    return out


def _closed_layer(
    fam: ExponentialFamily, eta: Tensor, h: Tensor, w: Tensor, form: str, p: float, j: Optional[Tensor],
    prob: Optional[Tensor],
) -> Tensor:
    """A dropout layer right before the output Linear ``W``: ``d eta / d h~ = W``, so
    ``d_j eta_i = h_ij W[:, j]`` and ``eta_i^(-j) = eta_i - h_ij W[:, j]``; both curvature
    terms vanish (eta is affine in the mask). Quadratic: exact, ``O(n U K)``; divergence:
    exact ``O(n U K)``, or with ``j`` (one unit per sample) ``U KL(eta_i || eta_i^(-j_i))``, ``O(n K)``."""
    n = eta.shape[0]
    if form == "quadratic":
        return 0.5 * mask_variance(p) * fam.column_cov_norms(eta, w, h, prob).sum() / n
    if j is None:
        return p * fam.kl_to_shifted(eta, w, h, prob).sum() / n
    rows = torch.arange(n, device=eta.device)
    # index_select keeps the weight-gradient layout (a transposed gather made the backward add strided)
    dropped = eta - h[rows, j].unsqueeze(-1) * torch.index_select(w, 1, j).t()
    return p * h.shape[1] * fam.kl_to_each(eta, dropped, prob).sum() / n


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
        sq = fam.cov_sqrt_with_mean(eta, prob)  # [n, K, R]; categorical: from the shared softmax
        if estimator == "unit":
            for k in others:
                u = chain.h(k).shape[1]
                pos, _, t = chain.tangent_per_sample(k, draws.units[k])
                d = chain.forward_tangent(pos, t)  # [n, K]: d eta_i / d m_{i j_i}
                fis = u * torch.einsum("nkr,nk->nr", sq, d).pow(2).sum() / n
                total = total + 0.5 * mask_variance(ps[k]) * fis
        else:
            probes = sq.permute(2, 0, 1) if estimator == "exact" else torch.einsum("nkr,nr->nk", sq, draws.probe)
            for k, w in chain.pull_back(probes, others).items():
                total = total + 0.5 * mask_variance(ps[k]) * (chain.h(k) * w).pow(2).sum() / n
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
        low_rank = chain.dropped_relu(k)
        if low_rank is not None:  # every eta^(-j) by one matmul and the kink crossings
            total = total + ps[k] * fam.kl_to_each(eta, low_rank, prob).sum() / n
            if r is not None:
                total = total + ps[k] * ((low_rank - eta) * r).sum() / n
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


def _generic_layers(
    model: nn.Module,
    args: Tuple[Tensor, ...],
    fam: ExponentialFamily,
    eta: Tensor,
    others: List[str],
    store: Dict[str, Tuple[Tensor, Tensor]],
    ps: Dict[str, float],
    form: str,
    estimator: str,
    draws: _Draws,
    chunk_size: Optional[int],
    r: Optional[Tensor],
) -> Tensor:
    """The layers without a closed form by autograd / ``torch.func`` with respect to the masks
    (the all-ones masks in ``store`` multiply each layer's input in the recorded forward)."""
    n, kdim = eta.shape
    total = eta.new_zeros(())
    masks = [store[k][1] for k in others]
    if form == "quadratic":
        sq = fam.cov_sqrt(eta)  # [n, K, R]
        if estimator == "exact":  # R reverse-mode products, batched over the columns
            cot = sq.permute(2, 0, 1)
            try:
                grads = torch.autograd.grad(eta, masks, cot, create_graph=True, is_grads_batched=True)
            except (RuntimeError, NotImplementedError):
                cols = [torch.autograd.grad(eta, masks, cot[c], create_graph=True) for c in range(cot.shape[0])]
                grads = tuple(torch.stack([c[i] for c in cols]) for i in range(len(masks)))
        elif estimator == "mc":
            probe = torch.einsum("nkr,nr->nk", sq, draws.probe)
            grads = torch.autograd.grad(eta, masks, probe, create_graph=True)
        else:  # "unit": one random unit j_i per sample, U (d_j eta)^T Sigma (d_j eta) by one jvp
            grads = []
            for k in others:
                shape = tuple(store[k][1].shape[1:])
                u = math.prod(shape)
                onehot = torch.zeros(n, u, dtype=eta.dtype, device=eta.device)
                onehot[torch.arange(n, device=eta.device), draws.units[k]] = 1.0
                ones = torch.ones(n, *shape, dtype=eta.dtype, device=eta.device)

                def along(mm: Tensor, k: str = k) -> Tensor:
                    return forward_with_masks(model, args, {k: mm})

                d = jvp(along, (ones,), (onehot.reshape(n, *shape),))[1]  # [n, K]
                grads.append(math.sqrt(u) * torch.einsum("nkr,nk->nr", sq, d))
        for k, g in zip(others, grads):
            total = total + 0.5 * mask_variance(ps[k]) * g.pow(2).sum() / n
        curved = [k for k in others if not _piecewise_linear_after(model, k)]  # the others' C_jj is 0
        if r is not None and curved:
            total = total + _gaussian_curvature(model, args, curved, store, r, ps, draws, chunk_size, fam)
        return total

    for k in others:
        m = store[k][1]
        shape = tuple(m.shape[1:])
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
        grads = torch.autograd.grad(eta, masks, r, create_graph=True)
        for k, g in zip(others, grads):
            total = total + ps[k] * g.sum() / n
    return total


def _residual(fam: ExponentialFamily, eta: Tensor, targets: Tensor) -> Tensor:
    """``r = mu - t(y)`` for the curvature term; a family without ``t(y)`` or ``mu`` is named in the error."""
    try:
        return fam.residual(eta, targets)
    except NotImplementedError as exc:
        raise ValueError(
            f"penalty: the curvature term is not supported for family {fam.name!r}: it needs the residual "
            f"r = mu(eta) - t(y), and the family does not implement it ({exc}). Use curvature=False."
        ) from exc


def _gaussian_curvature(
    model: nn.Module,
    args: Tuple[Tensor, ...],
    generic: List[str],
    store: Dict[str, Tuple[Tensor, Tensor]],
    r: Tensor,
    ps: Dict[str, float],
    draws: "_Draws",
    chunk_size: Optional[int],
    fam: Optional[ExponentialFamily] = None,
) -> Tensor:
    """``sum_l V_l/2 (1/n) sum_ij <r_i, d^2 eta_i / d m_j^2>`` by forward-over-forward passes.

    Raises ``ValueError`` naming the layer when a module after it has no forward-mode derivative."""
    total = r.new_zeros(())
    for k in generic:
        try:
            v = draws.hutchinson.get(k)
            total = total + _gaussian_curvature_layer(model, args, k, store, r, ps, v, chunk_size)
        except (RuntimeError, NotImplementedError) as exc:
            fam_name = fam.name if fam is not None else "?"
            raise ValueError(
                f"penalty: the curvature term (family {fam_name!r}, form 'quadratic') is not supported for dropout "
                f"layer {k!r}: it needs second derivatives along the mask by forward-mode autodiff "
                f"(torch.func.jvp) through the modules after {k!r}, which failed ({exc}). Use curvature=False, "
                f"form='divergence' (its curvature term needs no forward mode), or restrict `layers`."
            ) from exc
    return total


def _gaussian_curvature_layer(
    model: nn.Module,
    args: Tuple[Tensor, ...],
    k: str,
    store: Dict[str, Tuple[Tensor, Tensor]],
    r: Tensor,
    ps: Dict[str, float],
    v: Optional[Tensor],
    chunk_size: Optional[int],
) -> Tensor:
    """One layer's ``V/2 (1/n) sum_ij <r_i, d^2 eta_i / d m_j^2>`` (generic path)."""
    n = args[0].shape[0]
    m = store[k][1]
    shape = tuple(m.shape[1:])
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
    return 0.5 * mask_variance(ps[k]) * (r * q).sum() / n
