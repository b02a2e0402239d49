"""The penalty (theory.md 4.4) and the terms (4.2, 4.5) on every dropout site that is not a plain
``nn.Dropout``: attention-weight dropout, ``F.dropout`` and SDPA dropout in custom forwards,
stochastic depth and alpha dropout.

References: float64 dense mask Jacobians / Hessians and explicit drops of hand-written
forwards (``reference.dropout.terms_dense``), exact enumeration of every alpha-dropout mask
at small ``p`` (the first-order law), and the sampled estimators' mean (within 4 standard errors).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dropgeom.dropout import StochasticDepth, penalty, terms
from reference.dropout import alpha_dropout_at, mean_param, mha_self_attention, nll, terms_dense
from reference.site_models import AttnNet, FuncDrop, SdpaNet

D = torch.float64
A = 1.0507009873554804934193349852946 * 1.6732632423543772848170429916717  # SELU's lambda * alpha


def _data(n, shape, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=D), torch.randint(0, k, (n,), generator=g)


def _attention():
    net = AttnNet(p=0.3).double()
    x, y = _data(4, (2, 2))
    return (
        net,
        x,
        y,
        "attn",
        4,
        0.3,
        lambda m: net.head(torch.tanh(x + mha_self_attention(net.attn, x, m.reshape(1, 2, 2))).mean(1)),
    )


def _functional():
    net = FuncDrop(p=0.4).double()
    x, y = _data(6, (2,))
    return net, x, y, "#dropout0", 3, 0.4, lambda m: net.lin2(torch.tanh(net.lin1(x)) * m)


def _sdpa():
    net = SdpaNet(p=0.3).double()
    x, y = _data(5, (2, 2))

    def eta(m):
        q, k, v = net.qkv(x).chunk(3, -1)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(2), -1) * m.reshape(2, 2)
        return net.head(torch.tanh(w @ v).mean(1))

    return net, x, y, "#sdpa0", 4, 0.3, eta


def _stochastic_depth():
    blk = StochasticDepth(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), p=0.3)
    net = nn.Sequential(nn.Linear(2, 3), blk, nn.Linear(3, 2)).double()
    x, y = _data(6, (2,))
    return net, x, y, "1.drop", 1, 0.3, lambda m: net[2](net[0](x) + blk.branch(net[0](x)) * m)


def _alpha_net(feature: bool, p: float = 0.3):
    """SELU features, (feature) alpha dropout, a linear head; ``h`` the dropout's input."""
    drop = nn.FeatureAlphaDropout(p) if feature else nn.AlphaDropout(p)
    shape, width = ((3, 2), 6) if feature else ((3,), 3)
    net = nn.Sequential(nn.Linear(2, width), nn.SELU(), nn.Unflatten(1, shape), drop, nn.Flatten(), nn.Linear(width, 2)).double()
    x, y = _data(6, (2,))
    h = F.selu(net[0](x)).reshape(6, *shape).detach()
    return net, x, y, h


def _alpha(feature: bool):
    net, x, y, h = _alpha_net(feature)
    m_shape = (3, 1) if feature else (3,)
    # the mask line h~ = m (h + ALPHA) - ALPHA: torch's law written out at p = 0 with keep = m
    return net, x, y, "3", 3, 0.3, lambda m: net[5](alpha_dropout_at(h, m.reshape(m_shape), 0.0).flatten(1))


CASES = {
    "attention": _attention,
    "functional": _functional,
    "sdpa": _sdpa,
    "stochastic_depth": _stochastic_depth,
    "alpha": lambda: _alpha(False),
    "feature_alpha": lambda: _alpha(True),
}


def _drift(name, y):
    """``D_j = (1/n) sum_i <r_i, sum_{s in j} d eta_i / d h~_s h_s>`` by a dense Jacobian (alpha cases)."""
    torch.manual_seed(0)  # the same network as the case's
    net, x, _, h = _alpha_net(name == "feature_alpha")
    eta = net.eval()(x).detach()
    r = mean_param("categorical", eta) - F.one_hot(y, 2).double()
    s_shape = (3, 1) if name == "feature_alpha" else (3,)
    jac = torch.autograd.functional.jacobian(lambda s: net[5]((h * s.reshape(s_shape)).flatten(1)), torch.ones(3, dtype=D))
    return torch.einsum("nk,nku->u", r, jac) / x.shape[0]


