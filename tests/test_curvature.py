"""Tests for dropgeom.curvature against closed forms and float64 brute force (tests/reference/curvature.py)."""

from __future__ import annotations

import copy

from typing import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from dropgeom import (
    ModelManifold,
    alpha_connection,
    embedding_curvature,
    normal_curvature,
    skewness_tensor,
    statistical_curvature,
)
from reference import curvature as ref

D64 = torch.float64


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------


def circle(rho: float, t0: float = 0.3) -> ModelManifold:
    """Bivariate normal, identity covariance, mean on a circle of radius rho: gamma^2 = 1/rho^2."""
    return ModelManifold.from_function(
        lambda th: rho * torch.stack([th.cos(), th.sin()], -1), torch.tensor([t0], dtype=D64), "gaussian"
    )


def normal_curve(c: float, theta: float, n: int = 1, reparam: Callable[[Tensor], Tensor] = lambda p: p):
    """N(theta, c theta^2) in the `normal` family, n identical observations."""

    def eta(phi: Tensor) -> Tensor:
        t = reparam(phi)
        row = torch.stack([1 / (c * t), -1 / (2 * c * t**2)], -1)
        return row.expand(n, 2)

    return ModelManifold.from_function(eta, torch.tensor([theta], dtype=D64), "normal")


def mlp_setting(family: str, act: type = nn.Tanh, seed: int = 0, n: int = 15, d: int = 3, h: int = 3):
    """A small float64 MLP manifold and the same map as a function of the flat parameters."""
    K = 3 if family == "categorical" else 2
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, h), act(), nn.Linear(h, K)).double()
    with torch.no_grad():
        net[0].weight.copy_(2 * torch.randn(h, d, generator=g))
        net[0].bias.copy_(torch.randn(h, generator=g))
        net[2].weight.copy_(torch.randn(K, h, generator=g) * (0.3 if family in ("poisson", "normal") else 1.0))
        net[2].bias.copy_(torch.tensor([0.0, -1.5]) if family == "normal" else torch.zeros(K))
    x = torch.randn(n, d, generator=g, dtype=D64)
    if family == "normal":
        # keep the second natural parameter negative: eta_2 = -softplus(.) - 0.1
        def forward(params, inputs):
            o = functional_call(net, params, inputs)
            return torch.stack([o[:, 0], -nn.functional.softplus(o[:, 1]) - 0.1], -1)

        m = ModelManifold(net, x, family, forward=forward)
    else:
        forward = None
        m = ModelManifold(net, x, family)
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def eta_fn(th: Tensor) -> Tensor:
        ps, i = {}, 0
        for k, s in zip(names, shapes):
            ps[k] = th[i : i + s.numel()].reshape(s)
            i += s.numel()
        return forward(ps, (x,)) if forward is not None else functional_call(net, ps, (x,))

    return m, eta_fn


_REF_CACHE = {}


def setting_and_ref(family: str, act: type = nn.Tanh):
    key = (family, act)
    if key not in _REF_CACHE:
        m, eta_fn = mlp_setting(family, act)
        _REF_CACHE[key] = (m, eta_fn, ref.build(eta_fn, m.theta, family))
    return _REF_CACHE[key]


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# --------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.5, 2.0, 7.0])
def test_circle_family(rho):
    m = circle(rho)
    assert statistical_curvature(m).item() == pytest.approx(1 / rho**2, rel=1e-12)
    res = embedding_curvature(m)
    assert res.gamma2.item() == pytest.approx(1 / rho**2, rel=1e-12)
    assert res.rank == 1 and res.normal_dim == 1 and res.stderr.item() == 0
    assert normal_curvature(m, torch.tensor([-3.0], dtype=D64)).item() == pytest.approx(1 / rho, rel=1e-12)
    # gaussian family: no skewness, every alpha gives the same value
    assert embedding_curvature(m, alpha=-1.0).gamma2.item() == pytest.approx(1 / rho**2, rel=1e-12)


