"""New curvature and sharpness measures against float64 brute force (tests/reference/invariant.py) and closed forms."""

from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.func import functional_call

from dropgeom import ModelManifold, embedding_curvature
from dropgeom.curvature import (
    dropout_mixture_manifold,
    dropout_tangent_directions,
    fisher_top_eigenvalue,
    fisher_trace,
    hessian_top_eigenvalue,
    hessian_trace,
    natural_gradient_curvature,
    natural_gradient_direction,
    noise_tangent_curvature,
    normal_curvatures,
    range_gamma2,
    sam_sharpness,
)
from reference import curvature as ref
from reference import invariant as iref

D64 = torch.float64


def mlp(seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(2, 2), nn.Tanh(), nn.Dropout(0.3), nn.Linear(2, 2), nn.Tanh(), nn.Dropout(0.3), nn.Linear(2, 3)
    ).double()
    # P = 21 < n (K - 1) = 32: a proper normal space
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D64))
    x = torch.randn(n, 2, generator=g, dtype=D64)
    y = torch.randint(0, 3, (n,), generator=g)
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def unflat(th):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            out[k] = th[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    net.eval()
    return net, x, y, (lambda th: functional_call(net, unflat(th), (x,))), unflat


@pytest.fixture(scope="module")
def setting():
    net, x, y, eta_fn, unflat = mlp()
    m = ModelManifold(net, x)
    return net, x, y, eta_fn, unflat, m, ref.build(eta_fn, m.theta, "categorical")


@pytest.mark.parametrize("alpha", [1.0, -1.0])
@pytest.mark.parametrize("method", ["dense", "cg"])
def test_normal_curvatures_against_reference(setting, alpha, method):
    *_, m, R = setting
    V = torch.cat(
        [
            torch.cat(dropout_tangent_directions(m)),
            torch.randn(3, m.num_params, generator=torch.Generator().manual_seed(4), dtype=D64),
        ]
    )
    got = normal_curvatures(m, V, alpha, method=method)
    want = torch.stack([ref.normal_curvature(R, v / v.norm(), alpha) for v in V])
    assert torch.allclose(got, want, rtol=1e-7, atol=1e-12)  # e-flat directions: rounding level vs 0


def test_natural_gradient_against_reference(setting):
    _, _, y, eta_fn, _, m, R = setting
    v = natural_gradient_direction(m, y)
    want = iref.natural_gradient_direction(eta_fn, m.theta, "categorical", y)
    jv, jw = m.jvp(v), m.jvp(want)
    assert float((jv - jw).abs().max() / jw.abs().max()) < 1e-7  # J v is unique; g is badly conditioned here
    for alpha in (1.0, -1.0):
        k = natural_gradient_curvature(m, y, alpha)
        assert float(k) == pytest.approx(float(ref.normal_curvature(R, want / want.norm(), alpha)), rel=1e-6)
    # matrix-free direction agrees
    jc = m.jvp(natural_gradient_direction(m, y, method="cg"))
    assert float((jc - jv).abs().max() / jv.abs().max()) < 1e-5


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_regularised_natural_gradient_against_reference(setting, method):
    net, x, y, eta_fn, unflat, m, R = setting
    xr = torch.randn(20, 2, generator=torch.Generator().manual_seed(11), dtype=D64)
    mr = ModelManifold(net, xr)

    def ref_fn(th):
        return functional_call(net, unflat(th), (xr,))

    for w in (0.3, 1.0):
        want = iref.regularised_natural_gradient_direction(eta_fn, ref_fn, m.theta, "categorical", y, w)
        v = natural_gradient_direction(m, y, reference=mr, reference_weight=w, method=method)
        # unique up to the softmax gauge (3 exact null directions of both Fishers, which move no probability)
        jv, jw = m.jvp(v), m.jvp(want)
        jv, jw = jv - jv.mean(-1, keepdim=True), jw - jw.mean(-1, keepdim=True)
        assert float((jv - jw).abs().max() / jw.abs().max()) < (1e-5 if method == "cg" else 1e-7)
        for alpha in (1.0, -1.0):
            k = natural_gradient_curvature(m, y, alpha, reference=mr, reference_weight=w, method=method)
            assert float(k) == pytest.approx(float(ref.normal_curvature(R, want / want.norm(), alpha)), rel=1e-6)
    # better conditioned than the plain direction (the point of the regulariser)
    plain = natural_gradient_direction(m, y)
    assert float(natural_gradient_direction(m, y, reference=mr).norm()) < float(plain.norm())


def test_range_gamma2_against_reference(setting):
    *_, m, R = setting
    for alpha in (1.0, -1.0, 0.5):
        want = float(ref.gamma2(R, alpha))  # g^+ by eigh vs the SVD of S^T J: ~1e-8 apart on this badly conditioned g
        got = float(range_gamma2(m, alpha))
        assert got == pytest.approx(want, rel=1e-6)
        assert got == pytest.approx(float(embedding_curvature(m, alpha=alpha).gamma2), rel=1e-9)  # same basis, no [P, P] tensor
        assert float(range_gamma2(m, alpha, block_bytes=1)) == pytest.approx(got, rel=1e-10)  # one direction per block


def test_range_gamma2_on_a_parameter_subset_and_the_circle():
    net, x, *_ = mlp()
    names = ["0.weight", "0.bias"]
    sub = ModelManifold(net, x, param_names=names)
    assert float(range_gamma2(sub)) == pytest.approx(float(embedding_curvature(sub).gamma2), rel=1e-8)
    rho = 3.0  # closed form: a circle of radius rho has gamma^2 = 1 / rho^2
    c = ModelManifold.from_function(
        lambda th: rho * torch.stack([th.cos(), th.sin()], -1), torch.tensor([0.4], dtype=D64), "gaussian"
    )
    assert float(range_gamma2(c)) == pytest.approx(1 / rho**2, rel=1e-12)
    # the range of J fills the output space (n (K-1) <= P): no normal space, gamma^2 = 0
    assert float(range_gamma2(ModelManifold(net, x[:3]))) < 1e-20


def test_noise_tangent_is_the_mean_over_rademacher_combinations(setting):
    *_, m, R = setting
    D = torch.cat(dropout_tangent_directions(m))
    g = torch.Generator().manual_seed(7)
    got = noise_tangent_curvature(m, n_draws=5, generator=torch.Generator().manual_seed(7))
    xi = torch.randint(0, 2, (5, D.shape[0]), generator=g).to(D64) * 2 - 1
    want = torch.stack([ref.normal_curvature(R, (v / v.norm()), 1.0) for v in xi @ D]).mean()
    assert float(got) == pytest.approx(float(want), rel=1e-7)


def test_mask_before_linear_output_is_e_flat_closed_form():
    net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Dropout(0.5), nn.Linear(2, 2)).double()
    m = ModelManifold(net, torch.randn(16, 2, dtype=D64))  # P = 12 < n (K - 1) = 16
    D = dropout_tangent_directions(m)[0]
    assert float(normal_curvatures(m, D).abs().max()) == 0.0
    assert float(normal_curvatures(m, D, alpha=-1.0).min()) > 0  # but not m-flat


