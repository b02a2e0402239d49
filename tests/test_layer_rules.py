"""The layer-rule registry of the Fisher fast paths (theory.md section 2): Conv3d and a user's own layer.

Oracles, float64:
* the dense Fisher ``(1/n) sum_i J_i^T Sigma_i J_i`` from the Jacobian of the flattened
  model (tests/reference/dense.py, torch.autograd.functional);
* the KFC factors assembled from brute-force Jacobians (``torch.func.jacrev``): the input
  patches ``a_it`` are the rows of ``d o_it / d W`` (``o_t = W a_t + b``), never the rule's
  own unfolding, and ``B = (1/n) sum_{i,t} (d eta_i / d o_it)^T Sigma_i (d eta_i / d o_it)``;
* BackPACK's ``DiagGGNExact`` (it has a Conv3d extension).

A spy rule records whether the fast path ran; an unregistered layer (or a subclass that
overrides ``forward``) must take the generic path and still match the dense Fisher.
"""

from __future__ import annotations

import copy
from typing import List, Union

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import DiagGGNExact
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from dropgeom import ModelManifold, fisher
from dropgeom._capture import rule_layers
from dropgeom.layer_rules import LAYER_RULES, Conv3dRule, LayerRule, input_factor, layer_diagonal, layer_rule, register_layer_rule
from reference import dense as ref

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

DT = torch.float64
N, K = 6, 3


def _close(a: Tensor, b: Tensor, rtol: float = 1e-10) -> None:
    scale = b.abs().max().clamp_min(1e-300)
    assert (a - b).abs().max() <= rtol * scale, f"max rel. difference {float((a - b).abs().max() / scale):.3e}"


