"""Float64 brute-force references for C3: dropout's regularizer and its gradient by hand enumeration of masks,
and the Wager-regime quantities of a softmax GLM with input dropout (explicit loops, no dropgeom code)."""

from __future__ import annotations

import itertools
from typing import List, Tuple

import numpy as np
import torch


def _nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (torch.logsumexp(logits, -1) - logits.gather(-1, y[:, None]).squeeze(-1)).mean()


def mlp_regularizer_and_grad(
    W1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor, b2: torch.Tensor, x: torch.Tensor, y: torch.Tensor, p: float
) -> Tuple[float, List[torch.Tensor]]:
    """``R = sum_m P(m) L(m) - L(1)`` of ``x -> tanh(x W1^T + b1) * m -> W2^T + b2`` over all ``2^h`` masks
    ``m_j in {0, 1/(1-p)}``, and its gradient with respect to ``(W1, b1, W2, b2)``."""
    params = [t.detach().clone().requires_grad_(True) for t in (W1, b1, W2, b2)]
    w1, c1, w2, c2 = params
    h = torch.tanh(x @ w1.T + c1)
    total = -_nll(h @ w2.T + c2, y)
    for bits in itertools.product((0, 1), repeat=w1.shape[0]):
        b = torch.tensor(bits, dtype=x.dtype)
        prob = float(np.prod([(1 - p) if k else p for k in bits]))
        total = total + prob * _nll((h * b / (1 - p)) @ w2.T + c2, y)
    grads = torch.autograd.grad(total, params)
    return float(total.detach()), [g.detach() for g in grads]


def glm_gap(W: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, p: float) -> float:
    """Exact input-dropout gap of the softmax GLM ``eta = W x + b``: a loop over all ``2^d`` input masks."""
    n, d = x.shape

    def loss(xm: np.ndarray) -> float:
        eta = xm @ W.T + b
        m = eta.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(eta - m).sum(1))
        return float(np.mean(lse - eta[np.arange(n), y]))

    clean = loss(x)
    drop = 0.0
    for bits in itertools.product((0, 1), repeat=d):
        prob = float(np.prod([(1 - p) if k else p for k in bits]))
        drop += prob * loss(x * np.asarray(bits, dtype=float) / (1 - p))
    return drop - clean


def glm_quadratic(W: np.ndarray, b: np.ndarray, x: np.ndarray, p: float) -> float:
    """``1/2 V sum_j (1/n) sum_i x_ij^2 W_:j^T (diag(pi_i) - pi_i pi_i^T) W_:j`` by explicit loops."""
    n, d = x.shape
    total = 0.0
    for i in range(n):
        eta = W @ x[i] + b
        pi = np.exp(eta - eta.max())
        pi /= pi.sum()
        cov = np.diag(pi) - np.outer(pi, pi)
        for j in range(d):
            total += x[i, j] ** 2 * float(W[:, j] @ cov @ W[:, j])
    return 0.5 * p / (1 - p) * total / n