def test_sharpness_against_dense_reference(setting):
    _, _, y, eta_fn, _, m, _ = setting
    H = iref.loss_hessian(eta_fn, m.theta, "categorical", y)
    est = hessian_trace(m, y, n_probes=400, generator=torch.Generator().manual_seed(0))
    assert abs(est.value - float(torch.trace(H))) < 4 * est.stderr
    assert hessian_top_eigenvalue(m, y, tol=1e-10) == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-7)
    F = iref.fisher_mean(eta_fn, m.theta, "categorical")
    assert fisher_trace(m) == pytest.approx(float(torch.trace(F)), rel=1e-10)
    assert fisher_top_eigenvalue(m) == pytest.approx(float(torch.linalg.eigvalsh(F)[-1]), rel=1e-8)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=D64)  # L = (th1^2 + 9 th2^2) / 4: tr H = 5, exact for +-1 probes
    m = ModelManifold.from_function(lambda th: (x @ th)[:, None], torch.tensor([0.2, -0.1], dtype=D64), "gaussian")
    est = hessian_trace(m, torch.zeros(2, 1, dtype=D64), n_probes=3)
    assert est.value == pytest.approx(5.0, rel=1e-12) and est.stderr == pytest.approx(0.0, abs=1e-12)


def test_sam_against_brute_force_on_the_circle():
    x = torch.tensor([[1.0, 0.5], [0.3, -1.0], [2.0, 0.1]], dtype=D64)
    y = torch.tensor([0, 1, 0])

    def eta_fn(th):  # a 2-parameter categorical model with a curved loss
        z = torch.tanh(x @ th)
        return torch.stack([z, -z, 0.5 * z**2], -1)

    th = torch.tensor([0.7, -0.4], dtype=D64)
    m = ModelManifold.from_function(eta_fn, th, "categorical")
    rho = 0.3
    want = iref.sam_on_circle(eta_fn, th, "categorical", y, rho * float(th.norm()))
    got = sam_sharpness(m, y, rho=rho, steps=50)
    assert got <= want + 1e-9 and got == pytest.approx(want, rel=1e-6)  # the grid misses the maximum by ~1e-11
    assert sam_sharpness(m, y, rho=rho, steps=0) <= got + 1e-15  # more ascent never lowers the estimate


def _glm_net(w, b, p):
    net = nn.Sequential(nn.Dropout(p), nn.Linear(w.numel(), 1)).double()
    with torch.no_grad():
        net[1].weight.copy_(w[None])
        net[1].bias.copy_(b)
    return net


