"""The dropout gap and the terms of its two small-noise laws (theory.md 4.1, 4.2)."""

import pytest
import torch
from torch import nn

from dropgeom.dropout import gap, terms
from reference.dropout import exact_gap, sequential_eta, terms_dense, wager_quadratic

D = torch.float64
TERMS = ("fisher", "curvature_gaussian", "divergence", "curvature_bernoulli")


def _two_hidden(act, units=4, p=0.2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, units), act(), nn.Dropout(p), nn.Linear(units, 4), act(), nn.Linear(4, 3)).double()


def _data(n=25, seed=1, k=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=D), torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("act", [nn.Tanh, nn.Softplus])
def test_terms_match_dense_reference(act):
    net = nn.Sequential(
        nn.Linear(3, 4), act(), nn.Dropout(0.2), nn.Linear(4, 4), act(), nn.Dropout(0.1), nn.Linear(4, 3)
    ).double()
    x, y = _data()
    t = terms(net, x, y, chunk_size=3)  # chunks not dividing the unit count
    for idx, name in ((2, "2"), (5, "5")):
        ref = terms_dense(lambda m: sequential_eta(net, x, {idx: m}), 4, "categorical", y)
        for key in TERMS:
            assert torch.allclose(t.per_unit[name][key], ref[key], rtol=1e-9, atol=1e-14), (name, key)
    for key in TERMS:
        assert abs(getattr(t, key) - sum(t.per_layer[k][key] for k in ("2", "5"))) < 1e-15


def test_exact_gap_matches_bruteforce_loop():
    net = _two_hidden(nn.Tanh, units=4, p=0.3)
    x, y = _data()
    g = gap(net, x, y)
    ref = exact_gap(lambda m: sequential_eta(net, x, {2: m}), 4, 0.3, "categorical", y)
    assert g.n_masks == 16 and g.stderr == 0.0
    assert abs(g.value - ref) < 1e-13
    mc = gap(net, x, y, method="mc", n_samples=3000, generator=torch.Generator().manual_seed(0))
    assert abs(mc.value - ref) < 4 * mc.stderr


@pytest.mark.parametrize("act", [nn.Tanh, nn.Softplus])
def test_bernoulli_law_error_vanishes_as_p_to_0(act):
    net = _two_hidden(act, units=5, seed=3)
    for mod in net:  # larger weights: a clearly curved mask direction
        if isinstance(mod, nn.Linear):
            mod.weight.data *= 2.0
    x, y = _data(n=30)
    t = terms(net, x, y)
    assert abs(t.curvature_bernoulli) > 1e-3 * abs(t.divergence)  # the curvature term matters here
    errs = []
    for p in (0.2, 0.05, 0.0125, 0.003125):
        exact = gap(net, x, y, p=p).value
        errs.append(abs(t.predicted_gap(p, "bernoulli") - exact) / abs(exact))
    assert all(b < 0.5 * a for a, b in zip(errs, errs[1:]))  # O(p) relative error
    assert errs[-1] < 0.02
    # the Gaussian (quadratic) formula is not the Bernoulli limit: it stays off at small p
    p = 0.0125
    quad = t.predicted_gap(p, "gaussian")
    assert abs(quad - gap(net, x, y, p=p).value) > 2 * errs[-1] * abs(gap(net, x, y, p=p).value)


@pytest.mark.parametrize("act", [nn.Tanh, nn.Softplus])
def test_gaussian_law_matches_mc_as_variance_to_0(act):
    net = _two_hidden(act, units=4, seed=4)
    x, y = _data(n=20, seed=2)
    t = terms(net, x, y)
    assert abs(t.curvature_gaussian) > 1e-3 * t.fisher
    for p in (0.02, 0.005):
        mc = gap(
            net,
            x,
            y,
            p=p,
            noise="gaussian",
            method="mc",
            n_samples=3000,
            antithetic=True,
            generator=torch.Generator().manual_seed(11),
        )
        pred = t.predicted_gap(p, "gaussian")
        assert abs(pred - mc.value) < 4 * mc.stderr, (p, pred, mc.value, mc.stderr)
        assert mc.stderr < 0.05 * abs(mc.value)  # the check has power


def test_curvature_terms_vanish_when_eta_affine_in_mask():
    x, y = _data()
    last = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).double()
    glm = nn.Sequential(nn.Dropout(0.3), nn.Linear(3, 3)).double()
    for net in (last, glm):
        t = terms(net, x, y)
        assert t.fisher > 1e-3
        assert abs(t.curvature_gaussian) < 1e-14 and abs(t.curvature_bernoulli) < 1e-14


