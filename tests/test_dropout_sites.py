"""Every kind of dropout as explicit masks: attention-weight dropout, F.dropout / SDPA in custom
forwards, channel and alpha dropout, DropConnect and stochastic depth.

References: float64 enumeration of every mask with hand-written forwards
(``tests/reference/dropout.py``), and torch's own train-mode forward averaged over many
passes (Monte Carlo, within 4 standard errors).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dropgeom import ModelManifold
from dropgeom.dropout import StochasticDepth, dropout_sites, forward_with_masks, gap, mixture, penalty, sample_masks, terms
from reference.dropout import alpha_dropout_at, exact_gap, mha_self_attention, mixture_exact, terms_dense
from reference.site_models import AttnNet, FuncDrop, SdpaNet

D = torch.float64


def _data(n=5, shape=(2, 2), k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=D), torch.randint(0, k, (n,), generator=g)


def _train_mode_gap(net, x, y, draws=3000, seed=1, clean=None):
    """torch's own train-mode forward: mean and standard error of L_drop - L_clean."""
    net.eval()
    with torch.no_grad():
        clean = F.cross_entropy(net(x), y) if clean is None else clean
        net.train()
        torch.manual_seed(seed)
        losses = torch.stack([F.cross_entropy(net(x), y) for _ in range(draws)])
    net.eval()
    return float(losses.mean() - clean), float(losses.std() / math.sqrt(draws))


def _within(a, b, se):
    assert abs(a - b) < 4 * se, (a, b, se)


# -- attention-weight dropout of nn.MultiheadAttention ------------------------------


@pytest.mark.parametrize("need_weights", [True, False])
def test_attention_masks_match_hand_written_attention(need_weights):
    torch.manual_seed(0)
    net = AttnNet(e=4, heads=2).double()
    x, _ = _data(3, (3, 4))
    sites = dropout_sites(net, x)
    assert list(sites) == ["attn"] and sites["attn"].kind == "attention"
    assert tuple(sites["attn"].unit_shape) == (2, 3, 3)
    g = torch.Generator().manual_seed(3)
    m = sample_masks(net, x, generator=g)["attn"]
    out = forward_with_masks(net, (x,), {"attn": m}) if need_weights else None
    ref = net.head(torch.tanh(x + mha_self_attention(net.attn, x, m)).mean(1))
    if not need_weights:
        with torch.no_grad():
            from dropgeom.manifold import eval_mode

            with eval_mode(net, masks={"attn": m}, warn=False):
                out = net(x, need_weights=False)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_attention_dropout_gap_terms_mixture_against_enumeration():
    torch.manual_seed(0)
    net = AttnNet().double()
    x, y = _data(4, (2, 2))

    def eta(mv):
        return net.head(torch.tanh(x + mha_self_attention(net.attn, x, mv.reshape(1, 2, 2))).mean(1))

    r = gap(net, x, y)
    assert r.n_masks == 16
    assert abs(r.value - exact_gap(eta, 4, 0.3, "categorical", y)) < 1e-12
    t = terms(net, x, y)
    ref = terms_dense(eta, 4, "categorical", y)
    for name, v in ref.items():
        torch.testing.assert_close(t.per_unit["attn"][name].reshape(-1), v, rtol=1e-9, atol=1e-12)
    mix = mixture(net, x, alpha=0.5, method="exact")
    for kind, v in mixture_exact(eta, 4, 0.3, 0.5).items():
        torch.testing.assert_close(mix.probs[kind], v, rtol=1e-10, atol=1e-12)


def test_attention_dropout_gap_matches_torch_train_mode():
    torch.manual_seed(0)
    net = AttnNet(e=4, heads=2, k=3, p=0.4).double()
    x, y = _data(8, (3, 4), k=3)
    r = gap(net, x, y, method="mc", n_samples=1500, generator=torch.Generator().manual_seed(0))
    ref, se = _train_mode_gap(net, x, y, 1500)
    _within(r.value, ref, math.hypot(se, r.stderr))


