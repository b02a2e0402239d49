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
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..families import ExponentialFamily, get_family
from ..options import Method, Noise, parse
from ._common import Inputs, model_inputs, check_output, chunk_for, chunked_vmap, detached_params
from ._legacy import TupleLike, legacy_signature, warn_deprecated
from .explicit import forward_with_masks
from .masks import MaskSpec, PSpec, _draw, enumerate_shapes, mask_spec

__all__ = ["MixtureResult", "mixture"]

KINDS = ("m", "e", "alpha", "weight_scaling")


@dataclass(frozen=True)
class MixtureResult(TupleLike):
    """Predictive distributions ``probs[kind]`` (``[n, K]``) for kinds ``m``, ``e``, ``alpha``,
    ``weight_scaling``; ``nll[kind]`` (mean) and ``accuracy[kind]`` when targets were given.

    Every family: ``mean[kind]`` holds the mean parameters (``E y``) of each predictor and
    ``eta[kind]`` the natural parameters of those in the family (``e``, ``weight_scaling``).
    For a family other than categorical ``probs`` is ``None``, the alpha-mixture is left out
    (its normaliser has no closed form) and ``accuracy`` is ``None``. Unpacking and indexing
    in field order still work, deprecated (it was a ``NamedTuple``).
    """

    probs: Optional[Dict[str, Tensor]]
    nll: Optional[Dict[str, float]]
    accuracy: Optional[Dict[str, float]]
    alpha: float
    n_masks: int
    mean: Optional[Dict[str, Tensor]] = None
    eta: Optional[Dict[str, Tensor]] = None
    family: str = "categorical"


@legacy_signature(old=("targets", "alpha", "p", "n_samples", "generator"))
def mixture(
    model: nn.Module,
    inputs: Inputs,
    targets: Optional[Tensor] = None,
    *,
    family: Union[str, ExponentialFamily] = "categorical",
    p: PSpec = None,
    layers: Optional[Sequence[str]] = None,
    noise: Union[str, Noise] = "bernoulli",
    method: Union[str, Method] = "mc",
    n_samples: int = 1000,
    generator: Optional[torch.Generator] = None,
    alpha: float = 0.0,
    max_masks: int = 2**16,
) -> MixtureResult:
    r"""m-, e-, alpha-mixture and weight-scaling predictions of a dropout network (theory.md section 4.3).

    .. math::  p_{m} = \sum_m w_m p_m, \qquad p_{e} \propto \exp\Big(\sum_m w_m \log p_m\Big), \qquad
               p_{\alpha} \propto \Big(\sum_m w_m p_m^{(1-\alpha)/2}\Big)^{2/(1-\alpha)}

    Args:
        model: a network with dropout modules returning natural parameters ``[n, K]``.
        inputs: the inputs.
        targets: optional labels in the family's format: adds the NLL (and, for classes, the
            accuracy) of each predictor.
        family: the output family (default categorical); see :class:`MixtureResult` for the others.
        p: drop probability (default each module's ``p``).
        layers, noise: which dropout layers (every site of :func:`~dropgeom.dropout.dropout_sites`
            by default); ``"bernoulli"``, ``"gaussian"`` (MC only) or ``"dropconnect"`` masks
            (the ``nn.Linear`` layers in ``layers``, default all; ``p`` required).
        method: ``"mc"`` (``n_samples`` per-sample mask draws, seeded by ``generator``) or
            ``"exact"`` (all Bernoulli masks, at most ``max_masks``). The old spelling
            ``n_samples="exact"`` still works, deprecated.
        alpha: the alpha of the alpha-mixture (``-1`` gives the m-, ``1`` the e-mixture).

    Returns: :class:`MixtureResult`.

    Raises:
        ValueError: bad alpha / noise / method / n_samples, no dropout, unknown layers, ``p``
            outside ``[0, 1)``, too many masks for ``"exact"``, targets that do not fit.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> glm = nn.Sequential(nn.Dropout(0.3), nn.Linear(3, 4)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> res = mixture(glm, x, alpha=0.5, method="exact")
        >>> torch.allclose(res.probs["e"], res.probs["weight_scaling"])  # eta affine in the mask
        True
    """
    if isinstance(n_samples, str) and n_samples == "exact":
        warn_deprecated("mixture(): n_samples='exact' is now method='exact'")
        method = "exact"
    method = parse(Method, method, "method")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"mixture: alpha must be a finite number, got {alpha!r}")
    noise = parse(Noise, noise, where="mixture").value
    if method is Method.EXACT and noise == "gaussian":
        raise ValueError("mixture: method='exact' enumerates Bernoulli masks only")
    if method is Method.MC and (not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1):
        raise ValueError(f"mixture: n_samples must be a positive int for method='mc', got {n_samples!r}")
    fam = get_family(family)
    args = model_inputs(model, inputs)
    n = args[0].shape[0]
    spec = mask_spec(model, args, layers, p, noise)
    draw_noise = "gaussian" if noise == "gaussian" else "bernoulli"
    params = detached_params(model)
    with torch.no_grad():
        eta0 = forward_with_masks(model, args, {}, params)
    check_output(fam, eta0, n)
    if targets is not None:
        fam.check_targets(targets, n, eta0.shape[1])
    draws = _Draws(spec, method is Method.EXACT, n_samples, generator, draw_noise, max_masks)
    if fam.log_probs(eta0[:1]) is None:  # the family is not the whole simplex on K labels
        return _general(model, args, params, fam, eta0, targets, spec, draws)
    return _simplex(model, args, params, fam, eta0, targets, spec, draws, float(alpha))


