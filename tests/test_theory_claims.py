"""Statements of docs/theory.md sections 5 and 7 checked numerically (float64, closed forms).

* 5.1/5.2: under a pure reparametrisation (one layer stored as ``W / c``) the
  undamped ``gamma^2`` and the normal curvature along a function-defined
  direction do not move, parameter-space damping does; relative damping is
  invariant under a uniform rescaling of all coordinates.
* 7.1: for a GLM with input dropout the exact gap (all masks enumerated) is
  Wager's quadratic form plus the third-order term
  ``1/6 sum_j kappa_3 x_j^3 A'''[w_j, w_j, w_j]`` with
  ``kappa_3 = p (2p - 1) / (1 - p)^2``, up to fourth order in the feature scale;
  exactly the quadratic form for the gaussian family.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dropgeom import ModelManifold, embedding_curvature, get_family, normal_curvature
from dropgeom.dropout import gap

D64 = torch.float64


def _tanh_net(seed: int = 0, n: int = 24, d: int = 2, h: int = 4, k: int = 3):
    """``eta(theta) = tanh(x W1^T) W2^T`` with ``theta = (W1, W2)`` flat; n (K-1) = 48 > P = 20."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=D64)
    w1 = 1.5 * torch.randn(h, d, generator=g, dtype=D64)
    w2 = torch.randn(k, h, generator=g, dtype=D64)

    def eta(theta: Tensor, c: float = 1.0) -> Tensor:
        W1 = c * theta[: h * d].reshape(h, d)  # layer 1 stored as W1 / c
        W2 = theta[h * d :].reshape(k, h)
        return torch.tanh(x @ W1.T) @ W2.T

    return eta, w1, w2


def _manifold(eta, w1: Tensor, w2: Tensor, c: float) -> ModelManifold:
    theta = torch.cat([(w1 / c).flatten(), w2.flatten()])
    return ModelManifold.from_function(lambda t: eta(t, c), theta, "categorical")


def test_layer_rescaling_moves_damped_curvature_only():
    eta, w1, w2 = _tanh_net()
    h, d = w1.shape
    undamped, damped, kappa = [], [], []
    for c in (0.1, 10.0):
        m = _manifold(eta, w1, w2, c)
        undamped.append(embedding_curvature(m).gamma2.item())
        damped.append(embedding_curvature(m, damping=1e-3).gamma2.item())
        # a direction defined by the function: scale input feature 0, i.e. column 0 of the stored
        # first-layer weight (an input-dropout mask direction; the output layer's would be e-flat)
        v = torch.zeros(m.num_params, dtype=D64)
        v[: h * d].view(h, d)[:, 0] = w1[:, 0] / c
        kappa.append(normal_curvature(m, v, method="dense").item())
    assert undamped[0] > 0 and kappa[0] > 0
    assert max(undamped) == pytest.approx(min(undamped), rel=1e-6)
    assert max(kappa) == pytest.approx(min(kappa), rel=1e-6)
    assert max(damped) / min(damped) > 2.0  # parameter-space damping is coordinate-dependent


def test_relative_damping_is_invariant_under_uniform_rescaling():
    eta, w1, w2 = _tanh_net(seed=1)
    base = embedding_curvature(_manifold(eta, w1, w2, 1.0), damping=1e-3).gamma2.item()
    c = 7.0
    theta = torch.cat([w1.flatten(), w2.flatten()]) / c
    scaled = ModelManifold.from_function(lambda t: eta(c * t), theta, "categorical")
    assert embedding_curvature(scaled, damping=1e-3).gamma2.item() == pytest.approx(base, rel=1e-7)


def _glm(family: str, scale: float, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    glm = nn.Sequential(nn.Dropout(0.3), nn.Linear(4, k)).double()
    with torch.no_grad():
        glm[1].weight.copy_(torch.randn(k, 4, generator=g, dtype=D64))
        glm[1].bias.copy_(0.5 * torch.randn(k, generator=g, dtype=D64))
    x = scale * torch.randn(12, 4, generator=g, dtype=D64)
    y = torch.randint(0, k, (12,), generator=g) if family == "categorical" else torch.randn(12, k, generator=g, dtype=D64)
    return glm, x, y


def _wager_terms(glm: nn.Sequential, x: Tensor, family: str, p: float):
    """Section 7.1: the quadratic form R_q and the third-order term, mean over inputs."""
    fam = get_family(family)
    W = glm[1].weight.detach().T  # [features, K]: w_j is row j
    eta = glm.eval()(x).detach()
    n, V = x.shape[0], p / (1 - p)
    kappa3 = p * (2 * p - 1) / (1 - p) ** 2
    quad = third = torch.zeros((), dtype=D64)
    for j in range(W.shape[0]):
        w = W[j].expand_as(eta)
        quad = quad + (x[:, j] ** 2 * (w * fam.cov_mv(eta, w)).sum(-1)).sum()
        third = third + (x[:, j] ** 3 * (w * fam.third_cumulant(eta, w, w)).sum(-1)).sum()
    return 0.5 * V * quad.item() / n, kappa3 * third.item() / (6 * n)


def test_wager_quadratic_form_is_exact_for_the_gaussian_family():
    glm, x, y = _glm("gaussian", 1.0, 2)
    exact = gap(glm, x, y, family="gaussian", p=0.3, method="exact").value
    quad, third = _wager_terms(glm, x, "gaussian", 0.3)
    assert third == 0.0
    assert exact == pytest.approx(quad, rel=1e-12)


def test_wager_remainder_is_the_third_cumulant_term():
    left = []
    for scale in (0.1, 0.05, 0.025):
        glm, x, y = _glm("categorical", scale, 3)
        exact = gap(glm, x, y, family="categorical", p=0.3, method="exact").value
        quad, third = _wager_terms(glm, x, "categorical", 0.3)
        assert 0 < exact - quad < 10 * scale * quad  # the quadratic form is the leading term
        left.append(abs(exact - quad - third) / abs(exact - quad))
    # what the third-order term leaves is of higher order: its share shrinks with the feature scale
    assert left[1] < 0.5 * left[0] and left[2] < 0.5 * left[1] and left[2] < 0.05