def test_penalty_takes_the_attention_dropout_without_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("pre", nn.Linear(2, 2))
    model.add_module("attn_net", AttnNet())
    x, y = _data(3, (2, 2))
    model = model.double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        val = penalty(model, x)  # values against brute force: tests/test_dropout_penalty_sites.py
    t = terms(model, x, y)
    assert list(t.per_layer) == ["attn_net.attn"]
    assert abs(val.item() - 0.5 * 0.3 / 0.7 * t.fisher) < 1e-13


# -- F.dropout and scaled_dot_product_attention in a custom forward -----------------


def test_functional_dropout_sites_enumeration_and_warning():
    torch.manual_seed(0)
    net = FuncDrop().double()
    x, y = _data(6, (2,))
    assert {k: (s.kind, s.p) for k, s in dropout_sites(net, x).items()} == {"#dropout0": ("dropout", 0.4)}

    def eta(mv):
        return net.lin2(torch.tanh(net.lin1(x)) * mv)

    assert abs(gap(net, x, y).value - exact_gap(eta, 3, 0.4, "categorical", y)) < 1e-12
    t = terms(net, x, y)
    for name, v in terms_dense(eta, 3, "categorical", y).items():
        torch.testing.assert_close(t.per_unit["#dropout0"][name], v, rtol=1e-9, atol=1e-12)
    r = gap(net, x, y, method="mc", n_samples=1500, generator=torch.Generator().manual_seed(0))
    ref, se = _train_mode_gap(net, x, y, 1500)
    _within(r.value, ref, math.hypot(se, r.stderr))
    # an interceptor asked to warn names a functional site it evaluates without a mask
    from dropgeom.manifold import eval_mode

    host = nn.Sequential(nn.Dropout(0.2), FuncDrop().double())
    with pytest.warns(RuntimeWarning, match=r"F.dropout .*module '1'.*leaves it out.*'1#dropout0'"):
        with eval_mode(host, warn=True):
            host(x)


def test_unconditional_functional_dropout_is_deterministic_under_dropgeom():
    torch.manual_seed(0)
    net = FuncDrop(always=0.5).double()
    x, y = _data(6, (2,))
    m = ModelManifold(net, x)
    torch.testing.assert_close(m.eta(), net.lin2(torch.tanh(net.lin1(x))))  # eval: identity, never random
    assert set(dropout_sites(net, x)) == {"#dropout0", "#dropout1"}


def test_sdpa_dropout_explicit_and_against_torch_train_mode():
    torch.manual_seed(0)
    net = SdpaNet().double()
    x, y = _data(8, (2, 2))
    sites = dropout_sites(net, x)
    assert {k: (s.kind, tuple(s.unit_shape)) for k, s in sites.items()} == {"#sdpa0": ("attention", (1, 2, 2))}

    def eta(mv):
        q, k, v = net.qkv(x).chunk(3, -1)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(2), -1) * mv.reshape(2, 2)
        return net.head(torch.tanh(w @ v).mean(1))

    assert abs(gap(net, x, y).value - exact_gap(eta, 4, 0.3, "categorical", y)) < 1e-12
    r = gap(net, x, y, method="mc", n_samples=1500, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = F.cross_entropy(eta(torch.ones(4, dtype=D)), y)  # SDPA drops even in eval mode
    ref, se = _train_mode_gap(net, x, y, 1500, clean=clean)
    _within(r.value, ref, math.hypot(se, r.stderr))


# -- channel and alpha dropout, stochastic depth, DropConnect ------------------------


def test_channel_dropout_against_enumeration():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(1, 3, 2), nn.Tanh(), nn.Dropout1d(0.3), nn.Flatten(), nn.Linear(6, 2)).double()
    x, y = _data(5, (1, 3))

    def eta(mv):
        h = torch.tanh(net[0](x)) * mv.reshape(1, 3, 1)
        return net[4](h.flatten(1))

    assert abs(gap(net, x, y).value - exact_gap(eta, 3, 0.3, "categorical", y)) < 1e-12
    t = terms(net, x, y)
    for name, v in terms_dense(eta, 3, "categorical", y).items():
        torch.testing.assert_close(t.per_unit["2"][name], v, rtol=1e-9, atol=1e-12)
    mix = mixture(net, x, alpha=-0.5, method="exact")
    for kind, v in mixture_exact(eta, 3, 0.3, -0.5).items():
        torch.testing.assert_close(mix.probs[kind], v, rtol=1e-10, atol=1e-12)
    r = gap(net, x, y, method="mc", n_samples=2000, generator=torch.Generator().manual_seed(0))
    ref, se = _train_mode_gap(net, x, y, 2000)
    _within(r.value, ref, math.hypot(se, r.stderr))


