"""Independent float64 references for the core: families, manifold derivatives, Fisher matrices.

Built only from ``torch.autograd.functional.jacobian`` / ``hessian`` and closed
forms written out here; nothing in this module imports ``dropgeom``, so a bug
in the library cannot hide in its own reference.

Conventions are those of theory.md sections 1-2: ``eta`` is ``[n, K]``; the
Fisher information is a mean over inputs, ``F = (1/n) sum_i J_i^T Sigma_i J_i``.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.nn.attention import SDPBackend, sdpa_kernel

# --------------------------------------------------------------------------
# exponential families: closed-form log-partitions, one row at a time
# --------------------------------------------------------------------------


def log_partition_row(family: str, eta: Tensor, sigma: float = 1.0) -> Tensor:
    """``A(eta)`` for one row ``eta`` (``[K]``), written from theory.md's table."""
    if family == "categorical":
        m = eta.max().detach()
        return m + torch.log(torch.exp(eta - m).sum())
    if family == "bernoulli":
        return torch.log1p(torch.exp(eta)).sum()
    if family == "gaussian":
        return 0.5 * sigma**2 * (eta**2).sum()
    if family == "poisson":
        return torch.exp(eta).sum()
    if family == "normal":
        e1, e2 = eta[0], eta[1]
        return -(e1**2) / (4 * e2) - 0.5 * torch.log(-2 * e2)
    raise ValueError(family)


