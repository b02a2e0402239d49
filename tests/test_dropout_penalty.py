"""Fisher-dropout penalty (theory.md 4.4) and dropout mixtures (4.3)."""

import pytest
import torch
from torch import nn

from dropgeom.dropout import mixture, penalty, terms
from dropgeom.options import Estimator
from reference.cases import SAMPLED_ESTIMATORS
from reference.dropout import mixture_exact, sequential_eta
from reference.finite_diff import directional_fd

D = torch.float64
CURVATURE = pytest.mark.parametrize("curv", [False, True], ids=["fisher", "curvature"])


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.2), nn.Linear(4, 4), nn.Softplus(), nn.Dropout(0.1), nn.Linear(4, 3)
    ).double()


def _data(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def _expected(t, form, curv):
    out = 0.0
    for k, q in t.p.items():
        lay, v = t.per_layer[k], q / (1 - q)
        if form == "quadratic":
            out += 0.5 * v * (lay["fisher"] + (lay["curvature_gaussian"] if curv else 0.0))
        else:
            out += q * (lay["divergence"] + (lay["curvature_bernoulli"] if curv else 0.0))
    return out


@CURVATURE
def test_value_equals_terms(form, curv):
    net = _net()
    x, y = _data()
    t = terms(net, x, y)
    val = penalty(net, x, form=form, curvature=curv, targets=y).value
    assert abs(val.item() - _expected(t, form, curv)) < 1e-14
    # the closed-form last layer alone
    t5 = terms(net, x, y, layers=["5"])
    v5 = penalty(net, x, form=form, curvature=curv, targets=y, layers=["5"]).value
    assert abs(v5.item() - _expected(t5, form, curv)) < 1e-14


@CURVATURE
def test_gradient_matches_finite_differences(form, curv, estimator):
    net = _net(2)
    x, y = _data()
    params = list(net.parameters())
    seed = 5

    def value():
        return penalty(
            net, x, form=form, curvature=curv, targets=y, method=estimator, generator=torch.Generator().manual_seed(seed)
        ).value

    grads = torch.autograd.grad(value(), params)
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    numeric = directional_fd(value, params, direction)
    assert abs(analytic - numeric) < 1e-7 * max(1.0, abs(numeric)), (analytic, numeric)


@CURVATURE
def test_mc_estimator_is_unbiased(form, curv):
    net = _net(3)
    x, y = _data()
    exact = penalty(net, x, form=form, curvature=curv, targets=y).value.item()
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor(
        [penalty(net, x, form=form, curvature=curv, targets=y, method="mc", generator=g).value.item() for _ in range(120)],
        dtype=D,
    )
    se = draws.std().item() / 120**0.5
    assert abs(draws.mean().item() - exact) < 4 * se + 1e-15


def test_penalty_bad_inputs():
    net = _net()
    x, y = _data()
    with pytest.raises(ValueError, match="needs targets"):
        penalty(net, x, curvature=True)
    with pytest.raises(ValueError, match="form"):
        penalty(net, x, form="cubic")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        penalty(net, x, p=-0.5)
    with pytest.raises(ValueError, match="integer class indices"):
        penalty(net, x, targets=y.double(), curvature=True)


def test_mixture_exact_matches_bruteforce_and_alpha_ends():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.3), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = _data(n=7)
    res = mixture(net, x, y, alpha=0.4, method="exact")
    with torch.no_grad():
        ref = mixture_exact(lambda m: sequential_eta(net, x, {2: m}), 4, 0.3, 0.4)
    for kind in ("m", "e", "alpha"):
        assert torch.allclose(res.probs[kind], ref[kind], atol=1e-13)
    assert not torch.allclose(res.probs["e"], res.probs["weight_scaling"], atol=1e-6)  # curved: they differ
    m_end = mixture(net, x, alpha=-1.0, method="exact")
    assert torch.allclose(m_end.probs["alpha"], m_end.probs["m"], atol=1e-14)
    e_end = mixture(net, x, alpha=1.0 - 1e-9, method="exact")
    assert torch.allclose(e_end.probs["alpha"], e_end.probs["e"], atol=1e-7)
    assert abs(res.nll["m"] + res.probs["m"].gather(1, y[:, None]).log().mean().item()) < 1e-12
    acc = (res.probs["e"].argmax(-1) == y).double().mean().item()
    assert res.accuracy["e"] == acc
    mc = mixture(net, x, alpha=0.4, n_samples=20000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mc.probs["m"], ref["m"], atol=0.01)


