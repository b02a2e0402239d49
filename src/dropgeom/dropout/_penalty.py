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
  pass, ``exact``: ``U`` of them (chunked) -- except when a single ReLU (or LeakyReLU) and an affine
  rest follow that Linear (``Chain.relu_shift``): then every ``eta^(-j)`` is
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
* **generic** otherwise (``_penalty_generic``): ``torch.func`` / autograd with respect
  to all-ones masks placed in one shared forward pass; ``exact``: ``R`` backward products
  (quadratic), one forward per unit (divergence, ``vmap``), forward-over-forward passes
  (curvature); ``mc`` / ``unit``: one probe, one dropped unit or one forward-mode product
  per sample, Hutchinson for the curvature (unbiased).

Every dropout site is taken (``_penalty_sites``): ``nn.Dropout`` / channel dropout,
:class:`~dropgeom.dropout.DropPath`, attention-weight dropout of ``nn.MultiheadAttention``,
``F.dropout``-family calls and ``scaled_dot_product_attention(dropout_p>0)`` in custom
forwards (the last ones on the generic path), and alpha dropout along its mask line with
``V_l = p_l / (1 + p_l ALPHA^2)`` and a drift in the curvature terms (theory.md 4.5).

Every random number is drawn by ``_draw`` before any term is computed, so both
paths consume the same draws in the same order.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor, nn

from ..families import ExponentialFamily
from ..options import Estimator, PenaltyForm, parse
from ._common import Inputs, as_tuple, check_output, family_of
from ._legacy import legacy_signature, warn_deprecated
from ._penalty_result import PenaltyResult
from .masks import PSpec, mask_variance
from ._penalty_chain import _chain_layers
from ._penalty_draws import _draw
from ._penalty_generic import _generic_layers
from ._penalty_sites import record

__all__ = ["penalty", "output_linear", "PenaltyResult"]


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
        :class:`~dropgeom.dropout.PenaltyResult`: ``value``, a scalar tensor differentiable (once: no
        ``create_graph``) in ``model.parameters()``, and ``eta``, the clean (eval-mode) output of the same
        forward pass, differentiable, so the clean loss can reuse it
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
        warn_deprecated("penalty(return_output=...): read .value and .eta of the result")
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

    Three strategies share the forward pass (``_penalty_sites.record``) and the draws
    (``_penalty_draws._draw``, so the order of random draws is fixed in one place):
    :func:`_closed_layer` for a dropout layer right before the output Linear,
    ``_penalty_chain._chain_layers`` on the chain fast path and
    ``_penalty_generic._generic_layers`` otherwise."""
    form = parse(PenaltyForm, form, where="penalty").value
    estimator = parse(Estimator, estimator, where="penalty").value
    if curvature and targets is None:
        raise ValueError("penalty: curvature=True needs targets (the residual r = mu - t(y) enters the curvature term)")
    fam = family_of(family)
    args = as_tuple(inputs)
    n = args[0].shape[0]
    rec = record(model, args, layers, p, fast)
    names, ps, eta, hs, chain = rec.names, rec.ps, rec.eta, rec.hs, rec.chain
    check_output(fam, eta.detach(), n)
    if targets is not None:
        fam.check_targets(targets, n, eta.shape[1])
    r = _residual(fam, eta, targets) if curvature else None

    closed = {k: output_linear(model, k) for k in names if rec.kinds[k] in ("dropout", "channel")}
    closed = {k: lin for k, lin in closed.items() if lin is not None and hs[k].dim() == 2}
    others = [k for k in names if k not in closed]
    shapes = {k: (tuple(rec.masks[k].shape[1:]) if chain is None else tuple(hs[k].shape[1:])) for k in names}
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
            total = total + _generic_layers(
                model, args, fam, eta, others, rec.masks, ps, rec.kinds, form, estimator, draws, chunk_size, r
            )
    return total, eta


def _closed_layer(
    fam: ExponentialFamily, eta: Tensor, h: Tensor, w: Tensor, form: str, p: float, j: Optional[Tensor], prob: Optional[Tensor]
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


def _residual(fam: ExponentialFamily, eta: Tensor, targets: Tensor) -> Tensor:
    """``r = mu - t(y)`` for the curvature term; a family without ``t(y)`` or ``mu`` is named in the error."""
    try:
        return fam.residual(eta, targets)
    except NotImplementedError as exc:
        raise ValueError(
            f"penalty: the curvature term is not supported for family {fam.name!r}: it needs the residual "
            f"r = mu(eta) - t(y), and the family does not implement it ({exc}). Use curvature=False."
        ) from exc