def _reference(name, curv):
    """Per-unit terms and both forms of the penalty from the dense references (theory.md 4.4, 4.5)."""
    torch.manual_seed(0)
    net, x, y, site, units, p, eta = CASES[name]()
    t = terms_dense(eta, units, "categorical", y)
    if name in ("alpha", "feature_alpha"):
        drift = _drift(name, y)
        t["curvature_bernoulli"] = t["curvature_bernoulli"] - 0.5 * (1 + A * A) * drift
        a = ((1 - p) * (1 + p * A * A)) ** -0.5
        v, shift_q = p / (1 + p * A * A), (a * (1 - p) - 1) * drift.sum().item()
    else:
        v, shift_q = p / (1 - p), 0.0
    s = {k: val.sum().item() for k, val in t.items()}
    quad = 0.5 * v * (s["fisher"] + curv * s["curvature_gaussian"]) + curv * shift_q
    div = p * (s["divergence"] + curv * s["curvature_bernoulli"])
    return net, x, y, site, t, {"quadratic": quad, "divergence": div}


@pytest.mark.parametrize("name", list(CASES))
def test_penalty_and_terms_of_every_site_against_bruteforce(name):
    net, x, y, site, ref_terms, _ = _reference(name, False)
    t = terms(net, x, y)
    assert list(t.per_layer) == [site]
    for term, v in ref_terms.items():
        torch.testing.assert_close(t.per_unit[site][term].reshape(-1), v, rtol=1e-9, atol=1e-12)
    for curv in (False, True):
        ref = _reference(name, curv)[5]
        for form in ("quadratic", "divergence"):
            val = penalty(net, x, form=form, curvature=curv, targets=y)
            assert abs(val.item() - ref[form]) < 1e-12 * max(1.0, abs(ref[form])), (form, curv, val.item(), ref[form])
    pen = penalty(net, x, form="divergence", curvature=True, targets=y)
    pen.backward()  # differentiable with respect to the parameters
    assert all(q.grad is not None for q in net.parameters() if q.requires_grad)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("estimator", ["mc", "unit"])
def test_sampled_estimators_are_unbiased_on_every_site(name, estimator):
    net, x, y, _, _, ref = _reference(name, True)
    g = torch.Generator().manual_seed(1)
    for form in ("quadratic", "divergence"):
        draws = torch.tensor(
            [penalty(net, x, form=form, curvature=True, targets=y, estimator=estimator, generator=g).item() for _ in range(60)],
            dtype=D,
        )
        se = draws.std().item() / math.sqrt(60)
        assert abs(draws.mean().item() - ref[form]) < 4 * se + 1e-13, (form, draws.mean().item(), ref[form], se)


@pytest.mark.parametrize("feature", [False, True])
def test_alpha_dropout_first_order_law_against_exact_enumeration(feature):
    """theory.md 4.5: the exact gap of torch's alpha-dropout law over every mask, ``g(p)``, has
    ``g(p) / p -> sum_j (K_j + B_j)`` as ``p -> 0``, drift included (Richardson: error O(p^2))."""
    torch.manual_seed(0)
    net, x, y, h = _alpha_net(feature)
    m_shape = (3, 1) if feature else (3,)
    with torch.no_grad():
        clean = nll("categorical", net.eval()(x), y).mean().item()

        def gap(p):
            total = 0.0
            for bits in itertools.product((0.0, 1.0), repeat=3):
                b = torch.tensor(bits, dtype=D)
                prob = (1 - p) ** b.sum().item() * p ** (3 - b.sum().item())
                eta = net[5](alpha_dropout_at(h, b.reshape(m_shape), p).flatten(1))
                total += prob * nll("categorical", eta, y).mean().item()
            return total - clean

        p = 1e-3
        limit = 2 * gap(p) / p - gap(2 * p) / (2 * p)
    t = terms(net, x, y)
    law = t.divergence + t.curvature_bernoulli
    assert abs(limit - law) < 1e-4 * abs(law), (limit, law)
    drift = 0.5 * (1 + A * A) * _drift("feature_alpha" if feature else "alpha", y).sum().item()
    assert abs(drift) > 1e-2 * abs(law)  # the drift matters: without it the law would be off
    assert abs(t.predicted_gap(p) / p - law) < 1e-12 * abs(law)
    with pytest.raises(ValueError, match="alpha dropout.*Bernoulli"):
        t.predicted_gap(noise="gaussian")


