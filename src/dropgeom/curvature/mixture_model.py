r"""The manifold of the dropout-averaged model (theory.md section 4.3), for the curvature engine.

Reading (b) of "dropout flattens the model manifold": at the same ``theta``,
is the manifold of the *dropout model* -- the mixture of sub-models that
dropout averages over -- flatter than that of the deterministic model?
:func:`dropout_mixture_manifold` builds that manifold as an ordinary
:class:`~dropgeom.ModelManifold` whose outputs are

* ``kind="m"`` (the m-mixture, MC-dropout averaging):
  ``eta_mix(x) = log sum_m w_m p_m(. | x)`` (categorical: log-probabilities, a
  valid natural parameter up to the softmax's constant; bernoulli: the log-odds
  of the averaged probability);
* ``kind="e"`` (the e-mixture): ``eta_mix(x) = sum_m w_m eta(x; m)``; it equals
  weight scaling (the eval-mode network) when ``eta`` is affine in the masks.

The masks are either all ``2^U`` joint masks of the dropout units with their
probabilities (``masks="exact"``; small layers) or ``M`` masks drawn once and
held fixed (``masks=M``, common random masks: the same masks at every
``theta``, so that ``eta_mix`` is a smooth function of ``theta`` and every
derivative of the curvature engine applies). Every curvature function then
works unchanged (``embedding_curvature``, ``normal_curvatures``, ...) and
inherits its invariance status.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..families import ExponentialFamily, get_family
from ..manifold import ModelManifold

__all__ = ["dropout_mixture_manifold", "MIXTURE_KINDS"]

MIXTURE_KINDS = ("m", "e")


def dropout_mixture_manifold(
    model: nn.Module,
    inputs: Union[Tensor, tuple],
    family: Union[str, ExponentialFamily] = "categorical",
    kind: str = "m",
    *,
    p: Optional[float] = None,
    masks: Union[str, int] = "exact",
    generator: Optional[torch.Generator] = None,
    layers: Optional[Sequence[str]] = None,
    param_names: Optional[Sequence[str]] = None,
    max_masks: int = 2**12,
) -> ModelManifold:
    r"""The model manifold of the dropout mixture ``theta -> eta_mix(theta)`` (theory.md 4.3).

    .. math::  \eta^{(m)}_{mix}(x) = \log \sum_m w_m\, \mathrm{softmax}(\eta(x; m)),\qquad
               \eta^{(e)}_{mix}(x) = \sum_m w_m\, \eta(x; m)

    with ``w_m`` the mask probabilities (exact enumeration) or ``1/M`` (``M``
    common random masks, drawn once with ``generator`` and shared by all inputs).

    Invariance: the curvature measures computed on this manifold have the
    invariance status they have on any manifold (module
    :mod:`dropgeom.curvature.invariant`).

    Args:
        model: the network with ``nn.Dropout`` layers (their ``p`` is used unless ``p`` is given).
        inputs: inputs with leading sample axis ``n``.
        family: ``categorical`` or ``bernoulli`` for ``kind="m"``; any family for ``kind="e"``.
        kind: ``"m"`` (predictive average) or ``"e"`` (average of natural parameters).
        p: drop probability for every dropout layer (default: each module's own).
        masks: ``"exact"`` (all ``2^U`` masks, at most ``max_masks``) or an int ``M >= 1``.
        generator: random generator for ``masks=M``.
        layers: restrict the mixture to these dropout layers (the others act as identity).
        param_names: the manifold's free parameters (default all).
        max_masks: cap on ``2^U`` for exact enumeration.

    Returns:
        A :class:`~dropgeom.ModelManifold` (its ``forward`` averages over the masks).

    Raises:
        ValueError: the model has no dropout layer, has dropout other than multiplicative ``nn.Dropout``
            modules (alpha dropout, stochastic depth, attention-weight or functional dropout) and ``layers`` is
            not given, every drop probability is 0
            (the mixture would be the deterministic model), an unknown ``kind`` or
            ``masks``, ``kind="m"`` with a family other than categorical/bernoulli,
            or too many masks for exact enumeration.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Dropout(0.3), nn.Linear(3, 2)).double()
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> e = dropout_mixture_manifold(net, x, kind="e")   # mask feeds a linear layer: e-mixture = weight scaling
        >>> torch.allclose(e.eta(), net.eval()(x))
        True
        >>> m = dropout_mixture_manifold(net, x, kind="m")
        >>> bool(torch.allclose(m.eta().exp().sum(-1), torch.ones(4, dtype=torch.float64)))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if kind not in MIXTURE_KINDS:
        raise ValueError(f"kind must be one of {list(MIXTURE_KINDS)} (m- or e-mixture), got {kind!r}")
    fam = get_family(family)
    if kind == "m" and not fam.has_m_mixture:
        raise ValueError(
            f"the m-mixture of {fam.name!r} distributions is not in the family; use kind='e', or a categorical/bernoulli model"
        )
    mk, w = _mixture_masks(model, inputs, p, masks, generator, layers, max_masks)
    return ModelManifold(model, inputs, fam, param_names=param_names, forward=_mixture_forward(model, mk, w, kind, fam))