def test_weight_scaling_is_e_mixture_when_affine():
    torch.manual_seed(4)
    last = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.4), nn.Linear(5, 3)).double()
    x, y = _data(n=6)
    res = mixture(last, x, y, method="exact")
    assert torch.allclose(res.probs["e"], res.probs["weight_scaling"], atol=1e-13)
    with pytest.raises(ValueError, match="class indices"):
        mixture(last, x, y.double())
    with pytest.raises(ValueError, match="n_samples"):
        mixture(last, x, n_samples=0)


# -- the fast chain path (explicit propagation) against the generic torch.func path --------

ACTS = [nn.Tanh, nn.Softplus, nn.ReLU, nn.GELU]


def _chain_nets(act, bias):
    """Dropout at several positions: hidden layers, the input, before an activation, deep chains."""
    L = lambda i, o: nn.Linear(i, o, bias=bias)  # noqa: E731
    return [
        nn.Sequential(L(3, 5), act(), nn.Dropout(0.2), L(5, 6), act(), nn.Dropout(0.3), L(6, 4)),
        nn.Sequential(nn.Dropout(0.1), L(3, 5), act(), L(5, 4)),
        nn.Sequential(L(3, 5), nn.Dropout(0.25), act(), L(5, 6), act(), nn.Dropout(0.2), nn.Flatten(), L(6, 4)),
        nn.Sequential(L(3, 5), act(), nn.Dropout(0.2), L(5, 5), act(), L(5, 6), act(), nn.Dropout(0.4), L(6, 4)),
    ]


def _value_and_grad(net, x, fast, **kw):
    from dropgeom.dropout._penalty import _penalty

    args = dict(
        family="categorical",
        p=None,
        form="quadratic",
        targets=None,
        curvature=False,
        layers=None,
        estimator="exact",
        generator=None,
        chunk_size=None,
    )
    args.update(kw)
    val, eta = _penalty(net, x, **args, fast=fast)
    params = list(net.parameters())
    grads = torch.autograd.grad(val, params, allow_unused=True)  # gaussian: the output bias does not enter
    return val, torch.cat([(torch.zeros_like(q) if g is None else g).flatten() for g, q in zip(grads, params)]), eta


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_chain_path_equals_generic_path(act, bias, form, estimator):
    from dropgeom.dropout.chain import as_chain
    from dropgeom.dropout.masks import find_dropout

    torch.manual_seed(7)
    x, _ = _data(n=9)
    for net in _chain_nets(act, bias):
        net = net.double()
        assert as_chain(net, list(find_dropout(net))) is not None  # the fast path is the one tested
        kw = dict(form=form, estimator=estimator)
        fv, fg, feta = _value_and_grad(net, x, True, generator=torch.Generator().manual_seed(3), **kw)
        gv, gg, _ = _value_and_grad(net, x, False, generator=torch.Generator().manual_seed(3), **kw)
        assert abs(fv.item() - gv.item()) < 1e-13 * max(1.0, abs(gv.item())), net
        assert torch.allclose(fg, gg, rtol=1e-10, atol=1e-13), net
        assert torch.equal(feta.detach(), net.eval()(x))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_chain_path_equals_generic_path_in_chunks(act, bias):
    torch.manual_seed(7)
    x, _ = _data(n=9)
    for net in _chain_nets(act, bias):
        net = net.double()
        # a single layer, chunks not dividing the unit count
        fv, fg, _ = _value_and_grad(
            net,
            x,
            True,
            form="divergence",
            layers=["2"] if "2" in net._modules and isinstance(net[2], nn.Dropout) else None,
            chunk_size=2,
        )
        gv, gg, _ = _value_and_grad(
            net, x, False, form="divergence", layers=["2"] if "2" in net._modules and isinstance(net[2], nn.Dropout) else None
        )
        assert abs(fv.item() - gv.item()) < 1e-13 and torch.allclose(fg, gg, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("family", ["gaussian", "bernoulli", "poisson"])
def test_chain_path_other_families(family, form, estimator):
    torch.manual_seed(8)
    net = nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.2), nn.Linear(5, 4), nn.Softplus(), nn.Dropout(0.3), nn.Linear(4, 2)
    ).double()
    x, _ = _data(n=9)
    kw = dict(family=family, form=form, estimator=estimator)
    fv, fg, _ = _value_and_grad(net, x, True, generator=torch.Generator().manual_seed(1), **kw)
    gv, gg, _ = _value_and_grad(net, x, False, generator=torch.Generator().manual_seed(1), **kw)
    assert abs(fv.item() - gv.item()) < 1e-12 * max(1.0, abs(gv.item()))
    assert torch.allclose(fg, gg, rtol=1e-9, atol=1e-13)