@pytest.mark.parametrize("feature", [False, True])
def test_alpha_dropout_against_enumeration_and_torch(feature):
    torch.manual_seed(0)
    drop = nn.FeatureAlphaDropout(0.3) if feature else nn.AlphaDropout(0.3)
    shape = (3, 1) if feature else (3,)
    net = nn.Sequential(nn.Linear(2, 3), nn.SELU(), nn.Unflatten(1, shape), drop, nn.Flatten(), nn.Linear(3, 2)).double()
    x, y = _data(6, (2,))

    def eta(mv):
        keep = mv * 0.7  # masks are b / (1 - p)
        return net[5](alpha_dropout_at(F.selu(net[0](x)), keep, 0.3))

    assert dropout_sites(net, x)["3"].kind == ("feature_alpha" if feature else "alpha")
    with torch.no_grad():  # exact_gap subtracts L(m = 1); the clean loss of alpha dropout is eval mode's
        shift = F.cross_entropy(eta(torch.ones(3, dtype=D)), y) - F.cross_entropy(net.eval()(x), y)
    assert abs(gap(net, x, y).value - exact_gap(eta, 3, 0.3, "categorical", y) - float(shift)) < 1e-12
    mix = mixture(net, x, method="exact")
    torch.testing.assert_close(mix.probs["m"], mixture_exact(eta, 3, 0.3, 0.0)["m"], rtol=1e-10, atol=1e-12)
    r = gap(net, x, y, method="mc", n_samples=2000, generator=torch.Generator().manual_seed(0))
    ref, se = _train_mode_gap(net, x, y, 2000)
    _within(r.value, ref, math.hypot(se, r.stderr))
    with pytest.raises(ValueError, match="module's own p"):
        gap(net, x, y, p=0.1)
    # terms and penalty along the mask line: tests/test_dropout_penalty_sites.py


def test_stochastic_depth_against_enumeration_and_torch():
    torch.manual_seed(0)
    blk = StochasticDepth(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), p=0.3)
    net = nn.Sequential(nn.Linear(2, 3), blk, nn.Linear(3, 2)).double()
    x, y = _data(6, (2,))
    site = dropout_sites(net, x)["1.drop"]
    assert site.kind == "sample" and tuple(site.unit_shape) == ()

    def eta(mv):
        h = net[0](x)
        return net[2](h + blk.branch(h) * mv)

    assert abs(gap(net, x, y).value - exact_gap(eta, 1, 0.3, "categorical", y)) < 1e-12
    t = terms(net, x, y)
    for name, v in terms_dense(eta, 1, "categorical", y).items():
        torch.testing.assert_close(t.per_unit["1.drop"][name].reshape(1), v, rtol=1e-9, atol=1e-12)
    r = gap(net, x, y, method="mc", n_samples=2000, generator=torch.Generator().manual_seed(0))
    ref, se = _train_mode_gap(net, x, y, 2000)
    _within(r.value, ref, math.hypot(se, r.stderr))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        StochasticDepth(nn.Identity(), p=1.0)


