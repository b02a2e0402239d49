r"""Dropout inference as a mixture of sub-models (theory.md section 4.3).

Each mask ``m`` gives a sub-model ``p_m(y|x) = softmax(eta(x; m))``. With weights
``w_m`` (mask probabilities, or ``1/S`` for ``S`` Monte Carlo draws):

.. code-block:: text

    m-mixture        p_m-mix  = sum_m w_m p_m                              (MC dropout averaging)
    e-mixture        p_e-mix ~ exp(sum_m w_m log p_m)                      (normalised geometric mean)
    alpha-mixture    p_alpha ~ (sum_m w_m p_m^{(1-alpha)/2})^{2/(1-alpha)}  (alpha=-1: m, alpha->1: e)
    weight scaling   softmax(eta(x; E m)) = softmax(eta(x; 1))             (eval mode)

Weight scaling equals the e-mixture exactly when ``eta`` is affine in the mask
(then ``sum_m w_m eta(m) = eta(E m)``). Every output family: the e-mixture of members of an
exponential family is the member at the averaged natural parameter ``sum_m w_m eta_m``; the
m-mixture has mean ``sum_m w_m mu_m`` and likelihood ``sum_m w_m p(y | eta_m)``; the
alpha-mixture is computed for categorical outputs only (elsewhere its normaliser has no closed form).
"""

from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..families import ExponentialFamily, get_family
from ._common import Inputs, as_tuple, model_inputs, check_output, chunk_for, chunked_vmap, detached_params
from .explicit import forward_with_masks
from .masks import NOISES, PSpec, _draw, enumerate_shapes, mask_spec

__all__ = ["MixtureResult", "mixture"]

KINDS = ("m", "e", "alpha", "weight_scaling")


class MixtureResult(NamedTuple):
    """Predictive distributions ``probs[kind]`` (``[n, K]``) for kinds ``m``, ``e``, ``alpha``,
    ``weight_scaling``; ``nll[kind]`` (mean) and ``accuracy[kind]`` when targets were given.

    Every family: ``mean[kind]`` holds the mean parameters (``E y``) of each predictor and
    ``eta[kind]`` the natural parameters of those in the family (``e``, ``weight_scaling``).
    For a family other than categorical ``probs`` is ``None``, the alpha-mixture is left out
    (its normaliser has no closed form) and ``accuracy`` is ``None``.
    """

    probs: Optional[Dict[str, Tensor]]
    nll: Optional[Dict[str, float]]
    accuracy: Optional[Dict[str, float]]
    alpha: float
    n_masks: int
    mean: Optional[Dict[str, Tensor]] = None
    eta: Optional[Dict[str, Tensor]] = None
    family: str = "categorical"