def test_the_result_carries_the_clean_forward():
    net = _net(4)
    x, y = _data()
    res = penalty(net, x, form="divergence")
    pen, eta = res.value, res.eta
    assert torch.equal(eta.detach(), net.eval()(x))
    loss = nn.functional.cross_entropy(eta, y) + pen
    grads = torch.autograd.grad(loss, list(net.parameters()))
    ref = torch.autograd.grad(
        nn.functional.cross_entropy(net(x), y) + penalty(net, x, form="divergence").value, list(net.parameters())
    )
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


def test_kl_to_each_matches_family_kl_including_overflow_fallback():
    from dropgeom.families import get_family

    fam = get_family("categorical")
    g = torch.Generator().manual_seed(2)
    eta = torch.randn(7, 5, generator=g, dtype=D)
    for scale in (1e-3, 1.0, 200.0):  # 200: exp would overflow, the log-softmax form is used
        dropped = eta + scale * torch.randn(3, 7, 5, generator=g, dtype=D)
        ref = fam.kl(eta.expand(3, 7, 5).reshape(-1, 5), dropped.reshape(-1, 5)).reshape(3, 7)
        assert torch.allclose(fam.kl_to_each(eta, dropped), ref, rtol=1e-9, atol=1e-15), scale


@pytest.mark.parametrize("fast", [True, False])
def test_unit_estimator_is_unbiased_and_its_gradient_is_right(fast):
    from dropgeom.dropout._penalty import _penalty

    net = _net(3)
    x, y = _data()
    kw = dict(
        family="categorical", p=None, form="quadratic", targets=None, curvature=False, layers=None, chunk_size=None, fast=fast
    )
    exact = _penalty(net, x, estimator="exact", generator=None, **kw)[0].item()
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([_penalty(net, x, estimator="unit", generator=g, **kw)[0].item() for _ in range(200)], dtype=D)
    se = draws.std().item() / 200**0.5
    assert se > 0 and abs(draws.mean().item() - exact) < 4 * se
    # the gradient of one draw: finite differences with the same draw
    params = list(net.parameters())

    def value():
        return _penalty(net, x, estimator="unit", generator=torch.Generator().manual_seed(9), **kw)[0]

    grads = torch.autograd.grad(value(), params)
    direction = [torch.randn_like(q) for q in params]
    analytic = sum((a * d).sum() for a, d in zip(grads, direction)).item()
    assert abs(analytic - directional_fd(value, params, direction)) < 1e-7 * max(1.0, abs(analytic))


# -- the curvature term on every path and estimator, against float64 brute force -----------


def _deep_net(seed=0):
    """Two activations below the first dropout layer: no closed form, second-order propagation."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, 4),
        nn.Tanh(),
        nn.Dropout(0.2),
        nn.Linear(4, 4),
        nn.Softplus(),
        nn.Linear(4, 4),
        nn.Tanh(),
        nn.Dropout(0.3),
        nn.Linear(4, 3),
    ).double()


def _bruteforce(net, x, y, form):
    """``sum_l`` of the law's two terms from dense mask derivatives and explicit drops (reference.dropout)."""
    from reference.dropout import terms_dense

    out = 0.0
    for i, mod in enumerate(net):
        if isinstance(mod, nn.Dropout):
            units = net[i - 1].out_features if isinstance(net[i - 1], nn.Linear) else net[i - 2].out_features
            t = terms_dense(lambda m, i=i: sequential_eta(net, x, {i: m}), units, "categorical", y)
            q = mod.p
            if form == "quadratic":
                out += 0.5 * q / (1 - q) * (t["fisher"].sum() + t["curvature_gaussian"].sum()).item()
            else:
                out += q * (t["divergence"].sum() + t["curvature_bernoulli"].sum()).item()
    return out


