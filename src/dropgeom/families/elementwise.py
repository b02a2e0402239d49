"""Families that factorise over the ``K`` outputs: Bernoulli, Gaussian, Poisson (theory.md section 1)."""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from .base import ExponentialFamily

__all__ = ["Bernoulli", "Gaussian", "Poisson"]


class _Elementwise(ExponentialFamily):
    """Families that factorise over the ``K`` outputs (independent coordinates)."""

    def cov_sqrt(self, eta: Tensor) -> Tensor:
        return torch.diag_embed(self._var(eta).sqrt())

    def cov(self, eta: Tensor) -> Tensor:
        return torch.diag_embed(self._var(eta))

    def cov_mv(self, eta: Tensor, v: Tensor) -> Tensor:
        return self._var(eta) * v

    def third_cumulant(self, eta: Tensor, u: Tensor, v: Tensor) -> Tensor:
        return self._skew(eta) * u * v

    def sufficient_statistic(self, y: Tensor, k: Optional[int] = None) -> Tensor:
        return y

    @abstractmethod
    def _var(self, eta: Tensor) -> Tensor: ...

    @abstractmethod
    def _skew(self, eta: Tensor) -> Tensor: ...


class Bernoulli(_Elementwise):
    """Binary labels in {0, 1} with logit ``eta``; ``A = log(1 + e^eta)`` (softplus).

    ``mu = sigmoid(eta)``, ``Sigma = s(1-s)``, third cumulant ``s(1-s)(1-2s)``.
    ``K > 1`` outputs are independent binary labels (multi-label).
    """

    name = "bernoulli"

    def log_partition(self, eta: Tensor) -> Tensor:
        return F.softplus(eta).sum(-1)

    def mean(self, eta: Tensor) -> Tensor:
        return torch.sigmoid(eta)

    def _var(self, eta: Tensor) -> Tensor:
        s = torch.sigmoid(eta)
        return s * torch.sigmoid(-eta)

    def _skew(self, eta: Tensor) -> Tensor:
        s = torch.sigmoid(eta)
        return s * torch.sigmoid(-eta) * (1 - 2 * s)

    def sample(self, eta: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(eta.detach()), generator=generator)

    def nll(self, eta: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(eta, y.to(eta.dtype), reduction="none").sum(-1)

    def kl(self, eta: Tensor, eta2: Tensor) -> Tensor:
        """``s (log s - log s') + (1-s) (log(1-s) - log(1-s'))`` from log-sigmoids (no
        cancellation at large logits), summed over the ``K`` independent labels."""
        ls = F.logsigmoid
        s = torch.sigmoid(eta)
        kl = s * (ls(eta) - ls(eta2)) + torch.sigmoid(-eta) * (ls(-eta) - ls(-eta2))
        return kl.clamp_min(0).sum(-1)

    def m_mixture_eta(self, etas: Tensor, logw: Tensor) -> Tensor:
        r"""The log-odds of each label's mixture probability ``sum_m w_m sigmoid(eta_m)`` (theory.md section 6).

        .. math::  \eta_{mix} = \log \sum_m w_m \sigma(\eta_m) - \log \sum_m w_m \sigma(-\eta_m)

        (per label: for ``K > 1`` the marginals of the mixture).
        """
        lw = logw.reshape(-1, 1, 1)
        return torch.logsumexp(lw + F.logsigmoid(etas), 0) - torch.logsumexp(lw + F.logsigmoid(-etas), 0)

    def class_probs(self, eta: Tensor, y: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        r"""One output: ``([1 - s, s], round(y))`` with ``s = sigmoid(eta)``; ``None`` for multi-label (theory.md section 1).

        .. math::  p(1 \mid \eta) = \sigma(\eta)
        """
        if eta.shape[1] != 1:
            return None
        s = torch.sigmoid(eta[:, 0])
        return torch.stack([1 - s, s], dim=-1), y.reshape(-1).round().long()

    def check_targets(self, y: Tensor, n: int, k: int) -> None:
        super().check_targets(y, n, k)
        if ((y < 0) | (y > 1)).any():
            raise ValueError("family 'bernoulli': targets must lie in [0, 1] (labels 0/1 or soft labels)")


class Gaussian(_Elementwise):
    """Gaussian label with known ``sigma`` (default 1); ``eta = mu / sigma^2``.

    ``A = sigma^2 eta^2 / 2``, ``mu = sigma^2 eta``, ``Sigma = sigma^2``, third
    cumulant 0. The NLL is ``(y - mu)^2 / (2 sigma^2) + log(2 pi sigma^2) / 2``.
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0) -> None:
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"family 'gaussian': sigma must be a positive finite number, got {sigma!r}")
        self.sigma = float(sigma)

    def log_partition(self, eta: Tensor) -> Tensor:
        return 0.5 * self.sigma**2 * (eta**2).sum(-1)

    def mean(self, eta: Tensor) -> Tensor:
        return self.sigma**2 * eta

    def _var(self, eta: Tensor) -> Tensor:
        return torch.full_like(eta, self.sigma**2)

    def _skew(self, eta: Tensor) -> Tensor:
        return torch.zeros_like(eta)

    def sample(self, eta: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        eta = eta.detach()
        noise = torch.randn(eta.shape, generator=generator, dtype=eta.dtype, device=eta.device)
        return self.mean(eta) + self.sigma * noise

    def kl(self, eta: Tensor, eta2: Tensor) -> Tensor:
        """``sigma^2 |eta2 - eta|^2 / 2`` (closed form)."""
        return 0.5 * self.sigma**2 * ((eta2 - eta) ** 2).sum(-1)

    def nll(self, eta: Tensor, y: Tensor) -> Tensor:
        mu = self.mean(eta)
        s2 = self.sigma**2
        return (0.5 * (y - mu) ** 2 / s2 + 0.5 * math.log(2 * math.pi * s2)).sum(-1)

    def __repr__(self) -> str:
        return f"Gaussian(sigma={self.sigma})"


class Poisson(_Elementwise):
    """Count labels with log rate ``eta``; ``A = e^eta``; all cumulants equal ``e^eta``."""

    name = "poisson"

    def log_partition(self, eta: Tensor) -> Tensor:
        return eta.exp().sum(-1)

    def mean(self, eta: Tensor) -> Tensor:
        return eta.exp()

    def _var(self, eta: Tensor) -> Tensor:
        return eta.exp()

    def _skew(self, eta: Tensor) -> Tensor:
        return eta.exp()

    def sample(self, eta: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return torch.poisson(eta.detach().exp(), generator=generator)

    def nll(self, eta: Tensor, y: Tensor) -> Tensor:
        y = y.to(eta.dtype)
        return (eta.exp() - eta * y + torch.lgamma(y + 1)).sum(-1)

    def kl(self, eta: Tensor, eta2: Tensor) -> Tensor:
        """``e^eta (e^d - 1 - d)`` with ``d = eta2 - eta`` (expm1: less cancellation than the generic form)."""
        d = eta2 - eta
        return (eta.exp() * (torch.expm1(d) - d)).clamp_min(0).sum(-1)

    def check_targets(self, y: Tensor, n: int, k: int) -> None:
        super().check_targets(y, n, k)
        if (y < 0).any():
            raise ValueError("family 'poisson': targets must be non-negative counts")
        if (y != y.round()).any():
            raise ValueError("family 'poisson': targets must be integer counts (stored as floats)")
