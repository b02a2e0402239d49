"""The base class of the output families (theory.md section 1): ``ExponentialFamily``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch
from torch import Tensor

__all__ = ["ExponentialFamily"]


def _bmv(mat: Tensor, vec: Tensor) -> Tensor:
    """Batched matrix-vector product ``[n, K, K] @ [n, K] -> [n, K]``."""
    return torch.einsum("nab,nb->na", mat, vec)


class ExponentialFamily(ABC):
    """One exponential family for the label given the natural parameter ``eta``.

    Subclasses implement the cumulant function ``A`` and its derivatives in
    closed form. ``rank`` is the number of columns of :meth:`cov_sqrt`.
    """

    name: str = "abstract"

    # -- shape checks -------------------------------------------------------
    def check_width(self, k: int) -> None:
        """Raise ``ValueError`` if ``k`` outputs cannot be this family's natural parameter."""
        if k < 1:
            raise ValueError(f"family {self.name!r}: output width must be >= 1, got {k}")

    def check_eta(self, eta: Tensor) -> None:
        if eta.dim() != 2:
            raise ValueError(
                f"family {self.name!r}: natural parameters must have shape [n, K], got {tuple(eta.shape)}"
            )
        self.check_width(eta.shape[1])

    def rank(self, k: int) -> int:
        """Number of columns of the covariance square root for ``k`` outputs."""
        return k

    # -- the family ---------------------------------------------------------
    @abstractmethod
    def log_partition(self, eta: Tensor) -> Tensor:
        """``A(eta)``, shape ``[n]``."""

    @abstractmethod
    def mean(self, eta: Tensor) -> Tensor:
        """Expectation parameter ``mu = A'(eta) = E[t(y)]``, shape ``[n, K]``."""

    @abstractmethod
    def cov_mv(self, eta: Tensor, v: Tensor) -> Tensor:
        """Covariance-vector product ``Sigma v = A''(eta) v`` (``v``: ``[n, K]``)."""

    @abstractmethod
    def cov_sqrt(self, eta: Tensor) -> Tensor:
        """A square root ``S`` (``[n, K, R]``) with ``S S^T = Sigma``."""

    def cov(self, eta: Tensor) -> Tensor:
        """Dense covariance ``Sigma = A''(eta)``, shape ``[n, K, K]``."""
        s = self.cov_sqrt(eta)
        return s @ s.transpose(1, 2)

    def third_cumulant(self, eta: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """Contraction ``sum_bc A'''_{abc}(eta) u_b v_c`` (shape ``[n, K]``).

        Default: the directional derivative of ``Sigma v`` along ``u`` by
        forward-mode autodiff; subclasses override with closed forms.
        """
        _, out = torch.func.jvp(lambda e: self.cov_mv(e, v), (eta,), (u,))
        return out

    @abstractmethod
    def sufficient_statistic(self, y: Tensor, k: Optional[int] = None) -> Tensor:
        """``t(y)``, shape ``[n, K]`` (``k``, the output width, is needed only by ``categorical``)."""

    @abstractmethod
    def sample(self, eta: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw one label per row of ``eta``, in the target format of this family."""

    @abstractmethod
    def nll(self, eta: Tensor, y: Tensor) -> Tensor:
        """Negative log-likelihood ``-log p(y | eta)`` including ``log h(y)``, shape ``[n]``."""

    def check_targets(self, y: Tensor, n: int, k: int) -> None:
        """Raise ``ValueError`` if ``y`` is not a valid target batch for ``n`` samples of width ``k``."""
        if not isinstance(y, Tensor):
            raise TypeError(f"targets must be a torch.Tensor, got {type(y).__name__}")
        if tuple(y.shape) != (n, k):
            raise ValueError(
                f"family {self.name!r}: targets must be float with shape [n, K] = [{n}, {k}], got {tuple(y.shape)}"
            )
        if not torch.is_floating_point(y):
            raise ValueError(f"family {self.name!r}: targets must be a floating-point tensor, got {y.dtype}")
        if not torch.isfinite(y).all():
            raise ValueError(f"family {self.name!r}: targets contain non-finite values")

    def kl(self, eta: Tensor, eta2: Tensor) -> Tensor:
        """``KL(p_eta || p_eta2) = A(eta2) - A(eta) - <mu(eta), eta2 - eta>``, shape ``[n]``."""
        return self.log_partition(eta2) - self.log_partition(eta) - (self.mean(eta) * (eta2 - eta)).sum(-1)

    def residual(self, eta: Tensor, y: Tensor) -> Tensor:
        """``mu(eta) - t(y)``: the gradient of the NLL with respect to ``eta``, shape ``[n, K]``."""
        return self.mean(eta) - self.sufficient_statistic(y, eta.shape[-1]).to(eta.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