@pytest.mark.parametrize("c,theta", [(0.5, 1.3), (2.0, -0.7), (0.1, 3.0)])
def test_normal_curve_closed_form(c, theta):
    expected = 2 * c**2 / (1 + 2 * c) ** 3
    assert statistical_curvature(normal_curve(c, theta)).item() == pytest.approx(expected, rel=1e-10)
    res = embedding_curvature(normal_curve(c, theta, n=5))
    # n observations: gamma_n^2 = gamma_1^2 / n, gamma2_per_sample = n gamma_n^2
    assert res.gamma2.item() == pytest.approx(expected / 5, rel=1e-10)
    assert res.gamma2_per_sample.item() == pytest.approx(expected, rel=1e-10)
    assert res.normal_dim == 9 and res.rank == 1


def test_normal_curve_m_and_alpha_against_reference():
    c, theta = 0.5, 1.3
    m = normal_curve(c, theta)
    r = ref.build(lambda t: torch.stack([1 / (c * t), -1 / (2 * c * t**2)], -1), m.theta, "normal")
    for alpha in (1.0, -1.0, 0.0, 2.5):
        assert embedding_curvature(m, alpha=alpha).gamma2.item() == pytest.approx(ref.gamma2(r, alpha).item(), rel=1e-10)


@pytest.mark.parametrize(
    "family,theta",
    [
        ("poisson", torch.tensor([0.1, -0.4, 1.0])),
        ("categorical", torch.tensor([0.3, -1.0, 0.5])),
        ("bernoulli", torch.tensor([0.2, 1.5])),
        ("normal", torch.tensor([0.4, -0.8])),
    ],
)
def test_full_exponential_family_is_flat(family, theta):
    m = ModelManifold.from_function(lambda th: th[None, :], theta.to(D64), family)
    for alpha in (1.0, -1.0, 0.3):
        res = embedding_curvature(m, alpha=alpha)
        assert res.normal_dim == 0
        assert abs(res.gamma2.item()) < 1e-20
    assert res.rank == (2 if family == "categorical" else theta.numel())


@pytest.mark.parametrize("family,K", [("categorical", 3), ("poisson", 2), ("bernoulli", 2), ("gaussian", 3)])
def test_canonical_glm_is_e_flat(family, K):
    torch.manual_seed(1)
    net = nn.Linear(5, K).double()
    with torch.no_grad():
        net.weight.mul_(0.5)
    m = ModelManifold(net, torch.randn(60, 5, dtype=D64), family)
    res = embedding_curvature(m)
    assert res.normal_dim > 0
    assert res.gamma2.item() < 1e-20
    v = torch.randn(m.num_params, dtype=D64)
    assert normal_curvature(m, v).item() < 1e-10
    assert normal_curvature(m, v, method="cg").item() < 1e-8
    est = embedding_curvature(m, method="stochastic", n_samples=8, generator=torch.Generator().manual_seed(0))
    assert est.gamma2.item() < 1e-12
    if family != "gaussian":  # canonical GLMs are e-flat but not m-flat
        assert embedding_curvature(m, alpha=-1.0).gamma2.item() > 1e-6


def test_m_flat_family_has_zero_m_curvature():
    # Poisson with identity link: the means x_i . theta are linear in theta (m-flat), the
    # natural parameters log(x_i . theta) are not (e-curved).
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, generator=g, dtype=D64) + 0.1

    def eta_fn(th: Tensor) -> Tensor:
        return torch.log(x @ th)[:, None]

    theta = torch.tensor([0.5, 1.0, 2.0], dtype=D64)
    m = ModelManifold.from_function(eta_fn, theta, "poisson")
    e = embedding_curvature(m, alpha=1.0).gamma2
    assert embedding_curvature(m, alpha=-1.0).gamma2.item() < 1e-20 * max(1.0, e.item())
    assert e.item() > 1e-3
    assert e.item() == pytest.approx(ref.gamma2(ref.build(eta_fn, theta, "poisson"), 1.0).item(), rel=1e-9)
    v = torch.tensor([1.0, -2.0, 0.5], dtype=D64)
    assert normal_curvature(m, v, alpha=-1.0).item() < 1e-10
    assert normal_curvature(m, v, alpha=1.0).item() > 1e-3


# --------------------------------------------------------------------------
# invariance
# --------------------------------------------------------------------------


