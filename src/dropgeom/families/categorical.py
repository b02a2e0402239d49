"""The categorical family: one of ``K`` classes with logits ``eta`` (theory.md section 1)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from .._utils import first_order_only
from .base import ExponentialFamily

#: the largest centred shift whose ``exp`` the fast KL forms take (``e^50`` is far from float32's overflow at
#: ``e^88`` and leaves room for the sum over classes); above it the log-softmax form, which cannot overflow
_EXP_SAFE = 50.0

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

    def reduced_cov_sqrt(self, eta: Tensor) -> Tensor:
        r"""An exact ``K-1``-column square root of ``Sigma = diag(p) - p p^T`` (``[n, K, K-1]``; theory.md section 2).

        The symmetric root ``S = diag(sqrt p) - p sqrt(p)^T`` annihilates the unit
        vector ``u = sqrt(p)``. With the Householder reflection ``H = I - c w w^T``,
        ``w = u + e_K``, ``c = 2 / |w|^2 = 1 / (1 + u_K)`` (``H u = -e_K``), ``S H``
        has a zero last column and ``(S H)(S H)^T = S S^T = Sigma``; since
        ``S w = u_K (e_K - p)``, its columns ``j < K`` are

        .. math::  R_j = u_j \Big(e_j - \frac{p}{1 + u_K} - \frac{u_K}{1 + u_K} e_K\Big)

        Hand-written (no library offers it); ``1 + u_K >= 1`` keeps it stable.
        """
        p = torch.softmax(eta, dim=-1)
        u = p.sqrt()
        a = u[:, :-1]  # [n, K-1]
        d = 1.0 + u[:, -1:]  # [n, 1]
        R = -(p / d).unsqueeze(-1) * a.unsqueeze(1)  # [n, K, K-1]
        R[:, :-1, :] += torch.diag_embed(a)
        R[:, -1, :] -= (u[:, -1:] / d) * a
        return R

    def cov_sqrt_with_mean(self, eta: Tensor, mean: Tensor) -> Tensor:
        r"""The symmetric root ``S = diag(sqrt p) - p sqrt(p)^T`` from ``p = mean`` (theory.md section 1).

        .. math::  S = \mathrm{diag}(\sqrt p) - p \sqrt p^\top, \qquad S S^\top = \mathrm{diag}(p) - p p^\top
        """
        sp = mean.sqrt()
        return torch.diag_embed(sp) - mean.unsqueeze(-1) * sp.unsqueeze(-2)

    def column_cov_norms(self, eta: Tensor, w: Tensor, h: Tensor, mean: Optional[Tensor] = None) -> Tensor:
        r"""``h_ij^2 (W^T Sigma_i W)_jj`` with ``Sigma = diag(p) - p p^T`` (theory.md section 4.4).

        .. math::  N_{ij} = h_{ij}^2 \big(p_i^\top W^{\circ 2} - (p_i^\top W)^2\big)_j

        ``O(n K U)``, no ``[n, R, U]`` tensor; ``mean``: ``softmax(eta)`` if at hand.
        """
        prob = torch.softmax(eta, dim=-1) if mean is None else mean
        return h * h * (prob @ (w * w) - (prob @ w).pow(2))

    def kl_to_shifted(self, eta: Tensor, w: Tensor, h: Tensor, mean: Optional[Tensor] = None) -> Tensor:
        r"""``KL(p(.|eta_i) || p(.|eta_i - h_ij W[:, j]))`` (``[n, U]``; theory.md section 4.4).

        With ``delta = h_ij W[:, j]`` centred under ``p_i`` (``x = delta - <p_i, delta>``)

        .. math::  K_{ij} = \log\Big(1 + \sum_c p_{ic}\, \mathrm{expm1}(-x_c)\Big)

        computed by :meth:`kl_shift` on the shifts ``-h_ij W[:, j]`` (``[n, K, U]``): its overflow rule
        and hand-written backward, about a third faster forward and backward than this form through
        autograd on ``[256, 10, 1024]``; as accurate as the log-softmax form (both lose the first-order
        terms to cancellation in the same way). ``mean``: ``softmax(eta)`` if at hand.
        """
        return self.kl_shift(eta, -(w.unsqueeze(0) * h.unsqueeze(1)), mean)

    def kl_shift(self, eta: Tensor, shift: Tensor, mean: Optional[Tensor] = None) -> Tensor:
        r"""``KL(p(.|eta_i) || p(.|eta_i + shift[i, :, u]))`` (``[n, U]``; theory.md section 4.2).

        With ``x = shift - <p_i, shift>`` (each column centred under ``p_i``)

        .. math::  K_{iu} = \mathrm{log1p}\Big(\sum_c p_{ic}\, \mathrm{expm1}(x_{icu})\Big)

        two batched matmuls over the ``[n, K, U]`` shifts and no shifted parameters, permuted copies or
        log-softmaxes, with a hand-written backward (:class:`_ShiftKL`); :meth:`kl_to_each` where ``exp``
        could overflow (``max - min`` of the shifts ``>= 50``, a bound on ``x``). ``mean``: ``softmax(eta)``
        if at hand.
        """
        prob = torch.softmax(eta, dim=-1) if mean is None else mean
        if shift.numel():
            lo, hi = torch.aminmax(shift.detach())
            if float(hi - lo) >= _EXP_SAFE:  # x <= max - min of the shifts: exp could overflow
                return super().kl_shift(eta, shift, mean)
        return _ShiftKL.apply(shift, prob)

    def kl_to_each(self, eta: Tensor, others: Tensor, mean: Optional[Tensor] = None) -> Tensor:
        r"""``KL(p(.|eta_i) || p(.|others[..., i, :]))`` (shape ``[..., n]``; theory.md section 4.2).

        With ``d = others - eta`` centred under ``p_i`` (``x = d - <p_i, d>``)

        .. math::  \mathrm{KL} = \log \sum_c p_c e^{x_c} = \mathrm{log1p}\Big(\sum_c p_c\, \mathrm{expm1}(x_c)\Big)

        about half the passes of two log-softmaxes and as accurate (both lose the
        first-order terms to cancellation alike); :meth:`kl` where ``exp`` could
        overflow (``max x >= 50``). ``mean``: ``softmax(eta)`` if at hand.
        """
        prob = torch.softmax(eta, dim=-1) if mean is None else mean
        d = others - eta
        x = d - (d * prob).sum(-1, keepdim=True)
        if float(x.detach().max()) < _EXP_SAFE:
            return torch.log1p((torch.expm1(x) * prob).sum(-1)).clamp_min(0)
        return super().kl_to_each(eta, others)

    def log_probs(self, eta: Tensor) -> Tensor:
        r"""``log_softmax(eta)``: the natural parameter is the log-probability vector up to ``A`` (theory.md section 4.3).

        .. math::  \log p(c \mid \eta) = \eta_c - \mathrm{logsumexp}(\eta)
        """
        return torch.log_softmax(eta, -1)

    def m_mixture_eta(self, etas: Tensor, logw: Tensor) -> Tensor:
        r"""``log sum_m w_m softmax(eta_m)``: the mixture's log-probabilities, a natural parameter (theory.md section 6).

        .. math::  \eta_{mix} = \log \sum_m w_m\, \mathrm{softmax}(\eta_m)
        """
        return torch.logsumexp(logw.reshape(-1, 1, 1) + torch.log_softmax(etas, -1), 0)

    def class_probs(self, eta: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        r"""``(softmax(eta), y)``: the ``K`` class probabilities and the class indices (theory.md section 1).

        .. math::  p(c \mid \eta) = \mathrm{softmax}(\eta)_c
        """
        return torch.softmax(eta, dim=-1), y

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
            raise ValueError(f"family 'categorical': targets must be class indices with shape [n] = [{n}], got {tuple(y.shape)}")
        if torch.is_floating_point(y) or y.dtype == torch.bool:
            raise ValueError(f"family 'categorical': targets must be integer class indices, got {y.dtype}")
        if n and (int(y.min()) < 0 or int(y.max()) >= k):
            raise ValueError(
                f"family 'categorical': class indices must lie in [0, {k - 1}], got range [{int(y.min())}, {int(y.max())}]"
            )


class _ShiftKL(torch.autograd.Function):
    r"""``log1p(sum_c p_c expm1(x_c))`` with ``x = shift - <p, shift>`` over the ``K`` axis of ``[n, K, U]`` shifts.

    Hand-written (no library fuses it): four passes over the shifts forward and five backward, against about
    twice that through autograd, whose backward of the batched reductions ``p^T X`` is an outer-product
    ``bmm`` with an inner size of 1 (4x slower than a broadcast multiply on the CPU). With ``t = sum_c p_c
    expm1(x_c)`` and ``e = expm1(x)``:

    .. math::  \partial K_u / \partial\,\mathrm{shift}_{ku} = p_k \big(e_{ku} - t_u + 1 - \textstyle\sum_c p_c\big) / (1 + t_u), \qquad
               \partial K_u / \partial p_k = \big(e_{ku} - \mathrm{shift}_{ku} (t_u + \textstyle\sum_c p_c)\big) / (1 + t_u)

    (``p`` taken as an input of its own, not assumed to sum to 1, so this is the exact derivative of the
    expression; autograd carries it on to ``eta``). The caller keeps ``x`` below the overflow bound
    (:meth:`Categorical.kl_shift`). Differentiable once.
    """

    @staticmethod
    def forward(ctx: Any, shift: Tensor, prob: Tensor) -> Tensor:  # type: ignore[override]
        pr = prob.unsqueeze(1)  # [n, 1, K]
        e = shift - torch.bmm(pr, shift)  # x, [n, K, U]
        e.expm1_()
        t = torch.bmm(pr, e)  # [n, 1, U]
        ctx.save_for_backward(shift, prob, e, t)
        return torch.log1p(t.squeeze(1)).clamp_min_(0)

    @staticmethod
    @first_order_only("the categorical kl_shift")
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:  # type: ignore[override]
        shift, prob, e, t = ctx.saved_tensors
        grad = grad * (t.squeeze(1) >= 0)  # where the clamp at 0 acted (rounding), no gradient, as through autograd
        w = (grad.unsqueeze(1) / (1.0 + t)).transpose(1, 2)  # [n, U, 1]: g / (1 + t)
        grad_prob = None
        if ctx.needs_input_grad[1]:
            # sum_u w_u (e_ku - shift_ku (t_u + sum_c p_c)): exact for any p (on the simplex the last factor is 1 + t)
            scaled = w * (t.transpose(1, 2) + prob.sum(-1).view(-1, 1, 1))  # [n, U, 1]
            grad_prob = (torch.bmm(e, w) - torch.bmm(shift, scaled)).squeeze(-1)
        grad_shift = None
        if ctx.needs_input_grad[0]:
            # p_k (e_ku - t_u + 1 - sum_c p_c) w_u (on the simplex: p_k (e_ku - t_u) w_u)
            off = t + (prob.sum(-1) - 1.0).view(-1, 1, 1)  # [n, 1, U]
            # out of place first: the saved e must survive a second backward (retain_graph)
            grad_shift = (e - off).mul_(prob.unsqueeze(-1)).mul_(w.transpose(1, 2))
        return grad_shift, grad_prob
