"""Exponential families against autograd of closed-form log-partitions and torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch

from dropgeom.families import Gaussian, get_family
from reference import dense as ref

D64 = torch.float64

# name, family object, sigma (for the reference), output width K
FAMILY_TABLE = [
    ("categorical", "categorical", 1.0, 4),
    ("bernoulli", "bernoulli", 1.0, 3),
    ("gaussian", "gaussian", 1.0, 2),
    ("gaussian_s2", Gaussian(sigma=2.0), 2.0, 2),
    ("gaussian_s03", Gaussian(sigma=0.3), 0.3, 1),
    ("poisson", "poisson", 1.0, 3),
    ("normal", "normal", 1.0, 2),
]
IDS = [row[0] for row in FAMILY_TABLE]


def _base(name: str) -> str:
    return name.split("_")[0]


def _eta(name: str, n: int, k: int, dtype=D64, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    eta = scale * torch.randn(n, k, generator=g, dtype=D64)
    if _base(name) == "normal":
        eta[:, 1] = -0.2 - eta[:, 1].abs()  # eta_2 = -1/(2 s2) < 0
    return eta.to(dtype)


def _targets(name: str, eta: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Valid targets drawn independently of dropgeom (torch.distributions)."""
    base = _base(name)
    sigma = dict((r[0], r[2]) for r in FAMILY_TABLE)[name]
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    y = ref.torch_distribution(base, eta, sigma).sample()
    if base == "categorical":
        return y.long()
    return y.to(eta.dtype)


@pytest.mark.parametrize("name,family,sigma,k", FAMILY_TABLE, ids=IDS)
def test_log_partition_and_derivatives_match_autograd(name, family, sigma, k):
    fam = get_family(family)
    base = _base(name)
    eta = _eta(name, 5, k)
    A, dA, d2A, d3A = ref.family_derivatives(base, eta, sigma)
    torch.testing.assert_close(fam.log_partition(eta), A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fam.mean(eta), dA, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fam.cov(eta), d2A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fam.cov(eta), ref.closed_form_cov(base, eta, sigma), rtol=1e-12, atol=1e-12)
    # cov_mv: every column of the covariance
    for j in range(k):
        e = torch.zeros(5, k, dtype=D64)
        e[:, j] = 1
        torch.testing.assert_close(fam.cov_mv(eta, e), d2A[:, :, j], rtol=1e-12, atol=1e-12)
    # square root
    S = fam.cov_sqrt(eta)
    assert S.shape[:2] == (5, k) and S.shape[2] == fam.rank(k)
    torch.testing.assert_close(S @ S.transpose(1, 2), d2A, rtol=1e-12, atol=1e-12)
    # third cumulant contracted with random u, v
    u, v = torch.randn(5, k, dtype=D64), torch.randn(5, k, dtype=D64)
    expect = torch.einsum("nabc,nb,nc->na", d3A, u, v)
    torch.testing.assert_close(fam.third_cumulant(eta, u, v), expect, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fam.third_cumulant(eta, v, u), expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,family,sigma,k", FAMILY_TABLE, ids=IDS)
def test_nll_matches_torch_distributions(name, family, sigma, k):
    fam = get_family(family)
    base = _base(name)
    eta = _eta(name, 7, k)
    y = _targets(name, eta, torch.Generator().manual_seed(1))
    fam.check_targets(y, 7, k)
    torch.testing.assert_close(fam.nll(eta, y), ref.torch_distribution_nll(base, eta, y, sigma), rtol=1e-12, atol=1e-12)
    # NLL = A(eta) - <eta, t(y)> - log h(y): its eta-gradient is the residual mu - t(y)
    eta_g = eta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fam.nll(eta_g, y).sum(), eta_g)
    t = ref.sufficient_statistic(base, y, k)
    torch.testing.assert_close(fam.residual(eta, y), grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fam.sufficient_statistic(y, k).to(D64), t)