def test_efron_reparametrisation_invariance():
    c, phi = 0.5, 1.1
    base = statistical_curvature(normal_curve(c, phi + 0.1 * phi**3))
    cubic = statistical_curvature(normal_curve(c, phi, reparam=lambda p: p + 0.1 * p**3))
    scaled = statistical_curvature(normal_curve(c, phi / 4.0, reparam=lambda p: 4.0 * p))
    assert cubic.item() == pytest.approx(base.item(), rel=1e-10)
    assert scaled.item() == pytest.approx(base.item(), rel=1e-10)


@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.4])
def test_embedding_curvature_reparametrisation_invariance(alpha):
    m, eta_fn = mlp_setting("categorical")
    P = m.num_params
    g = torch.Generator().manual_seed(3)
    phi0 = m.theta
    maps = {
        "cubic": (lambda p: p + 0.1 * p**3, phi0),
        "rescale": (lambda p: p * torch.linspace(0.5, 3.0, P, dtype=D64), phi0 / torch.linspace(0.5, 3.0, P, dtype=D64)),
    }
    A = torch.eye(P, dtype=D64) + 0.2 * torch.randn(P, P, generator=g, dtype=D64)
    maps["linear"] = (lambda p: A @ p, torch.linalg.solve(A, phi0))
    for name, (T, phi) in maps.items():
        theta = T(phi)
        base = embedding_curvature(m.at(theta), alpha=alpha).gamma2
        other = embedding_curvature(ModelManifold.from_function(lambda p: eta_fn(T(p)), phi, "categorical"), alpha=alpha)
        assert other.gamma2.item() == pytest.approx(base.item(), rel=1e-6), name


# --------------------------------------------------------------------------
# dense against the brute-force reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,act", [("categorical", nn.Tanh), ("gaussian", nn.Softplus), ("poisson", nn.Tanh), ("normal", nn.Softplus)]
)
def test_dense_against_reference(family, act):
    m, _, r = setting_and_ref(family, act)
    for alpha in (1.0, -1.0, 0.3):
        res = embedding_curvature(m, alpha=alpha)
        assert res.gamma2.item() == pytest.approx(ref.gamma2(r, alpha).item(), rel=1e-7)
        # normal components: equal up to null directions of G, G-orthogonal to range(J)
        N = ref.normal_vectors(r, alpha)
        diff = res.normal_components.reshape(N.shape) - N
        gdiff = torch.einsum("iab,ij,jab->", diff, r.G, diff)
        assert gdiff.item() <= 1e-12 * torch.einsum("iab,ij,jab->", N, r.G, N).item()
        ortho = torch.einsum("ip,ij,jab->pab", r.J, r.G, res.normal_components.reshape(N.shape))
        assert ortho.abs().max().item() < 1e-8 * N.abs().max().item()
    damped = embedding_curvature(m, alpha=-1.0, damping=1e-3)
    assert damped.gamma2.item() == pytest.approx(ref.gamma2(r, -1.0, damping=1e-3).item(), rel=1e-9)
    assert damped.damping == 1e-3 and damped.damping_abs > 0
    zero = embedding_curvature(m, alpha=-1.0, damping=0.0)
    assert zero.gamma2.item() == pytest.approx(embedding_curvature(m, alpha=-1.0).gamma2.item(), rel=1e-12)
    rank = int(torch.linalg.matrix_rank(r.g))
    assert res.rank == rank
    K = m.num_outputs
    assert res.normal_dim == m.n * (K - 1 if family == "categorical" else K) - rank


def test_alpha_connection_and_skewness_against_reference():
    m, eta_fn, r = setting_and_ref("poisson", nn.Tanh)
    for alpha in (1.0, -1.0, 0.3):
        assert rel(alpha_connection(m, alpha), ref.connection(r, alpha)) < 1e-10
    T = skewness_tensor(m)
    assert rel(T, ref.connection(r, -1.0) - ref.connection(r, 1.0)) < 1e-10
    assert rel(T, T.permute(1, 0, 2)) < 1e-12 and rel(T, T.permute(2, 1, 0)) < 1e-12