@pytest.mark.parametrize("family,k", [("categorical", 3), ("bernoulli", 1), ("gaussian", 2)])
def test_glm_reduces_to_wager_quadratic_penalty(family, k):
    torch.manual_seed(5)
    glm = nn.Sequential(nn.Dropout(0.25), nn.Linear(4, k)).double()
    x = torch.randn(30, 4, dtype=D)
    y = torch.randint(0, k, (30,)) if family == "categorical" else torch.randint(0, 2, (30, k)).double()
    t = terms(glm, x, y, family=family)
    lin = glm[1]
    wager = wager_quadratic(x, lin.weight.detach(), family, 0.25, lin.bias.detach())
    assert abs(t.predicted_gap(noise="gaussian") - wager) < 1e-12 * max(1.0, abs(wager))


def test_glm_gaussian_family_gap_is_exactly_quadratic():
    torch.manual_seed(6)
    glm = nn.Sequential(nn.Dropout(0.3), nn.Linear(5, 2)).double()
    x, y = torch.randn(12, 5, dtype=D), torch.randn(12, 2, dtype=D)
    wager = wager_quadratic(x, glm[1].weight.detach(), "gaussian", 0.3, glm[1].bias.detach())
    exact = gap(glm, x, y, family="gaussian")  # Bernoulli masks, enumerated
    assert abs(exact.value - wager) < 1e-12
    mc = gap(
        glm,
        x,
        y,
        family="gaussian",
        noise="gaussian",
        method="mc",
        n_samples=2000,
        generator=torch.Generator().manual_seed(0),
        antithetic=True,
    )
    assert abs(mc.value - wager) < 4 * mc.stderr


def test_curvature_gaussian_is_e_embedding_curvature_at_stationary_point():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Dropout(0.1), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)).double().eval()
    for mod in net:  # larger weights: a clearly curved network
        if isinstance(mod, nn.Linear):
            mod.weight.data *= 3.0
    x = torch.randn(40, 2, dtype=D)
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def eta_flat(theta):
        params, i = {}, 0
        for k, s in zip(names, shapes):
            params[k] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        return torch.func.functional_call(net, params, (x,)).reshape(-1)

    jac = torch.autograd.functional.jacobian(eta_flat, theta0)  # [nK, P], G = I (gaussian, sigma 1)
    raw = torch.randn(40, dtype=D)
    u, sv, _ = torch.linalg.svd(jac, full_matrices=False)
    basis = u[:, sv > sv[0] * 1e-12]  # orthonormal basis of range(J)
    r = raw - basis @ (basis.T @ raw)
    r = r - basis @ (basis.T @ r)  # null space of J^T (projected twice for rounding)
    assert (jac.T @ r).abs().max() < 1e-12
    y = (eta_flat(theta0).detach() - r)[:, None]  # residual mu - y = r
    t = terms(net, x, y, family="gaussian", layers=["2"])
    proj = basis @ basis.T  # G-orthogonal projector onto range(J) (G = I)
    w_start = sum(s.numel() for s in shapes[:2])  # net[3].weight follows net[0].weight, net[0].bias
    sizes = []
    for j in range(3):
        v = torch.zeros_like(theta0)
        w = net[3].weight.detach()
        v[w_start : w_start + 9].view(3, 3)[:, j] = w[:, j]  # masking unit j scales its outgoing weights
        line = lambda s: eta_flat(theta0 + s * v)  # noqa: E731
        d2 = torch.autograd.functional.jacobian(
            lambda s: torch.autograd.functional.jacobian(line, s, create_graph=True), torch.zeros((), dtype=D)
        )
        normal = d2 - proj @ d2
        h_e = (normal * r).sum() / 40  # H_e(v_j, v_j, G^{-1} r) / n
        assert abs(t.per_unit["2"]["curvature_gaussian"][j].item() - h_e.item()) < 1e-12
        sizes.append(abs(h_e.item()))
    assert max(sizes) > 1e-4  # a non-trivial contraction


def test_bad_inputs():
    net = _two_hidden(nn.Tanh, units=4)
    x, y = _data()
    with pytest.raises(ValueError, match="integer class indices"):
        terms(net, x, y.double())
    with pytest.raises(ValueError, match="shape"):
        gap(net, x, y[:5])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        gap(net, x, y, p=1.0)
    with pytest.raises(ValueError, match="no dropout modules"):
        terms(nn.Sequential(nn.Linear(3, 3)).double(), x, y)
    with pytest.raises(ValueError, match="unknown layer name"):
        terms(net, x, y, layers=["7x"])
    with pytest.raises(ValueError, match="max_masks"):
        gap(net, x, y, max_masks=8)
    with pytest.raises(ValueError, match="method='mc'"):
        gap(net, x, y, noise="gaussian")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        terms(net, x, y).predicted_gap(p=1.2)