def _mixture_forward(model: nn.Module, mk: Dict[str, Tensor], w: Tensor, kind: str, fam: ExponentialFamily) -> Any:
    """``forward(params, inputs) -> eta_mix``: the model under every mask at once (mask-major blocks of all ``n``
    inputs), averaged as natural parameters (``e``) or as predictive distributions (``m``)."""
    from ..dropout.explicit import forward_with_masks

    M, logw, names = int(w.shape[0]), w.log(), list(mk)

    def forward(params, ins):
        n = ins[0].shape[0]
        rep = tuple(t.repeat(M, *([1] * (t.dim() - 1))) for t in ins)  # mask-major: block m holds all n inputs
        masks_rep = {k: mk[k].to(rep[0].dtype).repeat_interleave(n, 0) for k in names}
        eta = forward_with_masks(model, rep, masks_rep, params=params).reshape(M, n, -1)
        if kind == "e":
            return torch.einsum("m,mnk->nk", w.to(eta.dtype), eta)
        return fam.m_mixture_eta(eta, logw.to(eta.dtype))

    return forward


def _mixture_masks(
    model: nn.Module,
    inputs: Union[Tensor, tuple],
    p: Optional[float],
    masks: Union[str, int],
    generator: Optional[torch.Generator],
    layers: Optional[Sequence[str]],
    max_masks: int,
) -> Tuple[Dict[str, Tensor], Tensor]:
    """The mixture's masks ``{layer: [M, *unit]}`` and their weights ``[M]``: every mask with its probability
    (``masks="exact"``) or ``M`` common random masks with weight ``1/M``; ``ValueError`` for a model without
    dropout, all ``p = 0``, or a bad ``masks``."""
    from ..dropout.masks import enumerate_masks, find_dropout, resolve_p, sample_masks

    x = inputs if isinstance(inputs, Tensor) else inputs[0]
    if layers is None:
        _refuse_other_dropout(model, x[:1] if isinstance(inputs, Tensor) else tuple(t[:1] for t in inputs))
    try:
        mods = find_dropout(model, layers)
    except ValueError as err:
        raise ValueError(f"a dropout mixture needs a model with dropout layers: {err}") from None
    if not mods:
        raise ValueError("a dropout mixture needs a model with nn.Dropout layers; this model has none")
    ps = resolve_p(mods, p)
    if all(q == 0 for q in ps.values()):
        raise ValueError("every dropout layer has p = 0: the mixture is the deterministic model; set p > 0")
    if masks == "exact":
        en = enumerate_masks(model, x[:1], p, list(mods), max_masks=max_masks)
        return en.masks, en.probs
    if isinstance(masks, int) and not isinstance(masks, bool) and masks >= 1:
        probe = x[:1].expand(masks, *x.shape[1:])
        mk = sample_masks(model, probe, "bernoulli", p, list(mods), generator)
        return mk, torch.full((masks,), 1.0 / masks, dtype=next(iter(mk.values())).dtype)
    raise ValueError(f"masks must be 'exact' or a positive int (common random masks), got {masks!r}")


def _refuse_other_dropout(model: nn.Module, probe: Union[Tensor, tuple]) -> None:
    """``ValueError`` when ``model`` has dropout the mixture cannot average over: anything but multiplicative
    ``nn.Dropout``/``Dropout1d/2d/3d`` modules (alpha dropout's affine law, stochastic depth, attention-weight or
    functional dropout). Silently evaluating those in eval mode would give the mixture of another model."""
    from ..dropout.kinds import DROPOUT_TYPES
    from ..dropout.sites import dropout_sites

    modules = dict(model.named_modules())
    try:
        sites = dropout_sites(model, probe)
    except ValueError:  # no dropout at all: find_dropout says so in the caller's words
        return
    other = {k: s.kind for k, s in sites.items() if not isinstance(modules.get(k), DROPOUT_TYPES)}
    if other:
        raise ValueError(
            "dropout_mixture_manifold averages over multiplicative nn.Dropout/Dropout1d/2d/3d masks only; this model also has "
            + ", ".join(f"{k!r} ({kind})" for k, kind in other.items())
            + ". Pass layers=[...] naming its nn.Dropout layers to take the mixture over those alone (the others then act "
            "as in eval mode), or use dropgeom.dropout.mixture for the mixture's predictions with every kind of dropout"
        )