def family_derivatives(family: str, eta: Tensor, sigma: float = 1.0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(A, A', A'', A''')`` per row by autograd of :func:`log_partition_row` (float64).

    Shapes ``[n]``, ``[n, K]``, ``[n, K, K]``, ``[n, K, K, K]``.
    """
    A, d1, d2, d3 = [], [], [], []
    for row in eta.to(torch.float64):
        f = lambda e: log_partition_row(family, e, sigma)  # noqa: E731
        A.append(f(row))
        d1.append(jacobian(f, row))
        d2.append(hessian(f, row))
        d3.append(jacobian(lambda e: hessian(f, e, create_graph=True), row))
    return torch.stack(A), torch.stack(d1), torch.stack(d2), torch.stack(d3)


def sufficient_statistic(family: str, y: Tensor, k: int) -> Tensor:
    """``t(y)`` in float64: one-hot for categorical, ``(y, y^2)`` for normal, ``y`` otherwise."""
    if family == "categorical":
        return torch.eye(k, dtype=torch.float64)[y.long()]
    if family == "normal":
        y = y.reshape(-1).to(torch.float64)
        return torch.stack([y, y**2], -1)
    return y.to(torch.float64)


def closed_form_cov(family: str, eta: Tensor, sigma: float = 1.0) -> Tensor:
    """``Sigma(eta)`` from theory.md's table (not autograd), ``[n, K, K]``."""
    eta = eta.to(torch.float64)
    if family == "categorical":
        p = torch.softmax(eta, -1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    if family == "bernoulli":
        s = torch.sigmoid(eta)
        return torch.diag_embed(s * (1 - s))
    if family == "gaussian":
        return torch.diag_embed(torch.full_like(eta, sigma**2))
    if family == "poisson":
        return torch.diag_embed(eta.exp())
    if family == "normal":
        s2 = -0.5 / eta[:, 1]
        mu = eta[:, 0] * s2
        c = 2 * mu * s2
        return torch.stack([torch.stack([s2, c], -1), torch.stack([c, 4 * mu**2 * s2 + 2 * s2**2], -1)], -2)
    raise ValueError(family)


def torch_distribution_nll(family: str, eta: Tensor, y: Tensor, sigma: float = 1.0) -> Tensor:
    """``-log p(y|eta)`` per sample from :mod:`torch.distributions` (moment parametrisation)."""
    D = torch.distributions
    eta = eta.to(torch.float64)
    if family == "categorical":
        return -D.Categorical(logits=eta).log_prob(y.long())
    if family == "bernoulli":
        return -D.Bernoulli(logits=eta).log_prob(y.to(torch.float64)).sum(-1)
    if family == "gaussian":
        return -D.Normal(sigma**2 * eta, sigma).log_prob(y.to(torch.float64)).sum(-1)
    if family == "poisson":
        return -D.Poisson(eta.exp()).log_prob(y.to(torch.float64)).sum(-1)
    if family == "normal":
        s2 = -0.5 / eta[:, 1]
        return -D.Normal(eta[:, 0] * s2, s2.sqrt()).log_prob(y.reshape(-1).to(torch.float64))
    raise ValueError(family)


def torch_distribution(family: str, eta: Tensor, sigma: float = 1.0):
    """The matching :mod:`torch.distributions` object (for KL and sampling references)."""
    D = torch.distributions
    eta = eta.to(torch.float64)
    if family == "categorical":
        return D.Categorical(logits=eta)
    if family == "bernoulli":
        return D.Independent(D.Bernoulli(logits=eta), 1)
    if family == "gaussian":
        return D.Independent(D.Normal(sigma**2 * eta, sigma * torch.ones_like(eta)), 1)
    if family == "poisson":
        return D.Independent(D.Poisson(eta.exp()), 1)
    if family == "normal":
        s2 = -0.5 / eta[:, 1]
        return D.Normal(eta[:, 0] * s2, s2.sqrt())
    raise ValueError(family)


def log_prob_kl(family: str, eta: Tensor, eta2: Tensor) -> Tensor:
    """``KL = sum_y p(y) (log p(y) - log q(y))`` in float64 from log-probabilities
    (log-softmax / log-sigmoid), stable at extreme logits; categorical and bernoulli."""
    eta, eta2 = eta.to(torch.float64), eta2.to(torch.float64)
    if family == "categorical":
        lp, lq = torch.log_softmax(eta, -1), torch.log_softmax(eta2, -1)
        return (lp.exp() * (lp - lq)).sum(-1)
    if family == "bernoulli":
        ls = torch.nn.functional.logsigmoid
        s = torch.sigmoid(eta)
        return (s * (ls(eta) - ls(eta2)) + (1 - s) * (ls(-eta) - ls(-eta2))).sum(-1)
    raise ValueError(family)


# --------------------------------------------------------------------------
# models as functions of a flat parameter vector
# --------------------------------------------------------------------------


def flat_model(
    model: nn.Module, inputs, names: Optional[Sequence[str]] = None
) -> Tuple[Callable[[Tensor], Tensor], Tensor, List[str]]:
    """``(f, theta0, names)``: ``f(theta) = model(inputs)`` in eval mode with the free
    parameters ``names`` (default all, ``model.parameters()`` order) taken from ``theta``.

    Works on a deep copy in eval mode, so the caller's model is never touched.
    """
    m = copy.deepcopy(model).eval()
    params = dict(m.named_parameters())
    names = list(params) if names is None else list(names)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    fixed = {k: v.detach() for k, v in params.items() if k not in names}
    buffers = dict(m.named_buffers())
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)

    def f(theta: Tensor) -> Tensor:
        chunks = torch.split(theta, sizes)
        free = {k: c.reshape(s) for k, c, s in zip(names, chunks, shapes)}
        # plain (math) attention kernels: the fused ones have no double backward
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.functional_call(m, ({**fixed, **free}, buffers), inputs)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)

    theta0 = torch.cat([params[k].detach().reshape(-1) for k in names])
    return f, theta0, names


