"""The exact divergence form through one ReLU: kink crossings (dropgeom.dropout._kinks) against brute force."""

import pytest
import torch
from torch import nn

from dropgeom.dropout import penalty
from dropgeom.dropout._kinks import kink_correction
from dropgeom.dropout.chain import as_chain, run_chain
from reference.dropout import sequential_eta, terms_dense
from reference.finite_diff import directional_fd

D = torch.float64


ACTIVATIONS = pytest.mark.parametrize("act", [nn.ReLU, lambda: nn.LeakyReLU(0.1)], ids=["relu", "leaky"])


def _relu_net(seed: int, dropout_on_input: bool = False, act=nn.ReLU) -> nn.Sequential:
    """Dropout layers each followed by a Linear, a (leaky) ReLU and an affine rest: the low-rank path."""
    torch.manual_seed(seed)
    first = [nn.Dropout(0.3)] if dropout_on_input else [nn.Linear(3, 7), act(), nn.Dropout(0.3)]
    width = 3 if dropout_on_input else 7
    return nn.Sequential(*first, nn.Linear(width, 9), act(), nn.Dropout(0.2), nn.Linear(9, 4)).to(D)


def _data(n: int = 11):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 3, generator=g, dtype=D) * 2.0, torch.randint(0, 4, (n,), generator=g)


def _drops(net: nn.Sequential, x: torch.Tensor, i: int, units: int) -> torch.Tensor:
    """eta with each unit of dropout module ``i`` dropped (hand-written forward): ``[U, n, K]``."""
    out = []
    for j in range(units):
        m = torch.ones(units, dtype=D)
        m[j] = 0.0
        out.append(sequential_eta(net, x, {i: m}))
    return torch.stack(out)


def _crossings(h, w, z):
    """Brute force: every (i, a, j) where dropping unit j moves z[i, a] across the kink."""
    shifted = z.unsqueeze(-1) - h.unsqueeze(1) * w.unsqueeze(0)  # [n, d, U]
    return (shifted > 0) != (z > 0).unsqueeze(-1)


@ACTIVATIONS
def test_signed_inputs_and_a_zero_preactivation_match_explicit_drops(act):
    net = _relu_net(0, dropout_on_input=True, act=act).eval()
    x, _ = _data()
    x[0] = torch.tensor([1.0, -1.0, 2.0], dtype=D)  # signed dropout inputs (no ReLU before the layer)
    with torch.no_grad():
        net[1].weight[0] = torch.tensor([1.0, 1.0, 0.0], dtype=D)
        net[1].bias[0] = 0.0  # z[0, 0] = 1 - 1 + 0 = 0 exactly: dropping unit 1 (delta = -1) crosses
    chain = run_chain(net, as_chain(net, ["0", "3"]), x, ["0", "3"])
    z = chain.states[2]
    assert z[0, 0].item() == 0.0
    cross = _crossings(chain.h("0"), net[1].weight, z)
    assert cross.sum() > 5 and cross[0, 0, 1] and not cross[0, 0, 0]  # delta = 1 moves z = 0 down: no crossing
    low = chain.dropped_relu("0")
    assert low is not None  # the low-rank path, not the per-unit pushes
    ref = _drops(net, x, 0, 3)
    assert torch.allclose(low, ref, rtol=1e-13, atol=1e-14)


def test_kink_correction_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, 5, generator=g, dtype=D)
    w = torch.randn(6, 5, generator=g, dtype=D)
    z = torch.randn(4, 6, generator=g, dtype=D) * 0.5
    lmat = torch.randn(3, 6, generator=g, dtype=D)
    cross = _crossings(h, w, z)
    assert cross.sum() > 10
    # brute force: c_ija = relu(z - delta) - relu(z) + 1[z > 0] delta, summed against L's columns
    delta = h.unsqueeze(1) * w.unsqueeze(0)  # [n, d, U]
    zz = z.unsqueeze(-1)
    c = torch.relu(zz - delta) - torch.relu(zz) + (zz > 0).to(D) * delta
    assert torch.equal(c.abs() > 1e-12, cross)  # zero off the crossings, up to rounding
    assert torch.allclose(kink_correction(z, h, w, lmat), torch.einsum("ka,nau->nku", lmat, c), rtol=1e-13, atol=1e-15)
    # away from the kinks the correction is polynomial in (z, h, W, L): central differences are accurate
    args = [t.clone().requires_grad_() for t in (z, h, w, lmat)]
    assert torch.autograd.gradcheck(kink_correction, args)
    out = kink_correction(*args)
    with pytest.raises(RuntimeError, match="differentiable once"):  # says so, where a HVP would silently be wrong
        torch.autograd.grad(out.pow(2).sum(), args, create_graph=True)