def mixture(
    model: nn.Module,
    inputs: Inputs,
    targets: Optional[Tensor] = None,
    alpha: float = 0.0,
    p: PSpec = None,
    n_samples: Union[int, str] = 1000,
    generator: Optional[torch.Generator] = None,
    *,
    layers: Optional[Sequence[str]] = None,
    noise: str = "bernoulli",
    max_masks: int = 2**16,
    family: Union[str, ExponentialFamily] = "categorical",
) -> MixtureResult:
    r"""m-, e-, alpha-mixture and weight-scaling predictions of a dropout network (theory.md 4.3).

    Args:
        model: a classifier returning logits ``[n, K]`` with dropout modules.
        inputs: the inputs.
        targets: optional class indices ``[n]``: adds NLL and accuracy of each predictor.
        alpha: the alpha of the alpha-mixture (``-1`` gives the m-, ``1`` the e-mixture).
        p: drop probability (default each module's ``p``).
        n_samples: Monte Carlo draws (per-sample masks) or ``"exact"`` (all Bernoulli masks).
        generator: seeds the Monte Carlo masks.
        family: the output family (default categorical); see :class:`MixtureResult` for the others.
        layers, noise: which dropout layers (every site of :func:`~dropgeom.dropout.dropout_sites`
            by default); ``"bernoulli"``, ``"gaussian"`` (MC only) or ``"dropconnect"`` masks
            (the ``nn.Linear`` layers in ``layers``, default all; ``p`` required).

    Raises:
        ValueError: bad alpha / noise / n_samples, no dropout, unknown layers, ``p`` outside
            ``[0, 1)``, too many masks for ``"exact"``, targets that do not fit.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> glm = nn.Sequential(nn.Dropout(0.3), nn.Linear(3, 4)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> res = mixture(glm, x, alpha=0.5, n_samples="exact")
        >>> torch.allclose(res.probs["e"], res.probs["weight_scaling"])  # eta affine in the mask
        True
    """
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"mixture: alpha must be a finite number, got {alpha!r}")
    if noise not in NOISES:
        raise ValueError(f"mixture: noise must be one of {NOISES}, got {noise!r}")
    fam = get_family(family)
    args = model_inputs(model, inputs)
    n = args[0].shape[0]
    spec = mask_spec(model, args, layers, p, noise)
    ps = spec.p
    names = list(spec.shapes)
    draw_noise = "gaussian" if noise == "gaussian" else "bernoulli"
    params = detached_params(model)
    with torch.no_grad():
        eta0 = forward_with_masks(model, args, {}, params)
    check_output(fam, eta0, n)
    kdim = eta0.shape[1]
    if targets is not None:
        fam.check_targets(targets, n, kdim)
    shapes = spec.shapes
    splits = [math.prod(shapes[k]) for k in names]
    if fam.log_probs(eta0[:1]) is None:  # the family is not the whole simplex on K labels
        return _general(model, args, params, fam, eta0, targets, spec, n_samples, generator, draw_noise, max_masks)

    def logp(flat: Tensor, per_sample: bool) -> Tensor:
        parts = torch.split(flat, splits, dim=-1)
        lead = n if per_sample else 1
        masks = {k: parts[i].reshape(lead, *shapes[k]) for i, k in enumerate(names)}
        return fam.log_probs(forward_with_masks(model, args, masks, params))

    a = (1.0 - alpha) / 2.0
    acc_m = acc_a = None  # running logsumexp of log w + log p (m) and log w + a log p (alpha)
    acc_e = torch.zeros_like(eta0)
    chunk = chunk_for(n, max(kdim, *splits))

    def absorb(lp: Tensor, logw: Tensor) -> None:
        nonlocal acc_m, acc_a, acc_e
        lw = logw.reshape(-1, 1, 1)
        m_part = torch.logsumexp(lw + lp, 0)
        acc_m = m_part if acc_m is None else torch.logaddexp(acc_m, m_part)
        acc_e = acc_e + (lw.exp() * lp).sum(0)
        if a != 0.0:
            a_part = torch.logsumexp(lw + a * lp, 0)
            acc_a = a_part if acc_a is None else torch.logaddexp(acc_a, a_part)

    with torch.no_grad():
        if n_samples == "exact":
            if noise == "gaussian":
                raise ValueError("mixture: n_samples='exact' enumerates Bernoulli masks only")
            enum = enumerate_shapes(shapes, ps, eta0.dtype, max_masks=max_masks)
            flat = torch.cat([enum.masks[k].reshape(enum.probs.shape[0], -1) for k in names], 1)
            total = flat.shape[0]
            for s in range(0, total, chunk):
                lp = chunked_vmap(lambda row: logp(row, False), flat[s : s + chunk], chunk)
                absorb(lp, enum.probs[s : s + chunk].log())
        else:
            if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
                raise ValueError(f"mixture: n_samples must be a positive int or 'exact', got {n_samples!r}")
            total, done = n_samples, 0
            while done < total:
                c = min(chunk, total - done)
                flat = torch.cat(
                    [_draw((c, n, splits[i]), ps[k], draw_noise, generator, eta0.dtype, eta0.device) for i, k in enumerate(names)],
                    -1,
                )
                lp = chunked_vmap(lambda block: logp(block, True), flat, c)
                absorb(lp, torch.full((c,), -math.log(total), dtype=eta0.dtype, device=eta0.device))
                done += c
        logs = {
            "m": acc_m,
            "e": fam.log_probs(acc_e),
            "weight_scaling": fam.log_probs(eta0),
        }
        logs["alpha"] = fam.log_probs(acc_a / a) if a != 0.0 else logs["e"]
        logs["m"] = logs["m"] - torch.logsumexp(logs["m"], -1, keepdim=True)  # exact weights sum to 1; guard rounding
        probs = {k: logs[k].exp() for k in KINDS}
        nll = acc = None
        if targets is not None:
            idx = targets.long().unsqueeze(-1)
            nll = {k: float(-logs[k].gather(1, idx).mean()) for k in KINDS}
            acc = {k: float((logs[k].argmax(-1) == targets).double().mean()) for k in KINDS}
    eta = {"e": acc_e, "weight_scaling": eta0}
    return MixtureResult(probs, nll, acc, float(alpha), int(total), dict(probs), eta, fam.name)