@pytest.mark.parametrize("name,family,sigma,k", FAMILY_TABLE, ids=IDS)
def test_kl_matches_torch_distributions_and_closed_form(name, family, sigma, k):
    fam = get_family(family)
    base = _base(name)
    eta, eta2 = _eta(name, 6, k), _eta(name, 12, k)[6:]
    A, dA, _, _ = ref.family_derivatives(base, eta, sigma)
    A2, _, _, _ = ref.family_derivatives(base, eta2, sigma)
    closed = A2 - A - (dA * (eta2 - eta)).sum(-1)
    kl = fam.kl(eta, eta2)
    torch.testing.assert_close(kl, closed, rtol=1e-10, atol=1e-12)
    p, q = ref.torch_distribution(base, eta, sigma), ref.torch_distribution(base, eta2, sigma)
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(p, q), rtol=1e-10, atol=1e-12)
    assert (kl >= 0).all()
    torch.testing.assert_close(fam.kl(eta, eta), torch.zeros(6, dtype=D64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,family,sigma,k", FAMILY_TABLE, ids=IDS)
def test_sample_moments_converge(name, family, sigma, k):
    """Mean and covariance of ``t(yhat)`` over M seeded draws, within z standard errors."""
    fam = get_family(family)
    base = _base(name)
    eta = _eta(name, 3, k, scale=0.7)
    M = 4000
    g = torch.Generator().manual_seed(7)
    t = torch.stack([fam.sufficient_statistic(fam.sample(eta, generator=g), k).to(D64) for _ in range(M)])  # [M, n, K]
    _, mu, cov, _ = ref.family_derivatives(base, eta, sigma)
    z = ref.gaussian_tolerance_sigma()
    se = (torch.diagonal(cov, dim1=1, dim2=2) / M).sqrt()
    assert ((t.mean(0) - mu).abs() <= z * se + 1e-12).all()
    # covariance entries: the standard error of the mean of the products, estimated from the draws
    c = t - mu
    prods = torch.einsum("mna,mnb->mnab", c, c)
    se2 = prods.std(0) / math.sqrt(M)
    assert ((prods.mean(0) - cov).abs() <= z * se2 + 1e-12).all()
    # the draw is in the target format and reproducible from the generator
    y1 = fam.sample(eta, generator=torch.Generator().manual_seed(3))
    y2 = fam.sample(eta, generator=torch.Generator().manual_seed(3))
    assert torch.equal(y1, y2)
    fam.check_targets(y1, 3, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["categorical", "bernoulli"])
def test_extreme_logits_are_finite(name, dtype):
    fam = get_family(name)
    eta = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [3e4, 2e4, -5e4]], dtype=dtype)
    k = 3
    y = torch.tensor([1, 0, 2]) if name == "categorical" else torch.tensor([[0.0, 1.0, 1.0]] * 3, dtype=dtype)
    mu = fam.mean(eta)
    for out in (
        fam.log_partition(eta),
        mu,
        fam.cov(eta),
        fam.cov_sqrt(eta),
        fam.nll(eta, y),
        fam.cov_mv(eta, torch.ones_like(eta)),
        fam.third_cumulant(eta, torch.ones_like(eta), torch.ones_like(eta)),
        fam.kl(eta, eta.flip(0)),
        fam.kl(eta, eta),
        fam.residual(eta, y),
    ):
        assert torch.isfinite(out).all(), out
    assert (mu >= 0).all() and (mu <= 1).all()
    assert (fam.nll(eta, y) >= 0).all()
    assert (fam.kl(eta, eta.flip(0)) >= 0).all()
    torch.testing.assert_close(fam.kl(eta, eta), torch.zeros(3, dtype=dtype))
    # float64 reference: nll and KL from torch.distributions
    e64 = eta.to(D64)
    torch.testing.assert_close(fam.nll(eta, y).to(D64), ref.torch_distribution_nll(name, e64, y), rtol=1e-5, atol=1e-3)
    # (torch.distributions' Bernoulli KL itself overflows to inf here; the reference uses log-probabilities)
    torch.testing.assert_close(fam.kl(eta, eta.flip(0)).to(D64), ref.log_prob_kl(name, e64, e64.flip(0)), rtol=1e-5, atol=1e-3)
    w = torch.linalg.eigvalsh(fam.cov(eta).to(D64))
    assert (w >= -1e-6).all()
    assert k == eta.shape[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_poisson_large_and_small_log_rates(dtype):
    fam = get_family("poisson")
    eta = torch.tensor([[60.0, -60.0], [-1e4, 0.0]], dtype=dtype)
    y = torch.tensor([[3.0, 0.0], [0.0, 2.0]], dtype=dtype)
    for out in (fam.log_partition(eta), fam.mean(eta), fam.cov(eta), fam.cov_sqrt(eta), fam.nll(eta, y), fam.kl(eta, eta)):
        assert torch.isfinite(out).all()
    torch.testing.assert_close(
        fam.nll(eta, y).to(D64), ref.torch_distribution_nll("poisson", eta.to(D64), y), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("e2", [-1e-3, -1e-6, -1e6])
def test_normal_near_boundary_is_finite(dtype, e2):
    """``eta_2 -> 0^-`` (huge variance) and very negative ``eta_2`` (tiny variance)."""
    fam = get_family("normal")
    eta = torch.tensor([[0.5 * abs(e2) ** 0.5, e2], [-0.3 * abs(e2) ** 0.5, e2]], dtype=dtype)
    y = torch.tensor([0.1, -2.0], dtype=dtype)
    outs = [fam.log_partition(eta), fam.mean(eta), fam.cov_sqrt(eta), fam.nll(eta, y), fam.kl(eta, eta), fam.residual(eta, y)]
    if e2 > -1e-5 and dtype == torch.float32:
        pass  # the covariance itself is ~1e12: representable, checked below in float64 terms
    outs.append(fam.cov(eta))
    for out in outs:
        assert torch.isfinite(out).all(), out
    torch.testing.assert_close(
        fam.nll(eta, y).to(D64), ref.torch_distribution_nll("normal", eta.to(D64), y), rtol=1e-4, atol=1e-4
    )
    S = fam.cov_sqrt(eta).to(D64)
    C = ref.closed_form_cov("normal", eta.to(D64))
    torch.testing.assert_close(S @ S.transpose(1, 2), C, rtol=1e-4, atol=0.0)


# -- validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name,k,y,msg",
    [
        ("categorical", 3, torch.tensor([0, 1]), r"shape \[n\]"),
        ("categorical", 3, torch.tensor([0.0, 1.0, 2.0]), "integer class indices"),
        ("categorical", 3, torch.tensor([0, 3, 1]), r"\[0, 2\]"),
        ("categorical", 3, torch.tensor([0, -1, 1]), r"\[0, 2\]"),
        ("categorical", 3, torch.tensor([True, False, True]), "integer"),
        ("bernoulli", 2, torch.zeros(3, 3), r"shape \[n, K\]"),
        ("bernoulli", 2, torch.zeros(3, 2, dtype=torch.long), "floating-point"),
        ("bernoulli", 2, torch.full((3, 2), 2.0), r"\[0, 1\]"),
        ("bernoulli", 2, torch.full((3, 2), float("nan")), "non-finite"),
        ("gaussian", 2, torch.zeros(3), r"shape \[n, K\]"),
        ("gaussian", 2, torch.full((3, 2), float("inf")), "non-finite"),
        ("poisson", 2, -torch.ones(3, 2), "non-negative"),
        ("poisson", 2, torch.full((3, 2), 0.5), "integer counts"),
        ("normal", 2, torch.zeros(3, 2), r"\[n\] or \[n, 1\]"),
        ("normal", 2, torch.zeros(3, dtype=torch.long), "floating point"),
        ("normal", 2, torch.tensor([0.0, float("nan"), 1.0]), "non-finite"),
    ],
)
def test_target_validation_names_the_problem(name, k, y, msg):
    with pytest.raises(ValueError, match=msg):
        get_family(name).check_targets(y, 3, k)


def test_targets_must_be_tensors():
    with pytest.raises(TypeError, match="torch.Tensor"):
        get_family("gaussian").check_targets([[0.0]], 1, 1)


@pytest.mark.parametrize("name,k", [("categorical", 1), ("normal", 1), ("normal", 3), ("bernoulli", 0)])
def test_width_validation(name, k):
    with pytest.raises(ValueError, match="K=|width"):
        get_family(name).check_width(k)


def test_normal_rejects_nonnegative_second_parameter():
    with pytest.raises(ValueError, match="negative"):
        get_family("normal").check_eta(torch.tensor([[0.0, 0.0]]))


def test_eta_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"\[n, K\]"):
        get_family("bernoulli").check_eta(torch.zeros(3))


