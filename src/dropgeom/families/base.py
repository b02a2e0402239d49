"""The base class of the output families (theory.md section 1): ``ExponentialFamily``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Tuple

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
            raise ValueError(f"family {self.name!r}: natural parameters must have shape [n, K], got {tuple(eta.shape)}")
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
            raise ValueError(f"family {self.name!r}: targets must be float with shape [n, K] = [{n}, {k}], got {tuple(y.shape)}")
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

    # -- building blocks of the Fisher and dropout code ----------------------
    # Defaults work for every family; a family overrides them with a closed form
    # (BackPACK keeps such code on its loss classes, e.g. ``_sqrt_hessian``).
    def reduced_cov_sqrt(self, eta: Tensor) -> Tensor:
        r"""A square root of ``Sigma`` with as few columns as the family allows (theory.md section 2).

        .. math::  S S^\top = \Sigma(\eta) = A''(\eta), \qquad S \in \mathbb{R}^{n \times K \times R}

        The exact Fisher ``(1/n) sum_i J_i^T S_i S_i^T J_i`` costs ``R`` products per
        sample, so fewer columns are cheaper. Default: :meth:`cov_sqrt` (``R = K``);
        ``categorical`` returns ``K - 1`` columns (``Sigma`` has rank ``K - 1``).

        Example:
            >>> import torch
            >>> from dropgeom.families import get_family
            >>> eta = torch.randn(4, 3, dtype=torch.float64)
            >>> s = get_family("categorical").reduced_cov_sqrt(eta)
            >>> s.shape, torch.allclose(s @ s.transpose(1, 2), get_family("categorical").cov(eta))
            (torch.Size([4, 3, 2]), True)
        """
        return self.cov_sqrt(eta)

    def cov_sqrt_with_mean(self, eta: Tensor, mean: Tensor) -> Tensor:
        r""":meth:`cov_sqrt` (``S S^T = Sigma``, theory.md section 1), reusing ``mean = mu(eta)``.

        .. math::  S S^\top = \Sigma(\eta)

        For callers that already hold the mean parameter (the penalty shares one
        softmax among its helpers). Default: ``cov_sqrt(eta)``, ``mean`` unused.
        """
        return self.cov_sqrt(eta)

    def column_cov_norms(self, eta: Tensor, w: Tensor, h: Tensor, mean: Optional[Tensor] = None) -> Tensor:
        r"""``h_ij^2 (W^T Sigma_i W)_jj``, shape ``[n, U]``, for ``W`` ``[K, U]`` and ``h`` ``[n, U]``.

        .. math::  N_{ij} = h_{ij}^2\, W_{:j}^\top \Sigma(\eta_i)\, W_{:j}

        The Fisher information ``F^mask_jj`` of the mask of a dropout layer right
        before the output Linear ``W`` (``d_j eta_i = h_ij W[:, j]``; theory.md
        section 4.4). Default: through ``Sigma^{1/2}``, ``O(n R U K)``; ``mean``:
        ``mu(eta)`` if at hand (used by ``categorical``).
        """
        sw = torch.einsum("nkr,kj->nrj", self.cov_sqrt(eta), w)
        return (h.unsqueeze(1) * sw).pow(2).sum(1)

    def kl_to_shifted(self, eta: Tensor, w: Tensor, h: Tensor, mean: Optional[Tensor] = None) -> Tensor:
        r"""``KL(p(.|eta_i) || p(.|eta_i - h_ij W[:, j]))`` for every column ``j``, shape ``[n, U]``.

        .. math::  K_{ij} = \mathrm{KL}\big(p_{\eta_i} \,\|\, p_{\eta_i - h_{ij} W_{:j}}\big)

        The divergence term ``K_j`` of theory.md section 4.2 for a dropout layer right
        before the output Linear ``W`` (dropping unit ``j`` shifts ``eta_i`` by
        ``-h_ij W[:, j]``; theory.md section 4.4). Default: :meth:`kl` on the shifted
        parameters; ``mean``: ``mu(eta)`` if at hand (used by ``categorical``).
        """
        n, kdim = eta.shape
        u = h.shape[1]
        dropped = eta.unsqueeze(1) - h.unsqueeze(-1) * w.t().unsqueeze(0)  # [n, U, K]
        return self.kl(eta.unsqueeze(1).expand(n, u, kdim).reshape(-1, kdim), dropped.reshape(-1, kdim)).reshape(n, u)

    def kl_shift(self, eta: Tensor, shift: Tensor, mean: Optional[Tensor] = None) -> Tensor:
        r"""``KL(p(.|eta_i) || p(.|eta_i + shift[i, :, u]))`` for ``eta`` ``[n, K]`` and ``shift`` ``[n, K, U]``: ``[n, U]``.

        .. math::  K_{iu} = \mathrm{KL}\big(p_{\eta_i} \,\|\, p_{\eta_i + \delta_{iu}}\big)

        The divergence terms of ``U`` perturbed models given by their shifts ``delta`` (the ``K`` axis second,
        the layout in which the exact divergence form builds them: theory.md section 4.2), without forming the
        shifted parameters when the family need not (``categorical``). Default: :meth:`kl_to_each` on
        ``eta + shift``; ``mean``: ``mu(eta)`` if at hand.
        """
        others = (eta.unsqueeze(-1) + shift).permute(2, 0, 1)  # [U, n, K]
        return self.kl_to_each(eta, others, mean).t()

    def kl_to_each(self, eta: Tensor, others: Tensor, mean: Optional[Tensor] = None) -> Tensor:
        r"""``KL(p(.|eta_i) || p(.|others[..., i, :]))`` for ``eta`` ``[n, K]`` and ``others`` ``[..., n, K]``.

        .. math::  \mathrm{KL}(p_\eta \,\|\, p_{\eta'}) = A(\eta') - A(\eta) - \langle \mu(\eta), \eta' - \eta \rangle

        Shape ``[...]`` + ``[n]``: the divergence terms of many dropped sub-models at
        once (theory.md section 4.2). Default: :meth:`kl` on the flattened batch;
        ``mean``: ``mu(eta)`` if at hand (used by ``categorical``).
        """
        kdim = eta.shape[-1]
        flat = self.kl(eta.expand_as(others).reshape(-1, kdim), others.reshape(-1, kdim))
        return flat.reshape(others.shape[:-1])

    def log_probs(self, eta: Tensor) -> Optional[Tensor]:
        r"""``log p(y = c | eta)`` for the ``K`` labels ``c`` (``[n, K]``), or ``None``.

        .. math::  \log p(c \mid \eta) = \eta_c - A(\eta)

        Not ``None`` only for a family whose natural parameter is the vector of
        log-probabilities up to a constant (``categorical``): that family holds every
        distribution on ``K`` labels, so every mixture of members, and every
        normalised power mean of them, is again a member (theory.md section 4.3).
        Targets are then the class indices ``c``.
        """
        return None

    def m_mixture_eta(self, etas: Tensor, logw: Tensor) -> Tensor:
        r"""The natural parameter of the m-mixture ``sum_m w_m p(.|eta_m)`` (theory.md section 6).

        .. math::  p(\cdot \mid \eta_{mix}) = \sum_m w_m\, p(\cdot \mid \eta_m)

        ``etas``: ``[M, n, K]``, ``logw``: ``[M]`` (``log w_m``); returns ``[n, K]``.
        Only families whose mixtures stay in the family implement it (see
        :attr:`has_m_mixture`); the default raises.

        Raises:
            NotImplementedError: the m-mixture of this family is not a member of it.
        """
        raise NotImplementedError(f"the m-mixture of {self.name!r} distributions is not in the family")

    @property
    def has_m_mixture(self) -> bool:
        """True when the family implements :meth:`m_mixture_eta` (its mixtures are members)."""
        return type(self).m_mixture_eta is not ExponentialFamily.m_mixture_eta

    def class_probs(self, eta: Tensor, y: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        r"""``(probs [n, C], labels [n])`` when the labels are classes, else ``None``.

        .. math::  \hat y_i = \arg\max_c p(c \mid \eta_i)

        For accuracy and calibration error, which only make sense for class labels
        (theory.md section 1): ``categorical`` (``C = K``) and ``bernoulli`` with one
        output (``C = 2``); ``labels`` are ``y`` as class indices.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
