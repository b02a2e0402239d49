"""Float64 brute-force references for the dropout package (independent of dropgeom.dropout).

Networks are written out by hand from an ``nn.Sequential``'s weights; masks are a
single vector shared by all samples; derivatives with respect to the mask use
``torch.autograd.functional`` (dense Jacobians / Hessians), gaps use explicit
Python loops over every mask.
"""

from __future__ import annotations

import itertools
from typing import Callable, Dict, List

import torch
from torch import Tensor, nn


def sequential_eta(net: nn.Sequential, x: Tensor, masks: Dict[int, Tensor]) -> Tensor:
    """Hand-written forward of an ``nn.Sequential`` of Linear/activation/Dropout modules.

    ``masks[i]`` multiplies the input of the dropout module at index ``i``
    (shape ``[U]`` shared, or ``[n, U]`` per sample); other dropout modules are identity.
    """
    h = x
    for i, mod in enumerate(net):
        if isinstance(mod, nn.Linear):
            h = h @ mod.weight.T + (mod.bias if mod.bias is not None else 0.0)
        elif isinstance(mod, nn.Tanh):
            h = torch.tanh(h)
        elif isinstance(mod, nn.Softplus):
            h = torch.log1p(torch.exp(h))
        elif isinstance(mod, nn.ReLU):
            h = torch.where(h > 0, h, torch.zeros_like(h))
        elif isinstance(mod, nn.LeakyReLU):
            h = torch.where(h > 0, h, mod.negative_slope * h)
        elif isinstance(mod, nn.Dropout):
            if i in masks:
                h = h * masks[i]
        else:
            raise TypeError(f"reference forward does not know {type(mod).__name__}")
    return h


def nll(family: str, eta: Tensor, y: Tensor) -> Tensor:
    """Per-sample NLL written out (categorical, bernoulli, gaussian with sigma=1), constants included."""
    if family == "categorical":
        return torch.logsumexp(eta, -1) - eta.gather(1, y.long()[:, None])[:, 0]
    if family == "bernoulli":
        return (torch.log1p(torch.exp(eta)) - eta * y).sum(-1)
    if family == "gaussian":
        return (0.5 * (y - eta) ** 2 + 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=eta.dtype))).sum(-1)
    raise ValueError(family)


def log_partition(family: str, eta: Tensor) -> Tensor:
    if family == "categorical":
        return torch.logsumexp(eta, -1)
    if family == "bernoulli":
        return torch.log1p(torch.exp(eta)).sum(-1)
    if family == "gaussian":
        return 0.5 * (eta**2).sum(-1)
    raise ValueError(family)


def mean_param(family: str, eta: Tensor) -> Tensor:
    """mu = A'(eta) by autograd of the written-out log partition."""
    e = eta.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(log_partition(family, e).sum(), e)
    return g


def suff(family: str, y: Tensor, k: int) -> Tensor:
    if family == "categorical":
        return torch.nn.functional.one_hot(y.long(), k).double()
    return y.double()


def exact_gap(eta_of_mask: Callable[[Tensor], Tensor], units: int, p: float, family: str, y: Tensor) -> float:
    """``sum_b P(b) L(b/(1-p)) - L(1)`` by a Python loop over all ``2^units`` masks."""
    clean = nll(family, eta_of_mask(torch.ones(units, dtype=torch.float64)), y).mean()
    total = 0.0
    for bits in itertools.product((0.0, 1.0), repeat=units):
        b = torch.tensor(bits, dtype=torch.float64)
        prob = (1 - p) ** b.sum().item() * p ** (units - b.sum().item())
        total += prob * nll(family, eta_of_mask(b / (1 - p)), y).mean().item()
    return total - clean.item()


def terms_dense(eta_of_mask: Callable[[Tensor], Tensor], units: int, family: str, y: Tensor) -> Dict[str, Tensor]:
    """Per-unit F^mask, C, K, B (theory.md 4.2) with dense mask Jacobians/Hessians and explicit drops."""
    ones = torch.ones(units, dtype=torch.float64)
    eta = eta_of_mask(ones).detach()
    n, k = eta.shape
    mu = mean_param(family, eta)
    r = mu - suff(family, y, k)
    jac = torch.autograd.functional.jacobian(eta_of_mask, ones)  # [n, K, U]
    # covariance by autograd of mu (independent of the families module)
    cov = torch.stack(
        [torch.autograd.functional.jacobian(lambda e: mean_param_graph(family, e), eta[i]) for i in range(n)]
    )  # [n, K, K]
    fisher = torch.einsum("nau,nab,nbu->u", jac, cov, jac) / n
    hess = torch.autograd.functional.hessian(lambda m: (r * eta_of_mask(m)).sum(), ones)
    curv_g = torch.diagonal(hess) / n
    div, curv_b = [], []
    for j in range(units):
        m = ones.clone()
        m[j] = 0.0
        ed = eta_of_mask(m).detach()
        kl = log_partition(family, ed) - log_partition(family, eta) - (mu * (ed - eta)).sum(-1)
        div.append(kl.mean())
        curv_b.append((r * (ed - eta + jac[:, :, j])).sum(-1).mean())
    return {
        "fisher": fisher,
        "curvature_gaussian": curv_g,
        "divergence": torch.stack(div),
        "curvature_bernoulli": torch.stack(curv_b),
    }