class Pointwise(nn.Module):
    """A user's layer: a 1x1 convolution over a sequence, ``o[:, :, l] = W x[:, :, l] + b``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in))
        self.bias = nn.Parameter(torch.randn(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("oc,ncl->nol", self.weight, x) + self.bias[:, None]


class PointwiseRule(LayerRule):
    """Positions ``l`` are the ``T`` axis: inputs ``[n, L, C_in]``, columns ``[R, n, L, C_out]``."""

    input_dim = 3
    calls: List[str] = []

    def unfold(self, mod: nn.Module, x: Tensor) -> Tensor:
        return x.transpose(1, 2)

    def columns(self, mod: nn.Module, g: Tensor) -> Tensor:
        return g.transpose(2, 3)

    def diagonal(self, a, g, has_bias, scale):
        PointwiseRule.calls.append("diagonal")
        return super().diagonal(a, g, has_bias, scale)

    def input_factor(self, a, has_bias, n):
        PointwiseRule.calls.append("input_factor")
        return super().input_factor(a, has_bias, n)


class SpyConv3d(Conv3dRule):
    calls: List[str] = []

    def diagonal(self, a, g, has_bias, scale):
        SpyConv3d.calls.append("diagonal")
        return super().diagonal(a, g, has_bias, scale)

    def input_factor(self, a, has_bias, n):
        SpyConv3d.calls.append("input_factor")
        return super().input_factor(a, has_bias, n)


@pytest.fixture
def pointwise_rule():
    PointwiseRule.calls = []
    register_layer_rule(Pointwise)(PointwiseRule)
    yield
    del LAYER_RULES[Pointwise]


@pytest.fixture
def spy_conv3d(monkeypatch):
    SpyConv3d.calls = []
    monkeypatch.setitem(LAYER_RULES, nn.Conv3d, SpyConv3d())
    return SpyConv3d.calls


def _conv3d_net(same: Union[str, int] = "same") -> tuple:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(2, 3, (2, 3, 2), padding=(1, 1, 0), stride=(1, 2, 1), dilation=(2, 1, 1)),
        nn.Tanh(),
        nn.Conv3d(3, 2, 3, padding=same),
        nn.ReLU(),
        nn.Conv3d(2, 2, 2, stride=2, bias=False),
        nn.Flatten(),
    )
    x = torch.randn(N, 2, 4, 5, 4)
    width = net(x).shape[1]
    net.append(nn.Linear(width, K))
    return net.to(DT), x.to(DT)


def _pointwise_net() -> tuple:
    torch.manual_seed(1)
    net = nn.Sequential(Pointwise(2, 4), nn.Tanh(), Pointwise(4, 3), nn.Flatten(), nn.Linear(3 * 5, K))
    return net.to(DT), torch.randn(N, 2, 5, dtype=DT)


def _dense_reference(net: nn.Module, x: Tensor, family: str = "categorical") -> Tensor:
    f, theta0, _ = ref.flat_model(net, x)
    return ref.exact_fisher(ref.dense_jacobian(f, theta0), f(theta0).detach(), family)


def _kfc_reference(net: nn.Sequential, k: int, x: Tensor, family: str = "categorical") -> tuple:
    """``(A, B)`` of module ``k`` from brute-force Jacobians (see the module docstring)."""
    h = net[:k](x).detach()
    mod, head = net[k], net[k + 1 :]
    params = {n: p.detach() for n, p in mod.named_parameters()}
    o = functional_call(mod, params, (h,)).detach()
    c_out = o.shape[1]
    T, d_in = o[0, 0].numel(), params["weight"][0].numel()
    dW = jacrev(lambda W: functional_call(mod, {**params, "weight": W}, (h,)))(params["weight"])
    a = dW[:, 0].reshape(N, T, c_out, d_in)[:, :, 0]  # a_it = d o_{i,0,t} / d W_{0,:}: [n, T, d_in]
    if "bias" in params:
        a = torch.cat([a, torch.ones(N, T, 1, dtype=DT)], -1)
    A = torch.einsum("ntd,nte->de", a, a) / (N * T)
    Jo = vmap(jacrev(lambda oi: head(oi.unsqueeze(0))[0]))(o).reshape(N, K, c_out, T)  # d eta_i / d o_it
    cov = ref.closed_form_cov(family, net(x).detach())
    B = torch.einsum("nkct,nkl,nldt->cd", Jo, cov, Jo) / N
    return A, B


def _kfac_block(op, m: ModelManifold, name: str, mod: nn.Module) -> Tensor:
    slices = m.param_slices()
    w = slices[f"{name}.weight"]
    b = slices.get(f"{name}.bias") if getattr(mod, "bias", None) is not None else None
    idx = ref.wb_index(w, b, mod.weight.shape[0], mod.weight[0].numel())
    return op.dense()[idx[:, None], idx[None, :]]


def _check_against_brute_force(net: nn.Sequential, x: Tensor, rule_layer_names: List[str]) -> None:
    m = ModelManifold(net, x, "categorical")
    F = _dense_reference(net, x)
    _close(fisher(m, "exact", "diag").diag(), F.diagonal())
    _close(fisher(m, "exact", "implicit").diag(), F.diagonal())
    layer = fisher(m, "exact", "layer").dense()
    _close(layer[layer != 0], F[layer != 0])
    kfac = fisher(m, "exact", "kfac")
    assert sorted(kb.name for kb in kfac.kron_blocks) == sorted(rule_layer_names)
    for name in rule_layer_names:
        k = int(name)
        A, B = _kfc_reference(net, k, x)
        _close(_kfac_block(kfac, m, name, net[k]), ref.kron_block(B, A))


def test_conv3d_is_a_registered_rule():
    assert type(layer_rule(nn.Conv3d(2, 3, 2))) is Conv3dRule
    assert layer_rule(nn.Conv3d(2, 4, 2, groups=2)) is None  # grouped: generic path
    assert layer_rule(nn.Conv3d(2, 3, 2, padding=1, padding_mode="reflect")) is None
    assert layer_rule(nn.Conv3d(2, 3, 2, padding="same")) is None  # even kernel: uneven padding


def test_conv3d_fast_paths_match_brute_force(spy_conv3d):
    """Diagonal, layer blocks and KFC of a Conv3d net (stride, dilation, asymmetric kernel,
    "same", no bias) against the dense Fisher and brute-force KFC factors."""
    net, x = _conv3d_net()
    assert sorted(rule_layers(ModelManifold(net, x, "categorical"))) == ["0", "2", "4", "6"]
    _check_against_brute_force(net, x, ["0", "2", "4", "6"])
    # diag and implicit's diag: 3 convs each, once per column of S (K - 1 for the exact categorical Fisher); kfac: once
    assert spy_conv3d.count("diagonal") == 6 * (K - 1) and spy_conv3d.count("input_factor") == 3


def test_conv3d_diag_matches_backpack_diag_ggn_exact():
    net, x = _conv3d_net(same=1)  # BackPACK's convolutions take numeric padding only
    y = torch.randint(0, K, (N,))
    bnet = extend(copy.deepcopy(net))
    loss = extend(nn.CrossEntropyLoss())(bnet(x), y)
    with backpack(DiagGGNExact()):
        loss.backward()
    bp = torch.cat([p.diag_ggn_exact.reshape(-1) for p in bnet.parameters()])
    _close(fisher(ModelManifold(net, x, "categorical"), "exact", "diag").diag(), bp)


def test_conv3d_sum_mc_and_empirical_match_brute_force():
    net, x = _conv3d_net()
    m = ModelManifold(net, x, "categorical")
    f, theta0, _ = ref.flat_model(net, x)
    J = ref.dense_jacobian(f, theta0)
    y = torch.randint(0, K, (N,))
    _close(
        fisher(m, "empirical", "diag", targets=y, reduction="sum").diag(),
        N * ref.empirical_fisher(J, f(theta0).detach(), y, "categorical").diagonal(),
    )
    # the same draws (seeded generator): the fast diagonal is that of the generic dense path
    mc = fisher(m, "mc", "diag", n_samples=2, generator=torch.Generator().manual_seed(3)).diag()
    dense_mc = fisher(m, "mc", "dense", n_samples=2, generator=torch.Generator().manual_seed(3)).dense()
    _close(mc, dense_mc.diagonal())


def test_a_registered_user_layer_takes_the_fast_path(pointwise_rule):
    net, x = _pointwise_net()
    assert sorted(rule_layers(ModelManifold(net, x, "categorical"))) == ["0", "2", "4"]
    _check_against_brute_force(net, x, ["0", "2", "4"])
    assert PointwiseRule.calls.count("diagonal") == 4 * (K - 1) and PointwiseRule.calls.count("input_factor") == 2


def test_an_unregistered_user_layer_takes_the_generic_path():
    PointwiseRule.calls = []
    net, x = _pointwise_net()
    m = ModelManifold(net, x, "categorical")
    assert layer_rule(net[0]) is None and sorted(rule_layers(m)) == ["4"]
    F = _dense_reference(net, x)
    _close(fisher(m, "exact", "diag").diag(), F.diagonal())
    kfac = fisher(m, "exact", "kfac")
    assert [kb.name for kb in kfac.kron_blocks] == ["4"] and len(kfac.dense_blocks) == 2  # exact blocks
    assert PointwiseRule.calls == []


def test_subclasses_inherit_a_rule_unless_they_override_forward(pointwise_rule):
    class Same(Pointwise):
        pass

    class Squared(Pointwise):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) ** 2

    assert isinstance(layer_rule(Same(2, 3)), PointwiseRule)
    assert layer_rule(Squared(2, 3)) is None
    torch.manual_seed(2)
    net = nn.Sequential(Squared(2, 3), nn.Flatten(), nn.Linear(15, K)).to(DT)
    x = torch.randn(N, 2, 5, dtype=DT)
    m = ModelManifold(net, x, "categorical")
    _close(fisher(m, "exact", "diag").diag(), _dense_reference(net, x).diagonal())


def test_a_rule_that_rejects_the_recorded_input_falls_back():
    """A layer whose rule's ``accepts`` says no at capture time takes the generic path."""

    class Rejecting(PointwiseRule):
        def accepts(self, mod: nn.Module, x: Tensor) -> bool:
            return False

    register_layer_rule(Pointwise)(Rejecting)
    try:
        net, x = _pointwise_net()
        m = ModelManifold(net, x, "categorical")
        assert sorted(rule_layers(m)) == ["0", "2", "4"]  # selected, then rejected in the forward hook
        PointwiseRule.calls = []
        _close(fisher(m, "exact", "diag").diag(), _dense_reference(net, x).diagonal())
        assert PointwiseRule.calls == []
    finally:
        del LAYER_RULES[Pointwise]


