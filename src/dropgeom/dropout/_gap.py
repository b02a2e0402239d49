r"""The dropout gap ``R = L_drop - L_clean`` (theory.md section 4).

``L_drop(theta) = (1/n) sum_i E_m l(y_i, f(x_i; theta, m))`` and
``L_clean = (1/n) sum_i l(y_i, f(x_i; theta))`` (eval mode, ``m = 1``).
``exact`` enumerates every Bernoulli mask of the chosen layers (small layers
only); ``mc`` averages ``n_samples`` independent per-sample mask draws and
reports the standard error of the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..families import ExponentialFamily
from ..options import Method, Noise, parse
from ._common import Inputs, model_inputs, check_output, chunk_for, chunked_vmap, detached_params, family_of
from ._legacy import TupleLike, legacy_signature
from .explicit import forward_with_masks
from .masks import MaskSpec, PSpec, _draw, enumerate_shapes, mask_spec

__all__ = ["GapResult", "gap"]

LossAt = Callable[[Dict[str, Tensor]], Tensor]


@dataclass(frozen=True)
class GapResult(TupleLike):
    """Result of :func:`gap`. ``value = dropout_loss - clean_loss``; ``stderr`` is 0 for ``exact``.

    Unpacking and indexing in field order still work, deprecated (it was a ``NamedTuple``).
    """

    dropout_loss: float
    clean_loss: float
    value: float
    stderr: float
    method: str
    noise: str
    n_masks: int
    p: Dict[str, float]


@legacy_signature(old=("targets", "family", "p", "noise", "method", "n_samples", "generator", "layers"))
def gap(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    *,
    family: Union[str, ExponentialFamily] = "categorical",
    p: PSpec = None,
    layers: Optional[Sequence[str]] = None,
    noise: Union[str, Noise] = "bernoulli",
    method: Union[str, Method] = "exact",
    n_samples: int = 1000,
    generator: Optional[torch.Generator] = None,
    antithetic: bool = False,
    max_masks: int = 2**16,
) -> GapResult:
    r"""The dropout regularizer ``R = L_drop - L_clean`` (mean over inputs; theory.md section 4).

    .. math::  R = \frac1n \sum_i \big(\mathbb{E}_m\, \ell(y_i, f(x_i; \theta, m)) - \ell(y_i, f(x_i; \theta))\big)

    Args:
        model, inputs, targets: the model, its inputs, labels in the family's format (required).
        family: the output family.
        p: drop probability (default: each module's ``p``; a float or a dict per layer).
        layers: restrict dropout to these layers (the others stay in eval mode). Every dropout
            site counts (:func:`~dropgeom.dropout.dropout_sites`): dropout modules of every kind,
            attention-weight dropout, ``F.dropout`` in a custom ``forward``, stochastic depth.
        noise: ``"bernoulli"`` (inverted dropout), ``"gaussian"`` (``m ~ N(1, p/(1-p))``) or
            ``"dropconnect"`` (Bernoulli masks on the weights of the ``nn.Linear`` layers named in
            ``layers``, default all; ``p`` required).
        method: ``"exact"`` (enumerate all ``2^U`` Bernoulli masks; refuses above
            ``max_masks``) or ``"mc"`` (``n_samples`` per-sample mask draws).
        n_samples, generator: the number of Monte Carlo draws and their seed (``"mc"``).
        antithetic: ``mc`` with Gaussian noise only: draw pairs ``1 +/- eps``, which cancels the
            first-order noise (a much smaller standard error for small variances); ``n_samples`` counts pairs.
        max_masks: the most masks ``"exact"`` enumerates.

    Returns:
        :class:`GapResult` (``value``, ``stderr``, the two losses, ``n_masks``, ``p``).

    Raises:
        ValueError: bad noise / method / n_samples, no dropout, unknown or never-run layers,
            ``p`` outside ``[0, 1)``, too many masks for ``exact``, targets that do not fit.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Dropout(0.2), nn.Linear(3, 2)).double()
        >>> x, y = torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> r = gap(net, x, y, method="exact")
        >>> r.n_masks, abs(r.value - (r.dropout_loss - r.clean_loss)) < 1e-15, r.stderr
        (8, True, 0.0)
    """
    fam = family_of(family)
    args = model_inputs(model, inputs)
    n = args[0].shape[0]
    noise = parse(Noise, noise, where="gap").value
    method = parse(Method, method, where="gap").value
    spec = mask_spec(model, args, layers, p, noise)
    params = detached_params(model)
    with torch.no_grad():
        eta0 = forward_with_masks(model, args, {}, params)
        check_output(fam, eta0, n)
        fam.check_targets(targets, n, eta0.shape[1])
        clean = float(fam.nll(eta0, targets).mean())

    def loss_at(masks: Dict[str, Tensor]) -> Tensor:
        return fam.nll(forward_with_masks(model, args, masks, params), targets).mean()

    with torch.no_grad():
        if method == "exact":
            if noise == "gaussian":
                raise ValueError("gap: method='exact' enumerates Bernoulli masks only; use method='mc' for gaussian noise")
            drop, count = _exact(loss_at, spec, eta0, n, max_masks)
            return GapResult(drop, clean, drop - clean, 0.0, "exact", noise, count, spec.p)
        return _gap_mc(loss_at, spec, eta0, clean, noise, n_samples, generator, antithetic)


def _gap_mc(
    loss_at: LossAt,
    spec: MaskSpec,
    eta0: Tensor,
    clean: float,
    noise: str,
    n_samples: int,
    generator: Optional[torch.Generator],
    antithetic: bool,
) -> GapResult:
    """The Monte Carlo gap: mean and standard error over ``n_samples`` per-sample mask draws."""
    if not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"gap: n_samples must be an int >= 2 for method='mc', got {n_samples!r}")
    if antithetic and noise != "gaussian":
        raise ValueError("gap: antithetic=True needs noise='gaussian' (1 +/- eps pairs)")
    draw_noise = "gaussian" if noise == "gaussian" else "bernoulli"
    losses = _sampled(loss_at, spec, eta0, eta0.shape[0], n_samples, draw_noise, generator, antithetic)
    drop = float(losses.mean())
    err = float(losses.std(unbiased=True) / math.sqrt(losses.shape[0]))
    # value = drop - clean computed per draw keeps full precision for tiny gaps
    value = float((losses - clean).mean())
    return GapResult(drop, clean, value, err, "mc", noise, int(losses.shape[0]), spec.p)


def _width(spec: MaskSpec, eta0: Tensor) -> int:
    return max(int(eta0.shape[1]), *(math.prod(s) for s in spec.shapes.values()))


def _exact(loss_at: LossAt, spec: MaskSpec, eta0: Tensor, n: int, max_masks: int) -> Tuple[float, int]:
    """``(sum_m P(m) L(m), number of masks)`` over every Bernoulli mask, vmapped in chunks."""
    names, shapes = list(spec.shapes), spec.shapes
    enum = enumerate_shapes(shapes, spec.p, eta0.dtype, max_masks=max_masks)
    flat = torch.cat([enum.masks[k].reshape(enum.probs.shape[0], -1) for k in names], 1)
    splits = [math.prod(shapes[k]) for k in names]

    def one(row: Tensor) -> Tensor:
        parts = torch.split(row, splits)
        return loss_at({k: parts[i].reshape(1, *shapes[k]) for i, k in enumerate(names)})

    losses = chunked_vmap(one, flat, chunk_for(n, _width(spec, eta0)))
    return float((enum.probs * losses).sum()), int(enum.probs.shape[0])


def _sampled(
    loss_at: LossAt,
    spec: MaskSpec,
    eta0: Tensor,
    n: int,
    n_samples: int,
    draw_noise: str,
    generator: Optional[torch.Generator],
    antithetic: bool,
) -> Tensor:
    """The losses at ``n_samples`` per-sample mask draws (antithetic: the mean of each ``1 +/- eps`` pair)."""
    names, shapes, ps = list(spec.shapes), spec.shapes, spec.p
    chunk = chunk_for(n, _width(spec, eta0))
    splits = [math.prod(shapes[k]) for k in names]
    draws: List[Tensor] = []
    done = 0
    while done < n_samples:
        c = min(chunk, n_samples - done)
        cols = [_draw((c, n, splits[i]), ps[k], draw_noise, generator, eta0.dtype, eta0.device) for i, k in enumerate(names)]
        flat = torch.cat(cols, -1)

        def one(block: Tensor) -> Tensor:
            parts = torch.split(block, splits, dim=-1)
            return loss_at({k: parts[i].reshape(n, *shapes[k]) for i, k in enumerate(names)})

        if antithetic:
            mirrored = 2.0 - flat
            draws.append(0.5 * (chunked_vmap(one, flat, c) + chunked_vmap(one, mirrored, c)))
        else:
            draws.append(chunked_vmap(one, flat, c))
        done += c
    return torch.cat(draws)