# -- the fast chain path (explicit propagation) against the generic torch.func path --------


def _chain_nets(act, bias):
    """Dropout at several positions: hidden layers, the input, before an activation, deep chains."""
    L = lambda i, o: nn.Linear(i, o, bias=bias)  # noqa: E731
    return [
        nn.Sequential(L(3, 5), act(), nn.Dropout(0.2), L(5, 6), act(), nn.Dropout(0.3), L(6, 4)),
        nn.Sequential(nn.Dropout(0.1), L(3, 5), act(), L(5, 4)),
        nn.Sequential(L(3, 5), nn.Dropout(0.25), act(), L(5, 6), act(), nn.Dropout(0.2), nn.Flatten(), L(6, 4)),
        nn.Sequential(L(3, 5), act(), nn.Dropout(0.2), L(5, 5), act(), L(5, 6), act(), nn.Dropout(0.4), L(6, 4)),
    ]


@pytest.mark.parametrize("act", [nn.Tanh, nn.Softplus, nn.ReLU, nn.GELU])
@pytest.mark.parametrize("bias", [True, False])
def test_chain_path_equals_generic_path(act, bias):
    from dropgeom.dropout.chain import as_chain
    from dropgeom.dropout.masks import find_dropout

    torch.manual_seed(5)
    x, y = _data(n=9, k=4)
    for net in _chain_nets(act, bias):
        net = net.double()
        assert as_chain(net, list(find_dropout(net))) is not None  # the fast path is the one tested
        fast = terms(net, x, y, chunk_size=2)  # chunks not dividing the unit count
        slow = terms(net, x, y, fast=False)
        for k in slow.per_unit:
            for key in TERMS:
                assert torch.allclose(fast.per_unit[k][key], slow.per_unit[k][key], rtol=1e-10, atol=1e-15), (net, k, key)
        assert abs(fast.predicted_gap() - slow.predicted_gap()) < 1e-13


@pytest.mark.parametrize("family", ["gaussian", "poisson"])
def test_chain_path_other_families(family):
    torch.manual_seed(6)
    net = nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.2), nn.Linear(5, 4), nn.Softplus(), nn.Dropout(0.3), nn.Linear(4, 2)
    ).double()
    x, _ = _data(n=9)
    y = torch.randn(9, 2, dtype=D) if family == "gaussian" else torch.poisson(torch.full((9, 2), 2.0, dtype=D))
    fast, slow = terms(net, x, y, family=family), terms(net, x, y, family=family, fast=False)
    for k in slow.per_unit:
        for key in TERMS:
            assert torch.allclose(fast.per_unit[k][key], slow.per_unit[k][key], rtol=1e-10, atol=1e-15), (k, key)


def test_divergence_law_with_curvature_is_drop_one_losses():
    """theory.md 4.4: l + p sum_j (K_j + B_j) = (1 - pU) l + p sum_j l(eta^(-j)) + p <r, sum_j d_j eta>,
    checked on the penalty the objective trains with, against drop-one losses and the mask derivative
    computed by brute force (autograd of the hand-written forward along the all-ones mask)."""
    from dropgeom.dropout import penalty
    from reference.dropout import nll

    p, units = 0.3, 5
    net = _two_hidden(nn.Tanh, units=units, p=p, seed=3)
    x, y = _data(n=17, seed=4)
    one = torch.ones(units, dtype=D)
    eta = sequential_eta(net, x, {2: one})
    clean = nll("categorical", eta, y).mean()
    dropped = sum(
        nll("categorical", sequential_eta(net, x, {2: one - torch.eye(units, dtype=D)[j]}), y).mean() for j in range(units)
    )
    r = torch.softmax(eta, -1) - nn.functional.one_hot(y, 3).to(D)
    along = torch.func.jvp(lambda m: sequential_eta(net, x, {2: m}), (one,), (one,))[1]  # sum_j d_j eta
    expected = (1 - p * units) * clean + p * dropped + p * (r * along).sum(-1).mean()
    for chunk in (None, 2):
        got = penalty(net, x, y, form="divergence", curvature=True, method="exact", chunk_size=chunk).value
        assert torch.allclose(clean + got, expected, rtol=1e-10, atol=1e-13), chunk