def _pen(net, x, y, form, estimator, fast, seed=3):
    from dropgeom.dropout._penalty import _penalty

    with torch.enable_grad():  # the generic path differentiates w.r.t. the masks (also inside finite differences)
        return _penalty(
            net, x, "categorical", None, form, y, True, None, estimator, torch.Generator().manual_seed(seed), None, fast=fast
        )[0]


@pytest.mark.parametrize("make", [_net, _deep_net])
@pytest.mark.parametrize("fast", [True, False])
def test_curvature_term_exact_value_matches_bruteforce(make, form, fast):
    net = make(5)
    x, y = _data(n=8)
    ref = _bruteforce(net, x, y, form)
    assert abs(_pen(net, x, y, form, "exact", fast).item() - ref) < 1e-12 * max(1.0, abs(ref))


@pytest.mark.parametrize("make", [_net, _deep_net])
def test_curvature_term_gradient_matches_finite_differences_on_both_paths(make, form, estimator):
    net = make(6)
    x, y = _data(n=7)
    params = list(net.parameters())
    direction = [torch.randn_like(q) for q in params]
    grads = {}
    for fast in (True, False):
        value = lambda fast=fast: _pen(net, x, y, form, estimator, fast, seed=11)  # noqa: E731
        g = torch.autograd.grad(value(), params)
        analytic = sum((a * d).sum() for a, d in zip(g, direction)).item()
        numeric = directional_fd(value, params, direction)
        assert abs(analytic - numeric) < 1e-7 * max(1.0, abs(numeric)), (fast, analytic, numeric)
        grads[fast] = torch.cat([a.flatten() for a in g])
    # the chain path is the generic path, computed differently; the sampled estimators consume the
    # same draws (penalty._draw), so they agree too wherever the chain has no closed form for C
    if estimator == "exact" or make is _deep_net:
        assert torch.allclose(grads[True], grads[False], rtol=1e-10, atol=1e-13)
        a, b = _pen(net, x, y, form, estimator, True, seed=4).item(), _pen(net, x, y, form, estimator, False, seed=4).item()
        assert abs(a - b) < 1e-13 * max(1.0, abs(b)), (a, b)


@pytest.mark.parametrize("make", [_net, _deep_net])
@pytest.mark.parametrize("fast", [True, False])
def test_curvature_term_sampled_estimators_are_unbiased(make, form, fast, sampled_estimator):
    net = make(7)
    x, y = _data(n=8)
    ref = _bruteforce(net, x, y, form)
    count = 100 if fast else 50  # the generic path's forward-over-forward passes are slower
    draws = torch.tensor([_pen(net, x, y, form, sampled_estimator, fast, seed=s).item() for s in range(count)], dtype=D)
    se = draws.std().item() / count**0.5
    assert se > 0 and abs(draws.mean().item() - ref) < 4 * se, (draws.mean().item(), ref, se)


def test_curvature_term_takes_the_chain_path(monkeypatch, form, estimator):
    import importlib

    generic = importlib.import_module("dropgeom.dropout._penalty_generic")
    sites = importlib.import_module("dropgeom.dropout._penalty_sites")

    def boom(*a, **k):
        raise AssertionError("the generic path was used")

    monkeypatch.setattr(generic, "_gaussian_curvature", boom)
    monkeypatch.setattr(sites, "_generic_forward", boom)
    net = _deep_net(1)
    x, y = _data(n=5)
    penalty(net, x, form=form, curvature=True, targets=y, method=estimator).value.backward()