def dense_jacobian(f: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    """``J = d f / d theta`` by ``torch.autograd.functional.jacobian``: ``[n, K, P]``."""
    return jacobian(f, theta, vectorize=True)


def dense_d2(f: Callable[[Tensor], Tensor], theta: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``D2 f[u, v] = d/ds d/dt f(theta + s u + t v)`` at 0, by nested ``jacobian`` in the two
    plane coordinates: two levels of reverse mode, no forward mode.

    Checked against central finite differences. Do not replace it by nested
    ``torch.autograd.functional.jvp`` (the double-backward trick): that takes four nested
    backward levels, and PyTorch 2.13's fused LayerNorm / InstanceNorm kernels give wrong
    derivatives there (as they do in forward-over-forward mode).
    """

    def g(st: Tensor) -> Tensor:
        return f(theta + st[0] * u + st[1] * v)

    def dg_dt(st: Tensor) -> Tensor:
        return jacobian(g, st, create_graph=True)[..., 1]

    st0 = torch.zeros(2, dtype=theta.dtype)
    return jacobian(dg_dt, st0)[..., 0]


# --------------------------------------------------------------------------
# Fisher matrices from the dense Jacobian
# --------------------------------------------------------------------------


def fisher_from_factors(J: Tensor, S: Tensor) -> Tensor:
    """``(1/n) sum_i J_i^T S_i S_i^T J_i`` with ``J`` ``[n, K, P]`` and ``S`` ``[n, K, R]``."""
    G = torch.einsum("nkp,nkr->nrp", J, S)
    return torch.einsum("nrp,nrq->pq", G, G) / J.shape[0]


def exact_fisher(J: Tensor, eta: Tensor, family: str, sigma: float = 1.0) -> Tensor:
    """``F = (1/n) sum_i J_i^T Sigma_i J_i`` with ``Sigma_i = hessian(A)(eta_i)`` (autograd)."""
    _, _, cov, _ = family_derivatives(family, eta, sigma)
    return torch.einsum("nkp,nkl,nlq->pq", J, cov, J) / J.shape[0]


def empirical_fisher(J: Tensor, eta: Tensor, y: Tensor, family: str, sigma: float = 1.0) -> Tensor:
    """``(1/n) sum_i g_i g_i^T``, ``g_i = J_i^T (A'(eta_i) - t(y_i))``."""
    _, mean, _, _ = family_derivatives(family, eta, sigma)
    r = mean - sufficient_statistic(family, y, eta.shape[1])
    g = torch.einsum("nkp,nk->np", J, r)
    return g.T @ g / J.shape[0]


def kron_block(B: Tensor, A: Tensor) -> Tensor:
    """Dense ``B (x) A`` on ``[W | b]`` flattened row-major (``[out * (in+1)]``)."""
    return torch.kron(B.contiguous(), A.contiguous())


def wb_index(weight_slice: slice, bias_slice: Optional[slice], out: int, inp: int) -> Tensor:
    """Flat parameter indices of ``[W | b]`` flattened row-major (``W`` ``[out, in]``)."""
    idx = []
    for o in range(out):
        idx.extend(range(weight_slice.start + o * inp, weight_slice.start + (o + 1) * inp))
        if bias_slice is not None:
            idx.append(bias_slice.start + o)
    return torch.tensor(idx)


def layer_inputs(model: nn.Module, inputs: Tensor) -> Dict[str, Tensor]:
    """Inputs of every ``nn.Linear`` in an eval-mode copy of ``model`` (forward hooks)."""
    m = copy.deepcopy(model).eval()
    out: Dict[str, Tensor] = {}
    handles = []
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(lambda mod, i, o, name=name: out.__setitem__(name, i[0].detach())))
    with torch.no_grad():
        m(inputs)
    for h in handles:
        h.remove()
    return out


def gaussian_tolerance_sigma() -> float:
    """z-score used for statistical tests (two-sided, many comparisons)."""
    return 6.0


def is_psd(M: Tensor, rtol: float = 1e-10) -> bool:
    """Symmetric and all eigenvalues >= -rtol * max|eig|."""
    if not torch.allclose(M, M.T, atol=1e-12 * (1 + M.abs().max().item())):
        return False
    w = torch.linalg.eigvalsh(M)
    return bool(w.min() >= -rtol * max(1.0, w.abs().max().item()))


__all__ = [name for name in dir() if not name.startswith("_") and name not in {"annotations", "math"}]