def test_connection_duality_with_metric_derivative():
    # d_a g_bc = Gamma^(alpha)_{ab,c} + Gamma^(-alpha)_{ac,b} (Amari's duality), d g by autograd.
    m, eta_fn = mlp_setting("bernoulli", nn.Softplus, n=6, d=2, h=2)
    dg = ref.metric_derivative(eta_fn, m.theta, "bernoulli")
    for alpha in (1.0, 0.5):
        lhs = alpha_connection(m, alpha) + alpha_connection(m, -alpha).permute(0, 2, 1)
        assert rel(lhs, dg) < 1e-10


def test_alpha_curvature_is_quadratic_in_alpha():
    m, _, _ = setting_and_ref("poisson", nn.Tanh)
    vals = {a: embedding_curvature(m, alpha=a).gamma2.item() for a in (1.0, -1.0, 0.0, 0.5, 3.0)}
    # gamma2(alpha) = |N_e + t Q|^2 with t = (1 - alpha)/2: fit on alpha in {1, -1, 0} and predict the rest
    e, mm, z = vals[1.0], vals[-1.0], vals[0.0]
    cross2 = 4 * z - 3 * e - mm  # 2<N_e, Q> ;  |Q|^2 = mm - e - cross2
    q2 = mm - e - cross2
    for a in (0.5, 3.0):
        t = (1 - a) / 2
        assert vals[a] == pytest.approx(e + t * cross2 + t * t * q2, rel=1e-9)
    assert q2 > 0  # the Poisson family has skewness: m- and e-curvature differ


def test_gaussian_family_alpha_independent_and_efron_agrees():
    m, _, r = setting_and_ref("gaussian", nn.Softplus)
    e = embedding_curvature(m).gamma2.item()
    assert embedding_curvature(m, alpha=-1.0).gamma2.item() == pytest.approx(e, rel=1e-12)
    # one-parameter curve through the network: Efron's formula = embedding curvature = reference
    v = torch.randn(m.num_params, dtype=D64)
    eta_fn = lambda t: m.eta(m.theta + t * v)  # noqa: E731
    curve = ModelManifold.from_function(eta_fn, torch.zeros(1, dtype=D64), "gaussian")
    s = statistical_curvature(curve).item()
    assert embedding_curvature(curve).gamma2.item() == pytest.approx(s, rel=1e-10)
    assert s == pytest.approx(ref.gamma2(ref.build(eta_fn, torch.zeros(1, dtype=D64), "gaussian")).item(), rel=1e-10)


@pytest.mark.parametrize("family", ["categorical", "poisson"])
def test_normal_curvature_against_reference(family):
    m, _, r = setting_and_ref(family, nn.Tanh)
    g = torch.Generator().manual_seed(5)
    v = torch.randn(m.num_params, generator=g, dtype=D64)
    for alpha in (1.0, -1.0):
        expected = ref.normal_curvature(r, v, alpha).item()
        assert normal_curvature(m, v, alpha).item() == pytest.approx(expected, rel=1e-9)
        assert normal_curvature(m, 3.0 * v, alpha, method="cg").item() == pytest.approx(expected, rel=1e-5)
    named = m.unflatten(v)
    assert normal_curvature(m, named).item() == pytest.approx(ref.normal_curvature(r, v, 1.0).item(), rel=1e-9)


# --------------------------------------------------------------------------
# stochastic estimator
# --------------------------------------------------------------------------


def test_stochastic_circle():
    g = torch.Generator().manual_seed(0)
    est = embedding_curvature(circle(2.0), method="stochastic", n_samples=4000, generator=g, batch_size=4000)
    assert abs(est.gamma2.item() - 0.25) < 4 * est.stderr.item()
    assert est.stderr.item() < 0.05 and est.normal_components is None and est.n_samples == 4000