def test_relu_low_rank_dropped_outputs_equal_explicit_drops_with_kink_crossings():
    from dropgeom.dropout.chain import as_chain, run_chain

    torch.manual_seed(9)
    net = (
        nn.Sequential(
            nn.Linear(3, 12),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(12, 10),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Identity(),
            nn.Linear(10, 6),
            nn.Linear(6, 4),
        )
        .double()
        .eval()
    )
    x, _ = _data(n=9)
    chain = run_chain(net, as_chain(net, ["2", "5"]), x, ["2", "5"])
    low = chain.dropped_relu("2")  # [U, n, K]
    z = chain.states[4]
    shifted = z.unsqueeze(0) - chain.h("2").t().unsqueeze(-1) * net[3].weight.t().unsqueeze(1)  # [U, n, d]
    assert ((shifted > 0) != (z > 0)).sum() > 10  # the case tested: many kink crossings
    for j in range(12):  # brute force: the model's own forward with unit j dropped
        m = torch.ones(12, dtype=D)
        m[j] = 0.0
        with torch.no_grad():
            ref = net[3:](net[:2](x) * m)
        assert torch.allclose(low[j], ref, rtol=1e-12, atol=1e-13), j
    assert chain.dropped_relu("5") is None  # no ReLU between this layer and the output
    pos, states = chain.dropped("2", torch.arange(12))
    g1 = torch.autograd.grad(low.pow(2).sum(), list(net.parameters()), allow_unused=True, retain_graph=True)
    g2 = torch.autograd.grad(chain.push(pos, states).pow(2).sum(), list(net.parameters()), allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-11, atol=1e-13)


class _NoForwardMode(torch.autograd.Function):
    """tanh without a jvp rule: forward-mode autodiff through it fails."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _CustomAct(nn.Module):
    def forward(self, x):
        return _NoForwardMode.apply(x)


def test_curvature_term_bad_inputs_name_the_problem():
    from dropgeom.families import Gaussian

    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.2), nn.Linear(4, 4), _CustomAct(), nn.Linear(4, 3))
    net = net.double()
    x, y = _data(n=5)
    with pytest.raises(ValueError, match=r"curvature term .* not supported for dropout layer '2'.*jvp"):
        penalty(net, x, targets=y, curvature=True)
    for est in Estimator:  # the divergence form's curvature term needs no forward mode
        penalty(net, x, form="divergence", targets=y, curvature=True, method=est).value.backward()

    class NoStatistic(Gaussian):
        name = "mygauss"

        def sufficient_statistic(self, y, k=None):
            raise NotImplementedError("no t(y)")

    with pytest.raises(ValueError, match="not supported for family 'mygauss'"):
        penalty(_net(), x, family=NoStatistic(), targets=torch.randn(5, 3, dtype=D), curvature=True)
    for bad in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            penalty(_net(), x, p=bad, targets=y, curvature=True)
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            penalty(_net(), x, p={"2": bad})


def _cnn(act, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        act(),
        nn.Dropout2d(0.2),
        nn.Conv2d(3, 4, 3),
        act(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 6),
        act(),
        nn.Dropout(0.3),
        nn.Linear(6, 3),
    ).double()


def _cnn_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 1, 6, 6, generator=g, dtype=D), torch.randint(0, 3, (5,), generator=g)


def test_generic_path_curvature_term_of_a_smooth_cnn_equals_terms():
    x, y = _cnn_batch()
    smooth = _cnn(nn.Tanh, 1)  # not piecewise linear: the forward-over-forward passes, equal to terms
    t = terms(smooth, x, y)
    with_c = penalty(smooth, x, targets=y, curvature=True, method="exact").value.item()
    expect = sum(0.5 * q / (1 - q) * (t.per_layer[k]["fisher"] + t.per_layer[k]["curvature_gaussian"]) for k, q in t.p.items())
    assert abs(with_c - expect) < 1e-12 * max(1.0, abs(expect))
    assert abs(t.curvature_gaussian) > 1e-6


def test_generic_path_curvature_term_of_piecewise_linear_downstream_is_zero_without_passes(monkeypatch, estimator):
    import importlib

    pen_mod = importlib.import_module("dropgeom.dropout._penalty_generic")
    x, y = _cnn_batch()
    relu = _cnn(nn.ReLU, 2)
    t = terms(relu, x, y)  # the generic forward-over-forward passes give exactly zero here
    assert t.curvature_gaussian == 0.0

    def boom(*a, **k):
        raise AssertionError("a forward-over-forward pass was run")

    monkeypatch.setattr(pen_mod, "_gaussian_curvature_layer", boom)
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    a = penalty(relu, x, targets=y, curvature=True, method=estimator, generator=gen()).value
    b = penalty(relu, x, targets=y, curvature=False, method=estimator, generator=gen()).value
    if estimator not in SAMPLED_ESTIMATORS:
        assert a.item() == b.item()
    a.backward()
