r"""Wei, Kakade & Ma's (2020) explicit dropout regularizer, with and without dropout's injected noise.

Wei, Kakade & Ma ("The implicit and explicit regularization effects of
dropout", ICML 2020) split dropout into an explicit regularizer and the
implicit effect of its noise. For the canonical exponential families
dropgeom uses, the Hessian of the loss in the natural parameter is the
covariance ``Sigma`` (the Fisher information), so their explicit regularizer
is the Fisher quadratic form of theory.md 4.2/4.4,
``1/2 V sum_j F^mask_jj`` with ``V = p/(1-p)``: *without* the noise it is
``FisherDropout(form="quadratic")``. :class:`WKMNoise` adds the noise: the
zero-mean term ``(L(theta; m) - L(theta; m')) / sqrt 2`` with two independent
Bernoulli mask draws ``m, m'`` per input, whose gradient has mean zero and the
covariance of a one-sample dropout gradient (our construction of "injected
dropout noise"; it leaves the objective's expectation unchanged).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(4, 2)).double()
    >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    >>> out = WKMNoise(p=0.3)(net, x, y, "categorical", torch.Generator().manual_seed(0))
    >>> sorted(out.metrics)
    ['loss', 'nll', 'noise', 'penalty']
    >>> out.loss.backward()
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from .objectives import FisherDropout, ObjectiveOutput, _dropout_api, _nll

__all__ = ["WKMNoise"]


class WKMNoise(FisherDropout):
    r"""``L_clean + weight * 1/2 V sum_j F^mask_jj + (L(theta; m) - L(theta; m'))/sqrt(2)`` (see the module docstring).

    Args:
        p: drop probability (default each dropout module's ``p``).
        weight: multiplies the explicit regularizer (1: the small-noise law).
        noise_scale: multiplies the injected noise (1: dropout's one-sample gradient noise; 0: none).

    Raises:
        ValueError: an invalid ``p``, ``weight`` or ``noise_scale``.
    """

    name = "wkm_noise"

    def __init__(
        self, p: Optional[float] = None, weight: float = 1.0, noise_scale: float = 1.0, estimator: str = "exact"
    ) -> None:
        super().__init__(p=p, form="quadratic", estimator=estimator, weight=weight)
        if (
            isinstance(noise_scale, bool)
            or not isinstance(noise_scale, (int, float))
            or not math.isfinite(noise_scale)
            or noise_scale < 0
        ):
            raise ValueError(f"noise_scale must be a finite number >= 0, got {noise_scale!r}")
        self.noise_scale = float(noise_scale)

    def compute(self, model, x, y, family, generator):  # type: ignore[no-untyped-def]
        pen, eta = self._penalty(model, x, y, family, generator)
        nll = _nll(eta, y, family)
        loss = nll + pen
        noise = torch.zeros((), dtype=nll.dtype)
        if self.noise_scale:
            sample, forward = _dropout_api("sample_masks"), _dropout_api("forward_with_masks")
            a = _nll(forward(model, x, sample(model, x, noise="bernoulli", p=self.p, generator=generator)), y, family)
            b = _nll(forward(model, x, sample(model, x, noise="bernoulli", p=self.p, generator=generator)), y, family)
            noise = self.noise_scale * (a - b) / math.sqrt(2.0)
            loss = loss + noise
        return ObjectiveOutput(loss, {"nll": float(nll.detach()), "penalty": float(pen.detach()), "noise": float(noise.detach())})

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "name": self.name, "noise_scale": self.noise_scale}