def mean_param_graph(family: str, e: Tensor) -> Tensor:
    """mu(eta) for a single sample, differentiable (for the covariance Jacobian)."""
    if family == "categorical":
        return torch.softmax(e, -1)
    if family == "bernoulli":
        return torch.sigmoid(e)
    if family == "gaussian":
        return e
    raise ValueError(family)


def wager_quadratic(x: Tensor, theta: Tensor, family: str, p: float, bias: Tensor) -> float:
    """``1/2 p/(1-p) sum_j theta_j^T [(1/n) sum_i x_ij^2 Sigma_i] theta_j`` for a GLM ``eta = x theta^T + b``."""
    eta = x @ theta.T + bias
    n = x.shape[0]
    cov = torch.stack([torch.autograd.functional.jacobian(lambda e: mean_param_graph(family, e), eta[i]) for i in range(n)])
    diag_f = torch.einsum("nj,nab->jab", x**2, cov) / n  # the [K, K] block of feature j
    v = p / (1 - p)
    return 0.5 * v * torch.einsum("aj,jab,bj->", theta, diag_f, theta).item()


def mixture_exact(eta_of_mask: Callable[[Tensor], Tensor], units: int, p: float, alpha: float) -> Dict[str, Tensor]:
    """m-, e- and alpha-mixtures by a loop over all masks (probabilities, not logs)."""
    ps: List[Tensor] = []
    ws: List[float] = []
    for bits in itertools.product((0.0, 1.0), repeat=units):
        b = torch.tensor(bits, dtype=torch.float64)
        ws.append((1 - p) ** b.sum().item() * p ** (units - b.sum().item()))
        ps.append(torch.softmax(eta_of_mask(b / (1 - p)), -1))
    w = torch.tensor(ws, dtype=torch.float64)[:, None, None]
    pm = torch.stack(ps)
    m_mix = (w * pm).sum(0)
    e_mix = torch.exp((w * pm.log()).sum(0))
    e_mix = e_mix / e_mix.sum(-1, keepdim=True)
    a = (1 - alpha) / 2
    a_mix = (w * pm**a).sum(0) ** (1 / a)
    a_mix = a_mix / a_mix.sum(-1, keepdim=True)
    return {"m": m_mix, "e": e_mix, "alpha": a_mix}


def mha_self_attention(mha: nn.MultiheadAttention, x: Tensor, weight_mask: Tensor) -> Tensor:
    """Hand-written batch-first self-attention of an ``nn.MultiheadAttention`` whose post-softmax
    attention weights are multiplied by ``weight_mask`` (``[heads, L, L]`` or ``[n, heads, L, L]``)."""
    n, L, E = x.shape
    h = mha.num_heads
    d = E // h
    qkv = x @ mha.in_proj_weight.T + mha.in_proj_bias  # [n, L, 3E]
    q, k, v = (t.reshape(n, L, h, d).transpose(1, 2) for t in qkv.split(E, -1))  # [n, h, L, d]
    w = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1) * weight_mask
    out = (w @ v).transpose(1, 2).reshape(n, L, E)
    return out @ mha.out_proj.weight.T + mha.out_proj.bias


def alpha_dropout_at(h: Tensor, keep: Tensor, p: float) -> Tensor:
    """torch's alpha dropout at keep indicators ``keep`` (0/1), written out from its definition:
    dropped units take SELU's negative saturation ``-lambda alpha``, then the affine map that
    restores zero mean and unit variance."""
    lam, alpha = 1.0507009873554804934193349852946, 1.6732632423543772848170429916717
    a_neg = -lam * alpha
    q = 1.0 - p
    a = (q + a_neg**2 * q * p) ** -0.5
    b = -a * a_neg * p
    return a * (keep * h + (1.0 - keep) * a_neg) + b