def test_kink_correction_blocks_of_several_samples_and_padding(monkeypatch):
    from dropgeom.dropout import _kinks

    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(7, 5, generator=g, dtype=D), torch.randn(6, 5, generator=g, dtype=D)
    z = torch.randn(7, 6, generator=g, dtype=D)
    z[2] = 100.0  # a sample without candidates
    lmat = torch.randn(3, 6, generator=g, dtype=D)
    args = [t.clone().requires_grad_() for t in (z, h, w, lmat)]
    monkeypatch.setattr(_kinks, "_BLOCK", 1)  # one sample per block, no padding
    assert len(_kinks._blocks(h, w, z)) == 6  # sample 2 has no candidate: no block
    empty = torch.empty
    with monkeypatch.context() as m:  # uninitialised memory as NaN: the gap between blocks must be written
        m.setattr(torch, "empty", lambda *size, **kw: torch.full(size, float("nan"), **kw))
        out = kink_correction(*args)
    assert torch.empty is empty
    ref_grads = torch.autograd.grad((out * out.detach()).sum(), args)
    monkeypatch.setattr(_kinks, "_BLOCK", 10**6)  # every sample in one padded block
    assert len(_kinks._blocks(h, w, z)) == 1
    out2 = kink_correction(*args)
    assert torch.allclose(out, out2, rtol=1e-14, atol=1e-15)
    for a, b in zip(ref_grads, torch.autograd.grad((out2 * out2.detach()).sum(), args)):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-14)
    assert out[2].abs().max() == 0


def test_kink_correction_rejects_shapes_that_do_not_fit():
    h, w, z = torch.ones(2, 3), torch.ones(4, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="shapes do not fit"):
        kink_correction(z, h, w, torch.ones(2, 5))
    with pytest.raises(ValueError, match="matrices"):
        kink_correction(z, h.unsqueeze(0), w, torch.ones(2, 4))


def test_nothing_crosses_gives_zero():
    h = torch.ones(2, 3)
    assert kink_correction(torch.full((2, 4), 5.0), h, torch.full((4, 3), 1e-3), torch.ones(2, 4)).abs().max() == 0


@ACTIVATIONS
@pytest.mark.parametrize("curv", [False, True], ids=["fisher", "curvature"])
def test_exact_divergence_on_a_relu_mlp_matches_bruteforce_generic_path_and_finite_differences(curv, act):
    from dropgeom.dropout._penalty import _penalty

    net = _relu_net(4, act=act)
    x, y = _data()
    params = list(net.parameters())

    def value(fast: bool):
        with torch.enable_grad():
            return _penalty(net, x, "categorical", None, "divergence", y, curv, None, "exact", None, None, fast=fast)[0]

    ref = 0.0
    for i in (2, 5):  # brute force: every unit dropped by the hand-written forward (theory.md 4.2)
        units = net[i - 2].out_features
        t = terms_dense(lambda m, i=i: sequential_eta(net, x, {i: m}), units, "categorical", y)
        ref += net[i].p * (t["divergence"].sum() + (t["curvature_bernoulli"].sum() if curv else 0.0)).item()
    chain = run_chain(net, as_chain(net, ["2", "5"]), x, ["2", "5"])
    assert chain.dropped_relu("2") is not None  # the low-rank path, not the per-unit pushes
    assert _crossings(chain.h("2"), net[3].weight, chain.states[4]).sum() > 20  # the case tested: many kink crossings
    fast = value(True)
    assert abs(fast.item() - ref) < 1e-12 * max(1.0, abs(ref))
    g_fast = torch.autograd.grad(fast, params)
    g_generic = torch.autograd.grad(value(False), params)
    for a, b in zip(g_fast, g_generic):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    direction = [torch.randn_like(q) for q in params]
    analytic = sum((a * d).sum() for a, d in zip(g_fast, direction)).item()
    numeric = directional_fd(lambda: value(True), params, direction, h=1e-7)
    assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
    # and through the public entry point
    assert abs(penalty(net, x, form="divergence", curvature=curv, targets=y).value.item() - ref) < 1e-12 * max(1.0, abs(ref))


@ACTIVATIONS
@pytest.mark.parametrize("block", [None, 7 * 4 * 4], ids=["one-chunk", "chunks-of-4-samples"])
def test_terms_on_a_relu_mlp_use_the_low_rank_drops_and_match_bruteforce(act, block, monkeypatch):
    from dropgeom.dropout import _terms, terms
    from dropgeom.dropout.chain import Chain

    if block is not None:
        monkeypatch.setattr(_terms, "_DROP_BLOCK", block)  # [U=7, 4 samples, K=4] blocks: 11 samples in 3 chunks
    net = _relu_net(5, act=act)
    x, y = _data()
    ref = {}
    for i in (2, 5):
        units = net[i - 2].out_features
        ref[str(i)] = terms_dense(lambda m, i=i: sequential_eta(net, x, {i: m}), units, "categorical", y)

    pushed = []
    push = Chain.push
    monkeypatch.setattr(Chain, "push", lambda self, pos, v: pushed.append(pos) or push(self, pos, v))
    got = terms(net, x, y)
    assert 4 not in pushed  # layer "2": no per-unit push through its ReLU (module 4), the low-rank drops instead
    for layer, dense in ref.items():
        for key in ("divergence", "curvature_bernoulli", "fisher", "curvature_gaussian"):
            torch.testing.assert_close(got.per_unit[layer][key], dense[key], rtol=1e-11, atol=1e-13, msg=f"{layer} {key}")