def test_registration_errors_name_the_problem():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer_rule(int)
    with pytest.raises(TypeError, match="must be a LayerRule"):
        register_layer_rule(Pointwise)(object())
    assert Pointwise not in LAYER_RULES
    with pytest.raises(TypeError, match="the class Linear; pass an instance"):  # None ("no rule") before
        layer_rule(nn.Linear)


def test_layer_function_shape_errors_name_the_problem():
    a, g = torch.randn(2, 3, 4), torch.randn(1, 2, 3, 5)
    with pytest.raises(ValueError, match=r"layer_diagonal takes a \[n, T, d_in\] and g \[R, n, T, d_out\]"):
        layer_diagonal(a, g[0], True)  # "not enough values to unpack" before
    with pytest.raises(ValueError, match="the same n and T"):
        layer_diagonal(a[:, :2], g, True)  # a bmm shape error before
    with pytest.raises(ValueError, match=r"input_factor takes a \[n, T, d_in\]"):
        input_factor(a[:, 0], True, 2)  # an IndexError before
    for n in (0, -2):  # inf / a negated factor before
        with pytest.raises(ValueError, match="n .* must be a positive int"):
            input_factor(a, True, n)


@pytest.mark.parametrize("layout", ["rows", "channel_first", "sample_major_columns"])
def test_outer_sum_matches_the_sum_of_outer_products_in_every_layout(layout):
    """``outer_sum`` (the Kronecker factors' kernel) against an explicit float64 sum of ``x x^T`` over all rows."""
    from dropgeom.linalg import outer_sum

    torch.manual_seed(3)
    R, n, T, d = 3, 4, 5, 6
    if layout == "rows":  # Linear inputs / columns: [.., T, d] row-major
        X = torch.randn(R, n, T, d, dtype=DT)
    elif layout == "channel_first":  # unfolded patches / conv output columns: a view of [.., d, T]
        X = torch.randn(R, n, d, T, dtype=DT).transpose(-1, -2)
    else:  # capture's buffers: [n, R, d, T] in memory, seen as [R, n, T, d]
        X = torch.randn(n, R, d, T, dtype=DT).permute(1, 0, 3, 2)
    rows = X.reshape(-1, d)
    expected = sum(torch.outer(x, x) for x in rows)
    got = outer_sum(X, max_bytes=2 * d * d * 8)  # two rows of partial products at a time: several chunks
    _close(got, expected)
    assert torch.equal(got, got.T)