def test_glm_input_dropout_mixture_closed_form():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, generator=g, dtype=D64), torch.randn(1, generator=g, dtype=D64)
    x = torch.randn(12, 3, generator=g, dtype=D64)
    # the e-mixture of an input-dropout GLM is the GLM itself: e-flat
    e = dropout_mixture_manifold(_glm_net(w, b, 0.2), x, "bernoulli", kind="e")
    assert float(embedding_curvature(e).gamma2) < 1e-20
    # the m-mixture bends at order p (input dropout is a rare jump): gamma^2 / p^2 -> the closed-form coefficient
    limit = float(iref.glm_input_dropout_limit(w, b, x))
    assert limit > 0
    errs = []
    for p in (1e-4, 1e-5):
        mm = dropout_mixture_manifold(_glm_net(w, b, p), x, "bernoulli", kind="m")
        errs.append(float(embedding_curvature(mm).gamma2) / p**2 / limit - 1)
    assert abs(errs[0]) < 5e-3 and abs(errs[1]) < 5e-4
    assert 5 < errs[0] / errs[1] < 20  # the O(p) remainder: ten times smaller at a tenth of p


def test_common_random_masks_converge_to_exact():
    net, x, *_ = mlp(seed=1, n=6)
    net[5].p = 0.0
    ex = dropout_mixture_manifold(net, x, p=0.2, layers=["2"]).eta()
    mc = dropout_mixture_manifold(net, x, p=0.2, layers=["2"], masks=4000, generator=torch.Generator().manual_seed(0)).eta()
    assert torch.allclose(ex, mc, atol=0.05)


@pytest.mark.parametrize("other,kind", [(nn.AlphaDropout(0.2), "alpha"), (nn.FeatureAlphaDropout(0.2), "feature_alpha")])
def test_mixture_manifold_refuses_dropout_it_cannot_average(other, kind):
    """Alpha dropout (an affine mask law, theory.md 4.5) is not a multiplicative mask: the mixture manifold must
    not silently evaluate it in eval mode; naming the nn.Dropout layers takes the mixture over those alone."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Dropout(0.3), other, nn.Linear(3, 2)).double()
    x = torch.randn(4, 2, dtype=D64)
    with pytest.raises(ValueError, match=rf"'3' \({kind}\).*layers=\[\.\.\.\]"):
        dropout_mixture_manifold(net, x)
    only = dropout_mixture_manifold(net, x, kind="e", layers=["2"])
    net.eval()  # the e-mixture over the linear-fed nn.Dropout alone is weight scaling; alpha dropout acts as in eval mode
    assert torch.allclose(only.eta(), net(x))


def test_errors():
    net, x, y, *_ = mlp()
    m = ModelManifold(net, x)
    with pytest.raises(ValueError, match="rho must be"):
        sam_sharpness(m, y, rho=0.0)
    with pytest.raises(ValueError, match="rho must be"):
        sam_sharpness(m, y, rho=-1.0)
    plain = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    with pytest.raises(ValueError, match="needs a model with dropout"):
        dropout_mixture_manifold(plain, x)
    with pytest.raises(ValueError, match="p = 0"):
        dropout_mixture_manifold(net, x, p=0.0)
    with pytest.raises(ValueError, match="m-mixture of 'gaussian'"):
        dropout_mixture_manifold(net, x, "gaussian", kind="m")
    with pytest.raises(ValueError, match="kind must be"):
        dropout_mixture_manifold(net, x, kind="alpha")
    with pytest.raises(ValueError, match="masks must be"):
        dropout_mixture_manifold(net, x, masks=0)
    with pytest.raises(ValueError, match="no nn.Dropout layer followed"):
        dropout_tangent_directions(ModelManifold(plain, x))
    with pytest.raises(ValueError, match="nn.Sequential"):
        noise_tangent_curvature(ModelManifold.from_function(lambda th: th[None, :], torch.zeros(2, dtype=D64), "gaussian"))
    with pytest.raises(ValueError, match="not a free parameter"):
        dropout_tangent_directions(ModelManifold(net, x, param_names=["0.weight"]))
    with pytest.raises(ValueError, match="directions must be"):
        normal_curvatures(m, torch.zeros(3, dtype=D64))
    with pytest.raises(ValueError, match="zero"):
        normal_curvatures(m, torch.zeros(1, m.num_params, dtype=D64))
    with pytest.raises(ValueError, match="n_probes"):
        hessian_trace(m, y, n_probes=1)
    with pytest.raises(TypeError):
        hessian_trace(object(), y)
    with pytest.raises(TypeError, match="reference must be a ModelManifold"):
        natural_gradient_direction(m, y, reference=x)
    with pytest.raises(ValueError, match="reference_weight"):
        natural_gradient_direction(m, y, reference=m, reference_weight=0.0)
    with pytest.raises(ValueError, match="same model at the same parameters"):
        natural_gradient_direction(m, y, reference=ModelManifold(mlp(seed=5)[0], x))
    with pytest.raises(ValueError, match="rcond"):
        range_gamma2(m, rcond=2.0)