@pytest.mark.parametrize("alpha,damping", [(1.0, None), (-1.0, None), (1.0, 1e-2)])
def test_stochastic_matches_dense(alpha, damping):
    m, _ = mlp_setting("categorical", n=12, d=2, h=2)
    exact = embedding_curvature(m, alpha=alpha, damping=damping).gamma2.item()
    g = torch.Generator().manual_seed(1)
    est = embedding_curvature(m, alpha=alpha, method="stochastic", n_samples=600, generator=g, damping=damping, batch_size=300)
    assert est.stderr.item() > 0
    assert abs(est.gamma2.item() - exact) < 4 * est.stderr.item()
    assert est.stderr.item() < 0.3 * exact  # the estimate is informative
    assert est.gamma2_per_sample.item() == pytest.approx(m.n * est.gamma2.item())


def test_stochastic_says_when_its_tangent_projection_did_not_converge(monkeypatch):
    """Capped conjugate gradients leave a tangent remainder in the projected vectors; it is orthogonal to the normal
    part, so gamma^2 comes out too large. The result carries the residual reached, and a ProjectionWarning says so;
    a converged projection reports a residual below the tolerance and warns nothing. (The matrix-free projection,
    as for a model too large for the dense one and for the Gram matrix.)"""
    import warnings

    from dropgeom.curvature import _tangent, embedding
    from dropgeom.curvature._common import ProjectionWarning, default_tol, projection_tolerance

    monkeypatch.setattr(embedding, "dense_projection_fits", lambda manifold: False)
    monkeypatch.setattr(_tangent, "MAX_GRAM_ROWS", 0)
    m, _ = mlp_setting("categorical", n=12, d=2, h=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProjectionWarning)
        good = embedding_curvature(m, method="stochastic", n_samples=8, generator=torch.Generator().manual_seed(1))
    assert good.projection_residual is not None and good.projection_residual <= projection_tolerance(default_tol(D64))
    assert good.solver == "cg"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*conjugate gradients stopped.*")  # the sampling solve's own
        with pytest.warns(ProjectionWarning, match="too large"):
            bad = embedding_curvature(
                m, method="stochastic", n_samples=8, generator=torch.Generator().manual_seed(1), cg_max_iter=1
            )
    assert bad.projection_residual > projection_tolerance(default_tol(D64))
    assert embedding_curvature(m).projection_residual is None  # dense: exact projection


def test_stochastic_projects_exactly_where_the_jacobian_is_small():
    """On a badly conditioned g conjugate gradients stop short (a tanh MLP 4-32-3 on 64 inputs: the estimate sat 15
    standard errors above the dense value); with the Jacobian in memory the projection is a dense SVD of S^T J and
    the damped estimate agrees with the dense method (residual reported as 0)."""
    torch.manual_seed(0)
    n, d, k = 64, 4, 3
    for width in (4, 8, 16, 32):  # the same models and draws as the measurement in docs/benchmarks.md
        net = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, k)).double()
        m = ModelManifold(net, torch.randn(n, d, dtype=D64), "categorical")
        if width != 32:
            continue
        exact = embedding_curvature(m, damping=1e-2).gamma2.item()
        est = embedding_curvature(
            m, method="stochastic", n_samples=64, generator=torch.Generator().manual_seed(0), batch_size=64, damping=1e-2
        )
        assert est.projection_residual == 0.0 and est.solver == "svd"
        assert abs(est.gamma2.item() - exact) < 4 * est.stderr.item()


def test_dense_sampling_solve_matches_the_metric():
    """The exact sampling solve of the stochastic estimator: ``(g + lambda I)^{-1} b`` and ``g^+ b`` from the SVD of
    ``S^T J`` against a dense solve with ``g`` assembled from the Jacobian, on a rank-deficient metric."""
    from dropgeom.curvature._common import range_basis, whitening
    from dropgeom.curvature._tangent import solve_dense as _solve_dense

    m, _ = mlp_setting("categorical", n=3, d=2, h=4)  # P > n (K - 1): g is singular
    _, S, _ = whitening(m)
    U, sv, V, jw = range_basis(m, S)
    g = jw.T @ jw
    b = torch.randn(m.num_params, 2, generator=torch.Generator().manual_seed(0), dtype=D64)
    lam = 0.3
    want = torch.linalg.solve(g + lam * torch.eye(m.num_params, dtype=D64), b)
    torch.testing.assert_close(_solve_dense(b, sv, V, lam), want, rtol=1e-10, atol=1e-12)
    in_range = jw.T @ torch.randn(jw.shape[0], 2, generator=torch.Generator().manual_seed(1), dtype=D64)
    torch.testing.assert_close(_solve_dense(in_range, sv, V, 0.0), torch.linalg.pinv(g) @ in_range, rtol=1e-8, atol=1e-10)
    assert V.shape[1] < m.num_params  # the singular case was exercised


