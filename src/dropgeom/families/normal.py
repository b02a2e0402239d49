"""The normal family with unknown mean and variance (theory.md section 1)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .base import ExponentialFamily, _bmv

__all__ = ["Normal"]


class Normal(ExponentialFamily):
    r"""Normal label with unknown mean and variance (heteroscedastic regression).

    Natural parameters ``eta = (mu / s2, -1 / (2 s2))`` (``eta_2 < 0``), sufficient
    statistic ``t(y) = (y, y^2)``,
    ``A = -eta_1^2 / (4 eta_2) - log(-2 eta_2) / 2``,
    ``E t = (mu, mu^2 + s2)`` and
    ``Sigma = [[s2, 2 mu s2], [2 mu s2, 4 mu^2 s2 + 2 s2^2]]``.
    Targets are the scalar observations, shape ``[n]`` or ``[n, 1]``.
    """

    name = "normal"

    def check_width(self, k: int) -> None:
        if k != 2:
            raise ValueError(f"family 'normal' needs exactly 2 natural parameters per sample (mu/s2, -1/(2 s2)), got K={k}")

    def check_eta(self, eta: Tensor) -> None:
        super().check_eta(eta)
        if (eta[:, 1] >= 0).any():
            raise ValueError("family 'normal': the second natural parameter -1/(2 s2) must be negative")

    @staticmethod
    def _moments(eta: Tensor) -> tuple[Tensor, Tensor]:
        s2 = -0.5 / eta[:, 1]
        mu = eta[:, 0] * s2
        return mu, s2

    def log_partition(self, eta: Tensor) -> Tensor:
        e1, e2 = eta[:, 0], eta[:, 1]
        return -(e1**2) / (4 * e2) - 0.5 * torch.log(-2 * e2)

    def mean(self, eta: Tensor) -> Tensor:
        mu, s2 = self._moments(eta)
        return torch.stack([mu, mu**2 + s2], dim=-1)

    def cov(self, eta: Tensor) -> Tensor:
        mu, s2 = self._moments(eta)
        c01 = 2 * mu * s2
        row0 = torch.stack([s2, c01], -1)
        row1 = torch.stack([c01, 4 * mu**2 * s2 + 2 * s2**2], -1)
        return torch.stack([row0, row1], -2)

    def cov_mv(self, eta: Tensor, v: Tensor) -> Tensor:
        return _bmv(self.cov(eta), v)

    def cov_sqrt(self, eta: Tensor) -> Tensor:
        # Closed-form Cholesky factor: Sigma = L L^T with
        # L = [[s, 0], [2 mu s, sqrt(2) s2]] and s = sqrt(s2).
        mu, s2 = self._moments(eta)
        s = s2.sqrt()
        zero = torch.zeros_like(s)
        row0 = torch.stack([s, zero], -1)
        row1 = torch.stack([2 * mu * s, math.sqrt(2.0) * s2], -1)
        return torch.stack([row0, row1], -2)

    def _y(self, y: Tensor) -> Tensor:
        return y.reshape(-1)

    def sufficient_statistic(self, y: Tensor, k: Optional[int] = None) -> Tensor:
        y = self._y(y)
        return torch.stack([y, y**2], dim=-1)

    def sample(self, eta: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        mu, s2 = self._moments(eta.detach())
        noise = torch.randn(mu.shape, generator=generator, dtype=eta.dtype, device=eta.device)
        return mu + s2.sqrt() * noise

    def nll(self, eta: Tensor, y: Tensor) -> Tensor:
        y = self._y(y).to(eta.dtype)
        return self.log_partition(eta) - eta[:, 0] * y - eta[:, 1] * y**2 + 0.5 * math.log(2 * math.pi)

    def check_targets(self, y: Tensor, n: int, k: int) -> None:
        if not isinstance(y, Tensor):
            raise TypeError(f"targets must be a torch.Tensor, got {type(y).__name__}")
        if tuple(y.shape) not in ((n,), (n, 1)):
            raise ValueError(
                f"family 'normal': targets must be scalar observations with shape [n] or [n, 1] (n={n}), got {tuple(y.shape)}"
            )
        if not torch.is_floating_point(y):
            raise ValueError(f"family 'normal': targets must be floating point, got {y.dtype}")
        if not torch.isfinite(y).all():
            raise ValueError("family 'normal': targets contain non-finite values")
