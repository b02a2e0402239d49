r"""Exponential-family output distributions (theory.md section 1).

A network maps an input ``x_i`` to ``eta_i`` in ``R^K``, the *natural parameter*
of an exponential family for the label

.. math::  p(y \mid \eta) = h(y) \exp(\langle \eta, t(y) \rangle - A(\eta)).

Every family here is batched over a leading sample axis (``eta`` has shape
``[n, K]``), works in float32 and float64 and is numerically stable at extreme
natural parameters. Each provides

* ``log_partition(eta)``        ``A(eta)``                      shape ``[n]``
* ``mean(eta)``                 ``mu = A'(eta) = E t(y)``       shape ``[n, K]``
* ``cov_mv(eta, v)``            ``Sigma v = A''(eta) v``        shape ``[n, K]``
* ``cov_sqrt(eta)``             ``S`` with ``S S^T = Sigma``     shape ``[n, K, R]``
* ``third_cumulant(eta, u, v)`` ``A'''(eta)[u, v, .]``          shape ``[n, K]``
* ``sufficient_statistic(y)``   ``t(y)``                        shape ``[n, K]``
* ``sample(eta, generator)``    labels ``y`` in the target format
* ``nll(eta, y)``               ``-log p(y | eta)``             shape ``[n]``
* ``kl(eta, eta2)``             ``KL(p_eta || p_eta2) = A(eta2) - A(eta) - <mu, eta2 - eta>``

Target formats: class indices ``[n]`` (int64) for ``categorical``; float
tensors shaped like the outputs ``[n, K]`` for ``bernoulli``, ``gaussian`` and
``poisson``; the scalar observation ``[n]`` or ``[n, 1]`` for ``normal`` (whose
sufficient statistic is ``(y, y^2)``).

Example:
    >>> import torch
    >>> from dropgeom.families import get_family
    >>> fam = get_family("categorical")
    >>> eta = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    >>> fam.mean(eta)
    tensor([[0.5000, 0.5000]], dtype=torch.float64)
    >>> fam.cov_mv(eta, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    tensor([[ 0.2500, -0.2500]], dtype=torch.float64)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Optional, Union

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "ExponentialFamily",
    "Categorical",
    "Bernoulli",
    "Gaussian",
    "Poisson",
    "Normal",
    "get_family",
    "FAMILIES",
]


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
            raise ValueError(
                f"family 'normal' needs exactly 2 natural parameters per sample (mu/s2, -1/(2 s2)), got K={k}"
            )

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
                f"family 'normal': targets must be scalar observations with shape [n] or [n, 1] (n={n}), "
                f"got {tuple(y.shape)}"
            )
        if not torch.is_floating_point(y):
            raise ValueError(f"family 'normal': targets must be floating point, got {y.dtype}")
        if not torch.isfinite(y).all():
            raise ValueError("family 'normal': targets contain non-finite values")


FAMILIES = {
    "categorical": Categorical,
    "bernoulli": Bernoulli,
    "gaussian": Gaussian,
    "poisson": Poisson,
    "normal": Normal,
}


def get_family(family: Union[str, ExponentialFamily]) -> ExponentialFamily:
    """Return a family instance from its name (or pass an instance through).

    Names: ``categorical``, ``bernoulli``, ``gaussian`` (sigma=1; use
    ``Gaussian(sigma)`` for another), ``poisson``, ``normal``.

    Example:
        >>> get_family("poisson")
        Poisson()
    """
    if isinstance(family, ExponentialFamily):
        return family
    if isinstance(family, str) and family.lower() in FAMILIES:
        return FAMILIES[family.lower()]()
    raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)} or pass an ExponentialFamily")