def test_stochastic_is_reproducible_with_a_generator():
    m, _ = mlp_setting("poisson", n=8, d=2, h=2)
    a = embedding_curvature(m, method="stochastic", n_samples=6, generator=torch.Generator().manual_seed(7))
    b = embedding_curvature(m, method="stochastic", n_samples=6, generator=torch.Generator().manual_seed(7))
    assert a.gamma2.item() == b.gamma2.item()


def test_stochastic_draws_do_not_depend_on_the_dtype():
    """float32 and float64 runs from one seed use the same draws (made in float64, then cast): they agree to
    float32 rounding, so a float32 run on a GPU is checked against a float64 run on the CPU (bench/gpu_check.py).
    Drawn in each dtype, they differed by 20-50% at these sizes (torch draws float32 and float64 differently)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(60, 6)
    kw = dict(method="stochastic", alpha=-1.0, n_samples=4, batch_size=2, damping=0.1, cg_tol=1e-6)
    res = {
        dt: embedding_curvature(
            ModelManifold(copy.deepcopy(net).to(dt), x.to(dt)), generator=torch.Generator().manual_seed(0), **kw
        )
        for dt in (torch.float32, torch.float64)
    }
    a, b = res[torch.float32], res[torch.float64]
    assert a.gamma2.dtype == torch.float32
    assert a.gamma2.double().item() == pytest.approx(b.gamma2.item(), rel=1e-4)
    assert a.stderr.double().item() == pytest.approx(b.stderr.item(), rel=1e-3)


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------


def test_errors():
    m, _ = mlp_setting("poisson", n=8, d=2, h=2)
    with pytest.raises(ValueError, match="P = 1"):
        statistical_curvature(m)
    with pytest.raises(ValueError, match="P=.*entries"):
        normal_curvature(m, torch.ones(3, dtype=D64))
    with pytest.raises(ValueError, match="zero"):
        normal_curvature(m, torch.zeros(m.num_params, dtype=D64))
    bad = torch.ones(m.num_params, dtype=D64)
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        normal_curvature(m, bad)
    v = torch.ones(m.num_params, dtype=D64)
    with pytest.raises(ValueError, match=r"cg_tol must lie in \(0, 1\)"):  # accepted and used before
        normal_curvature(m, v, method="cg", cg_tol=2.0)
    with pytest.raises(ValueError, match="cg_max_iter must be a positive integer"):  # projected nothing out before
        normal_curvature(m, v, method="cg", cg_max_iter=0)
    with pytest.raises(ValueError, match="alpha"):
        embedding_curvature(m, alpha=float("inf"))
    with pytest.raises(ValueError, match="method"):
        embedding_curvature(m, method="exact")
    with pytest.raises(ValueError, match="damping"):
        embedding_curvature(m, damping=-1.0)
    with pytest.raises(ValueError, match="n_samples"):
        embedding_curvature(m, method="stochastic", n_samples=1)
    with pytest.raises(TypeError, match="ModelManifold"):
        embedding_curvature(torch.nn.Linear(2, 2))
    flat = ModelManifold.from_function(lambda th: (0 * th)[None, :].expand(3, 1), torch.ones(1, dtype=D64), "poisson")
    with pytest.raises(ValueError, match="Fisher information"):
        statistical_curvature(flat)


def test_too_large_for_dense_points_to_stochastic():
    big = nn.Linear(100, 20).double()  # P = 2020
    m = ModelManifold(big, torch.randn(4, 100, dtype=D64), "categorical")
    for fn in (lambda: embedding_curvature(m), lambda: alpha_connection(m), lambda: skewness_tensor(m)):
        with pytest.raises(ValueError, match="stochastic"):
            fn()
