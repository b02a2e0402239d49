"""The invariance contract (dropgeom.curvature.invariant): the same network in new coordinates.

Two reparametrisations ``theta = A theta'`` of one float64 tanh MLP with dropout:

* the first layer stored as ``W / c`` and multiplied by ``c`` in the forward pass (c = 0.1, 1, 10);
* an invertible linear map of the second layer, ``W = W' B``.

Invariant measures must agree to 1e-8 (relative); the coordinate-dependent ones
(damped gamma^2, Hessian trace, top Hessian eigenvalue, Fisher trace / top
eigenvalue, SAM sharpness) must visibly change, so that the flags in
``INVARIANCE`` are true statements.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from dropgeom import ModelManifold, embedding_curvature
from dropgeom.curvature import (
    INVARIANCE,
    dropout_tangent_directions,
    fisher_top_eigenvalue,
    fisher_trace,
    hessian_top_eigenvalue,
    hessian_trace,
    natural_gradient_curvature,
    normal_curvatures,
    range_gamma2,
    sam_sharpness,
)

D64 = torch.float64


def _net(seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.3), nn.Linear(4, 4), nn.Tanh(), nn.Dropout(0.3), nn.Linear(4, 3)
    ).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D64))
    return net


X = torch.randn(40, 3, generator=torch.Generator().manual_seed(1), dtype=D64)
Y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(2))
X_REF = torch.randn(30, 3, generator=torch.Generator().manual_seed(6), dtype=D64)
B = torch.eye(4, dtype=D64) + 0.5 * torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=D64)


def rescaled(c: float, x: torch.Tensor = X):
    """The first layer's weight stored as W / c; forward multiplies by c. Returns (manifold, A) with theta = A theta'."""
    net = _net()
    stored = copy.deepcopy(net).eval()  # the custom forward runs as called: eval mode (dropout off)
    with torch.no_grad():
        stored[0].weight.div_(c)

    def forward(params, inputs):
        return functional_call(stored, {**params, "0.weight": c * params["0.weight"]}, inputs)

    m = ModelManifold(stored, x, forward=forward)
    scale = torch.ones(m.num_params, dtype=D64)
    scale[m.param_slices()["0.weight"]] = c
    return m, torch.diag(scale)


def linear(x: torch.Tensor = X):
    """The second layer's weight stored as W' = W B^{-1}; forward uses W' B."""
    net = _net()
    stored = copy.deepcopy(net).eval()  # the custom forward runs as called: eval mode (dropout off)
    with torch.no_grad():
        stored[3].weight.copy_(net[3].weight @ torch.linalg.inv(B))

    def forward(params, inputs):
        return functional_call(stored, {**params, "3.weight": params["3.weight"] @ B}, inputs)

    m = ModelManifold(stored, x, forward=forward)
    P = m.num_params
    A = torch.eye(P, dtype=D64)
    sl = m.param_slices()["3.weight"]
    A[sl, sl] = torch.kron(torch.eye(4, dtype=D64), B.T.contiguous())  # vec_row(W' B) = (I kron B^T) vec_row(W')
    return m, A


def plain(x: torch.Tensor = X):
    net = _net()
    return ModelManifold(net, x), torch.eye(sum(p.numel() for p in net.parameters()), dtype=D64)


def invariant_values(m: ModelManifold, A: torch.Tensor, V: torch.Tensor, ref: ModelManifold) -> dict:
    """Invariant measures in the coordinates of m; V are directions in the reference coordinates.

    ``ref``: the same network in the same coordinates on other inputs (the function-space regulariser).
    Dense solves only: a matrix-free (CG) solve is invariant only up to its convergence on a badly
    conditioned system (tests/test_curvature_measures.py checks it against the brute force).
    """
    Vp = torch.linalg.solve(A, V.T).T  # tangent vectors in the new coordinates
    out = {}
    for alpha in (1.0, -1.0):
        out[f"gamma2 alpha={alpha}"] = float(embedding_curvature(m, alpha=alpha).gamma2)
        out[f"range gamma2 alpha={alpha}"] = float(range_gamma2(m, alpha=alpha))
        out[f"mask kappa alpha={alpha}"] = normal_curvatures(m, Vp, alpha=alpha)
        out[f"natural-gradient kappa alpha={alpha}"] = float(natural_gradient_curvature(m, Y, alpha=alpha))
        out[f"regularised natural-gradient kappa alpha={alpha}"] = float(
            natural_gradient_curvature(m, Y, alpha=alpha, reference=ref, method="dense")
        )
    return out


def _two(build):
    """The manifold on X and on the reference inputs X_REF, in one coordinate system."""
    (m, A), (r, _) = build(X), build(X_REF)
    return m, A, r


def dependent_values(m: ModelManifold) -> dict:
    return {
        "gamma2 damped": float(embedding_curvature(m, damping=1e-3).gamma2),
        "hessian trace": hessian_trace(m, Y, n_probes=30, generator=torch.Generator().manual_seed(0)).value,
        "hessian top eigenvalue": hessian_top_eigenvalue(m, Y),
        "fisher trace": fisher_trace(m),
        "fisher top eigenvalue": fisher_top_eigenvalue(m),
        "sam": sam_sharpness(m, Y, rho=0.05),
    }


@pytest.fixture(scope="module")
def reference():
    m, A, r = _two(plain)
    assert m.num_params < m.n * (m.num_outputs - 1)
    V = torch.cat(dropout_tangent_directions(m))
    V = torch.cat([V, torch.randint(0, 2, (4, V.shape[0]), generator=torch.Generator().manual_seed(5)).to(D64).mul(2).sub(1) @ V])
    return V, invariant_values(m, A, V, r), dependent_values(m)


def _close(a, b, tol=1e-8):
    a, b = torch.as_tensor(a, dtype=D64), torch.as_tensor(b, dtype=D64)
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max()) <= tol


@pytest.mark.parametrize("coords", ["c=0.1", "c=1", "c=10", "linear"])
def test_invariant_measures_do_not_depend_on_coordinates(reference, coords):
    V, ref, _ = reference
    m, A, r = _two(linear if coords == "linear" else (lambda x: rescaled(float(coords[2:]), x)))
    got = invariant_values(m, A, V, r)
    for k, v in ref.items():
        assert _close(got[k], v), (coords, k, got[k], v)


@pytest.mark.parametrize("coords", ["c=0.1", "c=10", "linear"])
def test_coordinate_dependent_measures_are_flagged_and_do_change(reference, coords):
    _, _, ref = reference
    m, _ = linear() if coords == "linear" else rescaled(float(coords[2:]))
    got = dependent_values(m)
    for k, v in ref.items():
        assert abs(got[k] - v) > 1e-3 * abs(v), (coords, k, got[k], v)  # far above rounding (1e-12)
    for name in (
        "embedding_curvature (damped)",
        "hessian_trace",
        "hessian_top_eigenvalue",
        "fisher_trace",
        "fisher_top_eigenvalue",
        "sam_sharpness",
    ):
        assert INVARIANCE[name] == "coordinate-dependent"
    for name in ("embedding_curvature (undamped)", "range_gamma2", "normal_curvatures", "noise_tangent_curvature"):
        assert INVARIANCE[name] == "invariant"
