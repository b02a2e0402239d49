"""Training objectives against independent references (closed forms, exact mask
enumeration, Gauss-Hermite quadrature, finite differences, dropout.terms)."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dropgeom.train import (
    L2,
    NLL,
    DropoutNLL,
    FisherDropout,
    FisherPenalty,
    GaussianDropoutNLL,
    Objective,
    ObjectiveName,
    Sum,
    make_objective,
    objective_names,
    objective_spec,
    register_objective,
    run_options,
)
from dropgeom.train import registry

D = torch.float64


def small_net(hidden=3, p=0.3, act=nn.Tanh):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, hidden), act(), nn.Dropout(p), nn.Linear(hidden, 3)).to(D)
    with torch.no_grad():
        net[3].weight.mul_(4.0)  # large output weights: dropout changes the loss clearly
    return net


def mc_draws(obj, net, x, y, seed, copies=400, draws=40):
    """Objective values on `copies` stacked copies of the batch (each draw averages many masks)."""
    xr, yr = x.repeat(copies, 1), y.repeat(copies)
    gen = torch.Generator().manual_seed(seed)
    vals = np.array([obj(net, xr, yr, "categorical", gen).loss.item() for _ in range(draws)])
    return vals.mean(), vals.std(ddof=1) / math.sqrt(draws)


def batch(n=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def manual_eta(net, x, m):
    """eta with mask m [..., n, H] applied after the hidden tanh (hand-written reference)."""
    h = torch.tanh(x @ net[0].weight.T + net[0].bias)
    return (h * m) @ net[3].weight.T + net[3].bias


# -- L2 and NLL ----------------------------------------------------------------


def test_l2_matches_closed_form_value_and_gradient():
    net = small_net()
    x, y = batch()
    lam = 0.37
    out = L2(lam)(net, x, y)
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    assert out.loss.item() == pytest.approx(0.5 * lam * float(theta @ theta), rel=1e-12)
    grads = torch.autograd.grad(out.loss, list(net.parameters()))
    for g, p in zip(grads, net.parameters()):
        torch.testing.assert_close(g, lam * p.detach(), rtol=1e-12, atol=0)
    no_bias = L2(lam, biases=False)(net, x, y).loss.item()
    w = [p.detach() for p in net.parameters() if p.dim() > 1]
    assert no_bias == pytest.approx(0.5 * lam * sum(float((t * t).sum()) for t in w), rel=1e-12)


def test_nll_is_clean_cross_entropy_and_restores_flags():
    net = small_net(p=0.5).train()
    x, y = batch()
    out = NLL()(net, x, y)
    ref = F.cross_entropy(manual_eta(net, x, torch.ones(3, dtype=D)), y)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert all(m.training for m in net.modules())
    s = (NLL() + L2(0.1))(net, x, y)
    assert s.metrics["loss"] == pytest.approx(s.metrics["nll"] + s.metrics["l2"], rel=1e-12)
    assert isinstance(NLL() + L2(0.1) + L2(0.2), Sum) and len((NLL() + L2(0.1) + L2(0.2)).terms) == 3
    assert set(Sum(L2(0.1), L2(0.2))(net, x, y).metrics) == {"l2", "l2_2", "loss"}


# -- dropout objectives: expectation over masks -------------------------------


def exact_dropout_loss(net, x, y, p):
    """L_drop by enumerating all 2^H masks of the hidden layer (independent reference)."""
    hdim = net[0].out_features
    n = x.shape[0]
    total = 0.0
    # masks are independent per sample and unit: E over masks of the mean loss = mean over samples
    for i in range(n):
        for bits in itertools.product([0.0, 1.0], repeat=hdim):
            b = torch.tensor(bits, dtype=D)
            prob = float(torch.prod(torch.where(b > 0, 1 - p, p)))
            eta = manual_eta(net, x[i : i + 1], b / (1 - p))
            total += prob * F.cross_entropy(eta, y[i : i + 1]).item()
    return total / n


@pytest.mark.parametrize("masks", ["module", "explicit"])
def test_dropout_objective_expectation_equals_exact_dropout_loss(masks):
    p = 0.4
    net = small_net(p=p)
    x, y = batch()
    exact = exact_dropout_loss(net, x, y, p)
    clean = NLL()(net, x, y).loss.item()
    mean, se = mc_draws(make_objective("dropout", masks=masks), net, x, y, seed=0)
    assert abs(mean - exact) < 4.5 * se
    assert abs(exact - clean) > 10 * se  # the test can tell dropout from no dropout


def test_dropout_p_override_and_layers():
    net = small_net(p=0.1)
    x, y = batch()
    exact = exact_dropout_loss(net, x, y, 0.5)
    mean, se = mc_draws(DropoutNLL(p=0.5, layers=["2"]), net, x, y, seed=3)
    assert abs(mean - exact) < 4.5 * se
    assert net[2].p == 0.1  # restored
    with pytest.raises(ValueError, match="unknown dropout layer"):
        DropoutNLL(layers=["nope"])(net, x, y)
    with pytest.raises(ValueError, match="no dropout modules"):
        DropoutNLL()(nn.Linear(3, 3).to(D), x, y)


def test_gaussian_dropout_expectation_equals_quadrature():
    p = 0.3
    v = p / (1 - p)
    net = small_net(hidden=2, p=p)
    x, y = batch(n=4)
    # Gauss-Hermite (probabilists') quadrature over the two N(1, v) mask entries of each sample
    z, w = np.polynomial.hermite_e.hermegauss(30)
    w = w / math.sqrt(2 * math.pi)
    zz = torch.tensor(np.stack(np.meshgrid(z, z, indexing="ij"), -1).reshape(-1, 2), dtype=D)
    ww = torch.tensor(np.outer(w, w).reshape(-1), dtype=D)
    m = 1 + math.sqrt(v) * zz  # [Q, 2]
    eta = manual_eta(net, x[None], m[:, None, :])  # [Q, n, K]
    nll = torch.logsumexp(eta, -1) - eta.gather(-1, y[None, :, None].expand(len(m), -1, 1)).squeeze(-1)
    exact = float((ww[:, None] * nll).sum(0).mean().detach())
    clean = NLL()(net, x, y).loss.item()
    mean, se = mc_draws(make_objective("gaussian_dropout"), net, x, y, seed=5)
    assert abs(mean - exact) < 4.5 * se
    assert abs(exact - clean) > 8 * se


def test_seeded_objectives_are_reproducible_and_leave_global_rng_alone():
    net = small_net()
    x, y = batch()
    for name in ("dropout", "gaussian_dropout"):
        a = make_objective(name)(net, x, y, "categorical", torch.Generator().manual_seed(7)).loss
        state = torch.get_rng_state()
        b = make_objective(name)(net, x, y, "categorical", torch.Generator().manual_seed(7)).loss
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(a, b)
        c = make_objective(name)(net, x, y, "categorical", torch.Generator().manual_seed(8)).loss
        assert not torch.equal(a, c)


# -- registry and validation --------------------------------------------------


def test_registry_names_and_errors():
    assert [m.value for m in ObjectiveName] == ["none", "l2", "dropout", "gaussian_dropout", "fisher_dropout"]
    assert all(m.description for m in ObjectiveName)
    assert isinstance(make_objective("none"), NLL)
    assert isinstance(make_objective(ObjectiveName.GAUSSIAN_DROPOUT), GaussianDropoutNLL)
    fd = make_objective("fisher_dropout", p=0.2, form="divergence")
    assert isinstance(fd, FisherDropout) and fd.form == "divergence" and fd.p == 0.2
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("dropconnect_magic")
    with pytest.raises(ValueError, match="unknown"):
        make_objective("l2", p=0.3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        make_objective("dropout", p=1.0)
    with pytest.raises(ValueError, match="form"):
        make_objective("fisher_dropout", form="cubic")
    with pytest.raises(ValueError, match="estimator"):
        make_objective("fisher_dropout", estimator="guess")
    with pytest.raises(ValueError, match="weight"):
        L2(-1.0)
    net = small_net()
    x, y = batch()
    with pytest.raises(ValueError, match="leading sample axis"):
        NLL()(net, x, y[:-1])
    with pytest.raises(ValueError, match="class indices"):
        NLL()(net, x, y.to(D))


def test_every_registered_objective_builds_from_the_run_settings_and_trains(objective_name):
    """Each registration: options from the run's shared settings, a finite differentiable loss, a
    reproducible value for a seeded generator, and a repr/config that names its settings."""
    spec = objective_spec(objective_name)
    assert spec.name == objective_name and spec.description and set(spec.settings.values()) <= set(spec.options)
    options = run_options(objective_name, p=0.3, l2=1e-3)
    obj = make_objective(objective_name, **options)
    assert isinstance(obj, Objective)
    for option, value in options.items():
        assert f"{option}={value!r}" in repr(obj)
    net = small_net(p=0.3 if spec.uses_dropout else 0.0)
    x, y = batch()
    out = obj(net, x, y, "categorical", torch.Generator().manual_seed(3))
    assert math.isfinite(out.metrics["loss"]) and out.metrics["loss"] == out.loss.item()
    out.loss.backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in net.parameters())
    again = make_objective(objective_name, **options)(net, x, y, "categorical", torch.Generator().manual_seed(3))
    assert again.loss.item() == out.loss.item()


def test_run_options_translate_the_shared_settings():
    """The one translation of the CLI and the experiments: weight decay to ``l2``, the rate to dropout objectives."""
    assert run_options("none", p=0.3, l2=1e-4) == {}
    assert run_options("l2", p=0.3, l2=1e-4) == {"weight": 1e-4}
    for name in ("dropout", "gaussian_dropout", "fisher_dropout"):
        assert run_options(name, p=0.3, l2=1e-4) == {"p": 0.3}
        assert objective_spec(name).uses_dropout
    assert not objective_spec("none").uses_dropout and not objective_spec("l2").uses_dropout
    with pytest.raises(ValueError, match="unknown objective"):
        run_options("sharpness", p=0.3, l2=1e-4)


def test_register_objective_is_the_one_place():
    """A registration is a name for make_objective, options from the factory's signature, shared
    settings and a description; bad registrations are refused."""
    try:

        @register_objective("test_l2_only", "L2 alone", settings={"l2": "weight"})
        def _l2_only(weight: float = 1e-4, biases: bool = True) -> Objective:
            return L2(weight, biases)

        assert "test_l2_only" in objective_names() and "test_l2_only" not in [m.value for m in ObjectiveName]
        assert objective_spec("TEST_L2_ONLY").options == ("weight", "biases")
        assert isinstance(make_objective("test_l2_only", **run_options("test_l2_only", p=0.1, l2=0.5)), L2)
        with pytest.raises(ValueError, match="takes options"):
            make_objective("test_l2_only", p=0.1)
        with pytest.raises(ValueError, match="already registered"):
            register_objective("test_l2_only", "again")
    finally:
        registry._REGISTRY.pop("test_l2_only", None)
    with pytest.raises(ValueError, match="lower-case"):
        register_objective("Mine", "upper case")
    with pytest.raises(ValueError, match="shared setting"):
        register_objective("test_bad", "bad", settings={"lr": "weight"})(L2)
    with pytest.raises(ValueError, match="does not take"):
        register_objective("test_bad", "bad", settings={"p": "rate"})(L2)
    assert "test_bad" not in objective_names()


# -- Fisher-dropout: the penalty equals dropout.terms, gradients by finite differences --


def two_dropout_net(act=nn.Tanh):
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(3, 5), act(), nn.Dropout(0.2), nn.Linear(5, 4), act(), nn.Dropout(0.3), nn.Linear(4, 3)).to(D)


@pytest.mark.parametrize("curvature", [False, True])
def test_fisher_dropout_penalty_equals_dropout_terms(form, curvature):
    from dropgeom.dropout import terms

    net = two_dropout_net()
    x, y = batch(n=7)
    t = terms(net, x, y)
    for p in (None, 0.25):
        obj = make_objective("fisher_dropout", p=p, form=form, curvature=curvature)
        out = obj(net, x, y)
        ps = t.p if p is None else {k: p for k in t.p}
        expect = 0.0
        for layer, vals in t.per_layer.items():
            q = ps[layer]
            if form == "quadratic":
                expect += 0.5 * q / (1 - q) * (vals["fisher"] + (vals["curvature_gaussian"] if curvature else 0.0))
            else:
                expect += q * (vals["divergence"] + (vals["curvature_bernoulli"] if curvature else 0.0))
        assert out.metrics["penalty"] == pytest.approx(expect, rel=1e-10, abs=1e-14)
        clean = NLL()(net, x, y).loss.item()
        assert out.metrics["loss"] == pytest.approx(clean + expect, rel=1e-12)
        assert out.metrics["nll"] == pytest.approx(clean, rel=1e-12)
        # the composed pieces give the same value and the same gradient as the shared-forward objective
        composed = NLL() + FisherPenalty(p=p, form=form, curvature=curvature)
        ga = torch.autograd.grad(obj(net, x, y).loss, list(net.parameters()))
        gb = torch.autograd.grad(composed(net, x, y).loss, list(net.parameters()))
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    with torch.no_grad():  # evaluation under no_grad works and gives the same value
        again = make_objective("fisher_dropout", p=0.25, form=form, curvature=curvature)(net, x, y)
    assert again.metrics["penalty"] == pytest.approx(out.metrics["penalty"], rel=1e-12)
    # the summed fields agree with the per-layer ones at a single p
    out = make_objective("fisher_dropout", p=0.25, form=form)(net, x, y)
    summed = 0.5 * (0.25 / 0.75) * t.fisher if form == "quadratic" else 0.25 * t.divergence
    assert out.metrics["penalty"] == pytest.approx(summed, rel=1e-10)


def flat_grad_and_fd(obj, net, x, y, eps=1e-6, seed=0):
    params = list(net.parameters())
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731 - the same probes for every evaluation
    loss = obj(net, x, y, "categorical", gen()).loss
    grads = torch.autograd.grad(loss, params)
    g = torch.cat([t.reshape(-1) for t in grads])
    v = torch.randn(g.shape, generator=torch.Generator().manual_seed(11), dtype=D)
    theta0 = [p.detach().clone() for p in params]

    def at(s):
        with torch.no_grad():
            i = 0
            for p, p0 in zip(params, theta0):
                p.copy_(p0 + s * v[i : i + p.numel()].view_as(p))
                i += p.numel()
        return obj(net, x, y, "categorical", gen()).loss.item()

    fd = (at(eps) - at(-eps)) / (2 * eps)
    at(0.0)
    return float(g @ v), fd


@pytest.mark.parametrize(
    "options",
    [
        {"form": "quadratic"},
        {"form": "divergence"},
        {"form": "quadratic", "curvature": True},
        {"form": "divergence", "curvature": True, "p": 0.4},
        {"form": "quadratic", "estimator": "mc"},
        {"form": "divergence", "estimator": "mc"},
    ],
)
def test_fisher_dropout_gradient_matches_finite_differences(options):
    net = two_dropout_net(act=nn.Softplus)
    x, y = batch(n=5)
    analytic, fd = flat_grad_and_fd(make_objective("fisher_dropout", **options), net, x, y)
    assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_fisher_dropout_mc_estimator_is_unbiased(form):
    net = two_dropout_net()
    x, y = batch(n=7)
    exact = FisherPenalty(p=0.3, form=form)(net, x, y).loss.item()
    obj = FisherPenalty(p=0.3, form=form, estimator="mc")
    mean, se = mc_draws(obj, net, x, y, seed=9, copies=50, draws=40)
    assert se > 0
    assert abs(mean - exact) < 4.5 * se


def test_fisher_dropout_bad_inputs():
    for bad in (1.0, -0.2, float("nan"), True):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            make_objective("fisher_dropout", p=bad, curvature=True)
    with pytest.raises(ValueError, match="estimator"):
        make_objective("fisher_dropout", estimator="sampled")
    net = two_dropout_net()
    x, y = batch(n=4)
    with pytest.raises(ValueError, match="class indices"):  # the curvature term's residual needs valid labels
        make_objective("fisher_dropout", curvature=True)(net, x, y.double())


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("curvature", [False, True])
def test_fisher_dropout_runs_one_forward_per_step(act, form, estimator, curvature):
    """The clean loss reuses the penalty's forward pass (issue 14): on an ``nn.Sequential`` MLP
    the model runs once per objective call, whatever the form, estimator and curvature term,
    and the value equals NLL + penalty computed separately."""
    net = two_dropout_net(act)
    x, y = batch(n=6)
    calls = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: calls.append(name)) for name, m in net.named_children()]
    obj = make_objective("fisher_dropout", form=form, estimator=estimator, curvature=curvature)
    out = obj(net, x, y, "categorical", torch.Generator().manual_seed(2))
    out.loss.backward()
    for h in hooks:
        h.remove()
    # a second forward would rerun the modules before the first dropout layer (those after it
    # also push the dropped states of the divergence form through the rest of the chain)
    assert calls.count("0") == 1 and calls.count("1") == 1, calls
    ref = (NLL() + FisherPenalty(form=form, estimator=estimator, curvature=curvature))(
        net, x, y, "categorical", torch.Generator().manual_seed(2)
    )
    assert abs(float(out.loss) - float(ref.loss)) < 1e-12