@dataclass(frozen=True)
class _Draws:
    """How the masks are obtained: enumerated (``exact``) or ``n_samples`` per-sample draws."""

    spec: MaskSpec
    exact: bool
    n_samples: int
    generator: Optional[torch.Generator]
    noise: str
    max_masks: int

    def blocks(self, eta0: Tensor, chunk: int) -> Iterator[Tuple[Tensor, Tensor, bool]]:
        """``(flat masks [c, lead, U_total], log weights [c], per_sample)`` chunk by chunk."""
        names = list(self.spec.shapes)
        n = eta0.shape[0]
        if self.exact:
            enum = enumerate_shapes(self.spec.shapes, self.spec.p, eta0.dtype, max_masks=self.max_masks)
            flat = torch.cat([enum.masks[k].reshape(enum.probs.shape[0], -1) for k in names], 1)
            for s in range(0, flat.shape[0], chunk):
                yield flat[s : s + chunk], enum.probs[s : s + chunk].log(), False
            return
        splits = [math.prod(self.spec.shapes[k]) for k in names]
        total, done = self.n_samples, 0
        while done < total:
            c = min(chunk, total - done)
            flat = torch.cat(
                [
                    _draw((c, n, splits[i]), self.spec.p[k], self.noise, self.generator, eta0.dtype, eta0.device)
                    for i, k in enumerate(names)
                ],
                -1,
            )
            yield flat, torch.full((c,), -math.log(total), dtype=eta0.dtype, device=eta0.device), True
            done += c


def _simplex(model, args, params, fam, eta0, targets, spec, draws, alpha) -> MixtureResult:  # type: ignore[no-untyped-def]
    """The categorical path: every mixture of members is a member, so the m-, e- and alpha-mixtures
    are all computed on log-probabilities (running log-sum-exps over the masks)."""
    n, kdim = eta0.shape
    names = list(spec.shapes)
    splits = [math.prod(spec.shapes[k]) for k in names]

    def logp(flat: Tensor, per_sample: bool) -> Tensor:
        parts = torch.split(flat, splits, dim=-1)
        lead = n if per_sample else 1
        masks = {k: parts[i].reshape(lead, *spec.shapes[k]) for i, k in enumerate(names)}
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
        total = 0
        for flat, logw, per_sample in draws.blocks(eta0, chunk):
            absorb(chunked_vmap(lambda row: logp(row, per_sample), flat, chunk if not per_sample else flat.shape[0]), logw)
            total += flat.shape[0]
        logs = {"m": acc_m, "e": fam.log_probs(acc_e), "weight_scaling": fam.log_probs(eta0)}
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


def _general(model, args, params, fam, eta0, targets, spec, draws) -> MixtureResult:  # type: ignore[no-untyped-def]
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
        total = 0
        for flat, logw, per_sample in draws.blocks(eta0, chunk):
            lead = n if per_sample else 1
            absorb(chunked_vmap(lambda row: eta_at(row, lead), flat, chunk if not per_sample else flat.shape[0]), logw)
            total += flat.shape[0]
        mean = {"m": acc_mu, "e": fam.mean(acc_eta), "weight_scaling": fam.mean(eta0)}
        eta = {"e": acc_eta, "weight_scaling": eta0}
        nll = None
        if targets is not None:
            nll = {
                "m": float(-acc_lp.mean()),
                "e": float(fam.nll(acc_eta, targets).mean()),
                "weight_scaling": float(fam.nll(eta0, targets).mean()),
            }
    return MixtureResult(None, nll, None, float("nan"), int(total), mean, eta, fam.name)
