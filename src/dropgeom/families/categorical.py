"""The categorical family: one of ``K`` classes with logits ``eta`` (theory.md section 1)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from .base import ExponentialFamily

__all__ = ["Categorical"]


class Categorical(ExponentialFamily):
    """Categorical label with logits ``eta`` (``K >= 2``); ``A = logsumexp``.

    ``mu = softmax(eta)``, ``Sigma = diag(p) - p p^T`` (rank ``K - 1``), and the
    symmetric square root ``S = diag(sqrt p) - p sqrt(p)^T``.
    """

    name = "categorical"

    def check_width(self, k: int) -> None:
        if k < 2:
            raise ValueError(f"family 'categorical' needs at least 2 logits per sample, got K={k}")

    def log_partition(self, eta: Tensor) -> Tensor:
        return torch.logsumexp(eta, dim=-1)

    def mean(self, eta: Tensor) -> Tensor:
        return torch.softmax(eta, dim=-1)

    def cov_mv(self, eta: Tensor, v: Tensor) -> Tensor:
        p = torch.softmax(eta, dim=-1)
        return p * v - p * (p * v).sum(-1, keepdim=True)

    def cov_sqrt(self, eta: Tensor) -> Tensor:
        p = torch.softmax(eta, dim=-1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)

    def third_cumulant(self, eta: Tensor, u: Tensor, v: Tensor) -> Tensor:
        # d/d eta [u] of (p*v - p <p, v>) with dp = Sigma u.
        p = torch.softmax(eta, dim=-1)
        dp = p * u - p * (p * u).sum(-1, keepdim=True)
        return dp * v - dp * (p * v).sum(-1, keepdim=True) - p * (dp * v).sum(-1, keepdim=True)

    def kl(self, eta: Tensor, eta2: Tensor) -> Tensor:
        """``sum_c p_c (log p_c - q_c)`` from log-softmax: the generic
        ``A(eta2) - A(eta) - <mu, eta2 - eta>`` cancels catastrophically at large logits."""
        lp, lq = torch.log_softmax(eta, dim=-1), torch.log_softmax(eta2, dim=-1)
        return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)

    def sufficient_statistic(self, y: Tensor, k: Optional[int] = None) -> Tensor:
        if torch.is_floating_point(y):
            raise ValueError("family 'categorical': targets must be integer class indices")
        if k is None:
            raise ValueError("family 'categorical': sufficient_statistic(y, k) needs the number of classes k")
        return F.one_hot(y.long(), k).to(torch.get_default_dtype())

    def sample(self, eta: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        p = torch.softmax(eta.detach(), dim=-1)
        return torch.multinomial(p, 1, generator=generator).squeeze(-1)

    def nll(self, eta: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(eta, y.long(), reduction="none")

    def check_targets(self, y: Tensor, n: int, k: int) -> None:
        if not isinstance(y, Tensor):
            raise TypeError(f"targets must be a torch.Tensor, got {type(y).__name__}")
        if tuple(y.shape) != (n,):
            raise ValueError(
                f"family 'categorical': targets must be class indices with shape [n] = [{n}], got {tuple(y.shape)}"
            )
        if torch.is_floating_point(y) or y.dtype == torch.bool:
            raise ValueError(f"family 'categorical': targets must be integer class indices, got {y.dtype}")
        if n and (int(y.min()) < 0 or int(y.max()) >= k):
            raise ValueError(
                f"family 'categorical': class indices must lie in [0, {k - 1}], got range "
                f"[{int(y.min())}, {int(y.max())}]"
            )