def test_get_family_errors_and_sigma():
    with pytest.raises(ValueError, match="unknown family"):
        get_family("gamma")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma"):
            Gaussian(sigma=bad)
    assert get_family("Categorical").name == "categorical"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["categorical", "bernoulli"])
def test_kl_between_nearby_extreme_logits_has_no_cancellation(name, dtype):
    """``A(eta2) - A(eta) - <mu, eta2 - eta>`` cancels catastrophically at logits ~1e4;
    the KL must stay non-negative and accurate to float resolution of the KL itself."""
    fam = get_family(name)
    eta = torch.tensor([[1e4, 0.0, -1e4], [2e3, 2e3 + 0.5, -3e3]], dtype=dtype)
    eta2 = eta + torch.tensor([[0.3, 0.1, -0.2], [0.7, -0.4, 0.0]], dtype=dtype)
    kl = fam.kl(eta, eta2)
    expect = ref.log_prob_kl(name, eta, eta2)
    assert (kl >= 0).all(), kl
    torch.testing.assert_close(kl.to(D64), expect, rtol=1e-4, atol=1e-6)


# -- the family-specific building blocks (reduced root, column norms, shifted KL, mixtures) --
def _generic(fam, method: str):
    """The base class's generic implementation of ``method``, bound to ``fam`` (the oracle)."""
    from dropgeom.families import ExponentialFamily

    return getattr(ExponentialFamily, method).__get__(fam)