def _general(model, args, params, fam, eta0, targets, spec, n_samples, generator, draw_noise, max_masks) -> MixtureResult:
    """Every family: ``e``: ``eta_e = sum_m w_m eta_m`` (the normalised geometric mean of members of an
    exponential family is the member at the averaged natural parameter); ``m``: ``mean = sum_m w_m mu_m``
    and ``nll = -(1/n) sum_i log sum_m w_m p(y_i | eta_m)``."""
    n = eta0.shape[0]
    names = list(spec.shapes)
    splits = [math.prod(spec.shapes[k]) for k in names]

    def eta_at(flat: Tensor, lead: int) -> Tensor:
        parts = torch.split(flat, splits, dim=-1)
        masks = {k: parts[i].reshape(lead, *spec.shapes[k]) for i, k in enumerate(names)}
        return forward_with_masks(model, args, masks, params)

    acc_eta, acc_mu = torch.zeros_like(eta0), torch.zeros_like(eta0)
    acc_lp: Optional[Tensor] = None
    chunk = chunk_for(n, max(eta0.shape[1], *splits))

    def absorb(etas: Tensor, logw: Tensor) -> None:
        nonlocal acc_eta, acc_mu, acc_lp
        w = logw.exp().reshape(-1, 1, 1)
        acc_eta = acc_eta + (w * etas).sum(0)
        acc_mu = acc_mu + (w * fam.mean(etas.reshape(-1, etas.shape[-1])).reshape(etas.shape)).sum(0)
        if targets is not None:
            lp = torch.stack([-fam.nll(e, targets) for e in etas])  # [c, n]
            part = torch.logsumexp(logw.reshape(-1, 1) + lp, 0)
            acc_lp = part if acc_lp is None else torch.logaddexp(acc_lp, part)

    with torch.no_grad():
        if n_samples == "exact":
            if draw_noise == "gaussian":
                raise ValueError("mixture: n_samples='exact' enumerates Bernoulli masks only")
            enum = enumerate_shapes(spec.shapes, spec.p, eta0.dtype, max_masks=max_masks)
            flat = torch.cat([enum.masks[k].reshape(enum.probs.shape[0], -1) for k in names], 1)
            total = flat.shape[0]
            for s in range(0, total, chunk):
                absorb(chunked_vmap(lambda row: eta_at(row, 1), flat[s : s + chunk], chunk), enum.probs[s : s + chunk].log())
        else:
            if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
                raise ValueError(f"mixture: n_samples must be a positive int or 'exact', got {n_samples!r}")
            total, done = n_samples, 0
            while done < total:
                c = min(chunk, total - done)
                flat = torch.cat(
                    [_draw((c, n, splits[i]), spec.p[k], draw_noise, generator, eta0.dtype, eta0.device) for i, k in enumerate(names)],
                    -1,
                )
                absorb(chunked_vmap(lambda block: eta_at(block, n), flat, c), torch.full((c,), -math.log(total), dtype=eta0.dtype))
                done += c
        mean = {"m": acc_mu, "e": fam.mean(acc_eta), "weight_scaling": fam.mean(eta0)}
        eta = {"e": acc_eta, "weight_scaling": eta0}
        nll = None
        if targets is not None:
            nll = {"m": float(-acc_lp.mean()), "e": float(fam.nll(acc_eta, targets).mean()),
                   "weight_scaling": float(fam.nll(eta0, targets).mean())}
    return MixtureResult(None, nll, None, float("nan"), int(total), mean, eta, fam.name)