def test_penalty_takes_every_site_and_names_unknown_ones():
    torch.manual_seed(0)
    host = nn.Sequential(nn.Dropout(0.2), FuncDrop().double())
    x, y = _data(5, (2,))
    both = penalty(host, x).item()
    parts = penalty(host, x, layers=["0"]).item() + penalty(host, x, layers=["1#dropout0"]).item()
    assert abs(both - parts) < 1e-14 * max(1.0, abs(both))  # the quadratic form is additive over layers
    with pytest.raises(ValueError, match=r"unknown layer name '1#dropout3'.*'1#dropout0'"):
        penalty(host, x, layers=["1#dropout3"])
    with pytest.raises(ValueError, match=r"'1.lin1' is a Linear, not a dropout layer"):
        penalty(host, x, layers=["1.lin1"])
    with pytest.raises(ValueError, match="module's own p"):
        penalty(_alpha_net(False)[0], x, p=0.1)


def test_penalty_bad_inputs_name_the_problem():
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Dropout(0.2), nn.Linear(3, 2)).double()
    x32 = torch.zeros(4, 2)
    from dropgeom.dropout._penalty import _penalty

    for fast in (True, False):  # the chain path and the generic one
        with pytest.raises(ValueError, match=r"inputs\[0\] has dtype torch.float32.*torch.float64"):
            _penalty(net, x32, "categorical", None, "quadratic", None, False, None, "exact", None, None, fast=fast)
    with pytest.raises(ValueError, match=r"'2' must lie in \[0, 1\)"):
        penalty(net, x32.double(), p=1.0)
    with pytest.raises(ValueError, match=r"'attn' must lie in \[0, 1\)"):
        penalty(AttnNet(p=1.0).double(), torch.zeros(4, 2, 2, dtype=D))

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.unused = nn.Linear(2, 2), nn.Dropout(0.1)

        def forward(self, x):
            return self.lin(x)

    with pytest.raises(ValueError, match="'unused' is never run"):
        penalty(Skips().double(), x32.double(), layers=["unused"])


def test_override_check_bypass_is_per_thread():
    """While one thread runs a masked MHA call, ``F.has_torch_function`` answers as torch's own elsewhere."""
    import threading

    from dropgeom import _intercept

    class Marked(torch.Tensor):
        pass

    t = torch.zeros(2).as_subclass(Marked)
    own = F.has_torch_function
    inside, other = [], []
    with _intercept._bypass_override_check():
        inside.append(F.has_torch_function((t,)))
        worker = threading.Thread(target=lambda: other.append(F.has_torch_function((t,))))
        worker.start()
        worker.join()
    assert inside == [False] and other == [True]
    assert F.has_torch_function is own  # restored


def test_chain_path_falls_back_when_a_custom_module_upstream_drops_functionally():
    """A chain-shaped model whose first module calls F.dropout: the chain pass is watched, the site
    found, and the generic path takes both layers (the quadratic form is additive over layers)."""
    torch.manual_seed(0)
    net = nn.Sequential(FuncDrop(p=0.4), nn.Tanh(), nn.Dropout(0.3), nn.Linear(2, 2)).double()
    x, y = _data(5, (2,))
    both = penalty(net, x).item()
    alone = penalty(net, x, layers=["2"]).item()  # the chain path: the functional site is not asked for
    site = penalty(net, x, layers=["0#dropout0"]).item()
    assert site > 0 and abs(both - alone - site) < 1e-14 * max(1.0, abs(both))
    t = terms(net, x, y)
    assert set(t.per_layer) == {"2", "0#dropout0"}
    assert abs(both - sum(0.5 * q / (1 - q) * t.per_layer[k]["fisher"] for k, q in t.p.items())) < 1e-13