@pytest.mark.parametrize("name,family,sigma,k", FAMILY_TABLE, ids=IDS)
def test_reduced_cov_sqrt_is_a_root_with_fewest_columns(name, family, sigma, k):
    fam = get_family(family)
    eta = _eta(name, 6, k, scale=2.0)
    s = fam.reduced_cov_sqrt(eta)
    torch.testing.assert_close(s @ s.transpose(1, 2), ref.closed_form_cov(_base(name), eta, sigma), rtol=1e-12, atol=1e-13)
    assert s.shape[-1] == (k - 1 if _base(name) == "categorical" else k)
    assert torch.equal(fam.cov_sqrt_with_mean(eta, fam.mean(eta)), fam.cov_sqrt(eta))  # same arithmetic


@pytest.mark.parametrize("name,family,sigma,k", FAMILY_TABLE, ids=IDS)
def test_column_cov_norms_and_shifted_kl_match_brute_force(name, family, sigma, k):
    fam = get_family(family)
    n, u = 5, 4
    eta = _eta(name, n, k)
    g = torch.Generator().manual_seed(7)
    w = 0.3 * torch.randn(k, u, generator=g, dtype=D64)
    h = torch.rand(n, u, generator=g, dtype=D64)
    if _base(name) == "normal":
        w[1] = w[1].abs()  # the shifted eta_2 - h w_2 stays negative
    cov = ref.closed_form_cov(_base(name), eta, sigma)
    brute = torch.stack([h[:, j] ** 2 * torch.einsum("a,nab,b->n", w[:, j], cov, w[:, j]) for j in range(u)], 1)
    for mean in (None, fam.mean(eta)):
        torch.testing.assert_close(fam.column_cov_norms(eta, w, h, mean), brute, rtol=1e-12, atol=1e-14)
    kl = torch.stack([fam.kl(eta, eta - h[:, j : j + 1] * w[:, j]) for j in range(u)], 1)
    for mean in (None, fam.mean(eta)):
        torch.testing.assert_close(fam.kl_to_shifted(eta, w, h, mean), kl, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(_generic(fam, "kl_to_shifted")(eta, w, h), kl, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name,family,sigma,k", FAMILY_TABLE, ids=IDS)
@pytest.mark.parametrize("scale", [0.3, 30.0, 300.0], ids=["small", "large", "overflow"])
def test_kl_to_each_matches_pairwise_kl(name, family, sigma, k, scale):
    fam = get_family(family)
    eta = _eta(name, 4, k)
    others = torch.stack([_eta(name, 4, k, scale=1.0) * (1 + 0.1 * i) for i in range(3)])
    if _base(name) == "categorical":  # large logit gaps exercise the overflow fallback (max x >= 50)
        others = eta + scale * (others - eta)
    ref_kl = torch.stack([fam.kl(eta, o) for o in others])
    got = fam.kl_to_each(eta, others)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, ref_kl, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(fam.kl_to_each(eta, others, fam.mean(eta)), got, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_categorical_kl_to_shifted_survives_shifts_whose_exp_overflows(dtype):
    """Dropping a unit can move the logits by hundreds (large weights, large activations): the closed form for the
    layer before the output then takes the log-softmax form instead of ``exp`` of the shift (which gave inf)."""
    fam = get_family("categorical")
    g = torch.Generator().manual_seed(2)
    eta = torch.randn(3, 4, generator=g, dtype=torch.float64)
    w = 2000.0 * torch.randn(4, 5, generator=g, dtype=torch.float64)  # |x| in the thousands: exp overflows in float64 too
    h = torch.rand(3, 5, generator=g, dtype=torch.float64)
    kl = torch.stack([fam.kl(eta, eta - h[:, j : j + 1] * w[:, j]) for j in range(5)], 1)
    got = fam.kl_to_shifted(eta.to(dtype), w.to(dtype), h.to(dtype))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), kl, rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=1e-3)


@pytest.mark.parametrize("name,family,sigma,k", FAMILY_TABLE, ids=IDS)
@pytest.mark.parametrize("scale", [0.3, 30.0], ids=["small", "overflow"])
def test_kl_shift_matches_pairwise_kl_value_and_gradient(name, family, sigma, k, scale):
    """``kl_shift`` (the exact divergence form's ``[n, K, U]`` shifts) against ``kl`` of each shifted parameter,
    value and gradient (in ``eta`` and the shifts), in float64; large shifts take the overflow fallback."""
    fam = get_family(family)
    n, u = 4, 3
    eta = _eta(name, n, k).requires_grad_()
    g = torch.Generator().manual_seed(3)
    shift = 0.2 * torch.randn(n, k, u, generator=g, dtype=D64)
    if _base(name) == "normal":
        shift[:, 1] = -shift[:, 1].abs()  # eta_2 + shift stays negative
    elif _base(name) == "categorical":
        shift = scale * shift
    shift.requires_grad_()
    ref_kl = torch.stack([fam.kl(eta, eta + shift[:, :, j]) for j in range(u)], 1)
    got = fam.kl_shift(eta, shift)
    assert got.shape == (n, u)
    torch.testing.assert_close(got, ref_kl, rtol=1e-9, atol=1e-13)
    weights = torch.rand(n, u, generator=g, dtype=D64)
    want = torch.autograd.grad((ref_kl * weights).sum(), (eta, shift))
    have = torch.autograd.grad((got * weights).sum(), (eta, shift))
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(fam.kl_shift(eta, shift, fam.mean(eta)), got, rtol=0, atol=0)


def test_categorical_kl_shift_backward_is_exact_and_repeatable():
    """The hand-written backward of the categorical ``kl_shift`` is the exact derivative of its expression
    (``gradcheck``, with ``p`` also off the simplex) and a second backward of the same graph gives the same."""
    fam = get_family("categorical")
    g = torch.Generator().manual_seed(5)
    eta = torch.randn(5, 4, generator=g, dtype=D64)
    shift = torch.randn(5, 4, 7, generator=g, dtype=D64, requires_grad=True)
    prob = torch.softmax(eta, -1)
    off = (prob * (1 + 0.1 * torch.rand(5, 4, generator=g, dtype=D64))).requires_grad_()  # sums to 1.0x
    for p in (prob.clone().requires_grad_(), off):
        assert torch.autograd.gradcheck(lambda s, q: fam.kl_shift(eta, s, q), (shift, p))
    out = fam.kl_shift(eta, shift, off).sum()
    first = torch.autograd.grad(out, (shift, off), retain_graph=True)
    second = torch.autograd.grad(out, (shift, off))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(RuntimeError, match="differentiable once"):  # a Hessian-vector product would miss its terms
        torch.autograd.grad(fam.kl_shift(eta, shift, off).sum(), shift, create_graph=True)
    assert fam.kl_shift(eta[:0], shift[:0], off[:0]).shape == (0, 7)
    assert fam.kl_to_shifted(eta[:0], torch.randn(4, 3, dtype=D64), torch.randn(0, 3, dtype=D64)).shape == (0, 3)


@pytest.mark.parametrize("name,family,sigma,k", FAMILY_TABLE, ids=IDS)
def test_log_probs_mixtures_and_class_probs(name, family, sigma, k):
    fam = get_family(family)
    base = _base(name)
    etas = torch.stack([_eta(name, 5, k, scale=s) for s in (0.5, 1.0, 2.0)])
    w = torch.tensor([0.2, 0.5, 0.3], dtype=D64)
    lp = fam.log_probs(etas[0])
    if base == "categorical":  # log p(c | eta) = -nll(eta, c) for every class c
        byclass = torch.stack([-fam.nll(etas[0], torch.full((5,), c)) for c in range(k)], 1)
        torch.testing.assert_close(lp, byclass, rtol=1e-12, atol=1e-12)
    else:
        assert lp is None
    if base in ("categorical", "bernoulli"):
        assert fam.has_m_mixture
        mix = fam.m_mixture_eta(etas, w.log())
        torch.testing.assert_close(fam.mean(mix), torch.einsum("m,mnk->nk", w, fam.mean(etas)), rtol=1e-12, atol=1e-14)
    else:
        assert not fam.has_m_mixture
        with pytest.raises(NotImplementedError, match="not in the family"):
            fam.m_mixture_eta(etas, w.log())
    y = _targets(name, etas[0], torch.Generator().manual_seed(3))
    classes = fam.class_probs(etas[0], y)
    if base == "categorical" or (base == "bernoulli" and k == 1):
        probs, labels = classes
        # the probability of each class is exp(-nll) of that class, whatever the family
        c1 = torch.ones(5, dtype=torch.long) if base == "categorical" else torch.ones(5, k, dtype=D64)
        torch.testing.assert_close(probs[:, 1], (-fam.nll(etas[0], c1)).exp(), rtol=1e-12, atol=1e-14)
        assert labels.dtype == torch.long and labels.shape == (5,)
    else:
        assert classes is None


def test_bernoulli_single_output_class_probs():
    fam = get_family("bernoulli")
    eta = torch.tensor([[0.0], [2.0]], dtype=D64)
    probs, labels = fam.class_probs(eta, torch.tensor([[1.0], [0.0]], dtype=D64))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, dtype=D64))
    assert labels.tolist() == [1, 0]