def test_dropconnect_gap_terms_mixture_against_enumeration():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    x, y = _data(5, (2,))

    def eta(mv):
        w = net[2].weight * mv.reshape(2, 2)
        return torch.tanh(net[0](x)) @ w.T + net[2].bias

    kw = dict(noise="dropconnect", p=0.25, layers=["2"])
    r = gap(net, x, y, **kw)
    assert r.n_masks == 16 and abs(r.value - exact_gap(eta, 4, 0.25, "categorical", y)) < 1e-12
    t = terms(net, x, y, layers=["2"], noise="dropconnect", p=0.25)
    for name, v in terms_dense(eta, 4, "categorical", y).items():
        torch.testing.assert_close(t.per_unit["2"][name].reshape(-1), v, rtol=1e-9, atol=1e-12)
    mix = mixture(net, x, alpha=0.5, method="exact", **kw)
    for kind, v in mixture_exact(eta, 4, 0.25, 0.5).items():
        torch.testing.assert_close(mix.probs[kind], v, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="needs p"):
        gap(net, x, y, noise="dropconnect")


# -- bad input -------------------------------------------------------------------------


def test_bad_inputs_name_the_problem():
    net = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.2), nn.Linear(3, 2)).double()
    x32, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"inputs\[0\] has dtype torch.float32.*torch.float64.*\.to\("):
        ModelManifold(net, x32)
    with pytest.raises(ValueError, match=r"inputs\[0\] has dtype torch.float32"):
        gap(net, x32, y)

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.unused = nn.Linear(2, 2), nn.Dropout(0.1)

        def forward(self, x):
            return F.dropout(self.lin(x), 0.2, self.training)

    with pytest.raises(ValueError, match="'unused' is never run"):
        gap(Skips().double(), x32.double(), y, layers=["unused"])
    bad = AttnNet(p=1.0).double()
    with pytest.raises(ValueError, match=r"'attn' must lie in \[0, 1\)"):
        gap(bad, torch.zeros(4, 2, 2, dtype=D), y)
    with pytest.raises(ValueError, match="never run"):
        forward_with_masks(FuncDrop().double(), torch.zeros(4, 2, dtype=D), {"#dropout5": torch.ones(1, 3, dtype=D)})


def test_layer_without_forward_mode_rule_is_named():
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.sin()

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            return g * ctx.saved_tensors[0].cos()

    class Sine(nn.Module):
        def forward(self, x):
            return NoJvp.apply(x)

    net = nn.Sequential(nn.Linear(2, 3), Sine(), nn.Linear(3, 2)).double()
    m = ModelManifold(net, torch.randn(4, 2, dtype=D))
    with pytest.raises(NotImplementedError, match=r"module '1' \(Sine\) has no forward-mode"):
        m.jvp(torch.ones(m.num_params, dtype=D))


@pytest.mark.parametrize("family", ["bernoulli", "gaussian"])
def test_mixture_every_family_against_enumeration(family):
    import itertools

    from reference.dropout import mean_param, nll

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Dropout(0.3), nn.Linear(3, 2)).double()
    x, _ = _data(5, (2,))
    y = (torch.rand(5, 2, generator=torch.Generator().manual_seed(2)) > 0.5).double()
    etas, ws = [], []
    for bits in itertools.product((0.0, 1.0), repeat=3):
        b = torch.tensor(bits, dtype=D)
        ws.append(0.7 ** b.sum().item() * 0.3 ** (3 - b.sum().item()))
        etas.append(net[3](torch.tanh(net[0](x)) * b / 0.7).detach())
    w = torch.tensor(ws, dtype=D)
    E = torch.stack(etas)
    res = mixture(net, x, y, method="exact", family=family)
    assert res.probs is None and res.family == family
    torch.testing.assert_close(res.eta["e"], (w[:, None, None] * E).sum(0), rtol=1e-12, atol=1e-12)
    mu = torch.stack([mean_param(family, e) for e in E])
    torch.testing.assert_close(res.mean["m"], (w[:, None, None] * mu).sum(0), rtol=1e-12, atol=1e-12)
    lp = torch.stack([-nll(family, e, y) for e in E])  # [M, n]
    m_nll = -torch.logsumexp(w.log()[:, None] + lp, 0).mean()
    assert abs(res.nll["m"] - float(m_nll)) < 1e-12
