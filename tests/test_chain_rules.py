"""The chain-rule registry of the dropout fast path (theory.md 4.2): a user's activation is one registered class.

Oracle: ``eta(m) = rest(h * m)`` as a function of the dropout mask ``m``, differentiated by
``torch.func`` (``jacrev`` for the pull-back, nested ``jacfwd`` for ``d^2 eta / d m_j^2``), float64.
An unregistered module keeps a model off the chain path.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import jacfwd, jacrev, vmap

from dropgeom.dropout.chain import as_chain, run_chain
from dropgeom.dropout.chain_rules import CHAIN_RULES, ChainRule, ElementwiseRule, chain_rule, register_chain_rule

DT = torch.float64


class Cube(nn.Module):
    def forward(self, v: Tensor) -> Tensor:
        return v**3


class CubeRule(ElementwiseRule):
    """Closed forms ``a' = 3 v^2``, ``a'' = 6 v``."""

    def d1(self, mod: nn.Module, v: Tensor, out=None) -> Tensor:
        return 3 * v * v

    def d2(self, mod: nn.Module, v: Tensor) -> Tensor:
        return 6 * v


def _net() -> tuple:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 4), Cube(), nn.Linear(4, 2))
    return net.to(DT), torch.randn(7, 3, dtype=DT)


@pytest.fixture(params=[CubeRule, ElementwiseRule], ids=["closed-form", "jvp"])
def cube_rule(request):
    register_chain_rule(Cube)(request.param)
    yield
    del CHAIN_RULES[Cube]


def test_an_unregistered_module_keeps_the_model_off_the_chain_path():
    net, _ = _net()
    assert chain_rule(net[4]) is None and as_chain(net, ["2"]) is None


def test_a_registered_activation_matches_brute_force(cube_rule):
    net, x = _net()
    mods = as_chain(net, ["2"])
    assert mods is not None
    with torch.no_grad():
        chain = run_chain(net, mods, x, ["2"])
    h = net[:2](x).detach()  # the dropout layer's input
    rest = net[3:]

    def eta_of_mask(m: Tensor) -> Tensor:  # one sample: m [U], returns [K]
        return rest(m.unsqueeze(0))[0]

    ones = torch.ones_like(h)
    # pull-back: w^T d eta / d h~ at the dropout output
    w = torch.randn(7, 2, dtype=DT)
    J = vmap(jacrev(eta_of_mask))(h)  # [n, K, U]: d eta / d h~
    torch.testing.assert_close(chain.pull_back(w, ["2"])["2"], torch.einsum("nk,nku->nu", w, J), rtol=1e-12, atol=1e-12)

    # second derivative along each unit's tangent: d^2 eta_i / d m_ij^2 with h~ = h * m
    def eta_along(s: Tensor, j: int) -> Tensor:
        e = torch.zeros(h.shape[1], dtype=DT)
        e[j] = 1.0
        return rest(h * (ones + s * e))

    units = torch.arange(h.shape[1])
    pos, _, t = chain.tangents("2", units)
    second = chain.second(pos, t)  # [U, n, K]
    first = chain.forward_tangent(pos, t)
    for j in range(h.shape[1]):
        s0 = torch.zeros((), dtype=DT)
        torch.testing.assert_close(first[j], jacfwd(eta_along)(s0, j), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(second[j], jacfwd(jacfwd(eta_along))(s0, j), rtol=1e-12, atol=1e-12)

    # the closed-form curvature contraction (one activation before an affine rest) agrees
    r = torch.randn(7, 2, dtype=DT)
    closed = chain.curvature_rank1("2", r)
    assert closed is not None
    torch.testing.assert_close(closed, torch.einsum("unk,nk->nu", second, r), rtol=1e-12, atol=1e-12)


def test_registration_errors_name_the_problem():
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        register_chain_rule(float)
    with pytest.raises(TypeError, match="must be a ChainRule"):
        register_chain_rule(Cube)(object())
    assert Cube not in CHAIN_RULES
    assert isinstance(chain_rule(nn.Linear(2, 2)), ChainRule)
    with pytest.raises(TypeError, match="the class Tanh; pass an instance"):  # None before: "no rule for Tanh"
        chain_rule(nn.Tanh)


BUILT_IN = [t for t, rule in CHAIN_RULES.items() if isinstance(rule, ElementwiseRule)]


@pytest.mark.parametrize("make", BUILT_IN + [lambda: nn.LeakyReLU(0.1)], ids=lambda t: getattr(t, "__name__", "LeakyReLU(0.1)"))
def test_every_built_in_activation_rule_matches_autograd(make):
    mod = make()
    rule = chain_rule(mod)
    v = torch.linspace(-3.0, 3.0, 61, dtype=DT) + 0.0123  # no point on a kink
    d1 = torch.func.vmap(torch.func.grad(lambda s: mod(s)))(v)
    d2 = torch.func.vmap(torch.func.grad(torch.func.grad(lambda s: mod(s))))(v)
    torch.testing.assert_close(rule.d1(mod, v, mod(v)), d1, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(rule.d2(mod, v), d2, atol=1e-13, rtol=1e-13)
    slope = rule.kink_slope(mod)
    if slope is not None:  # one kink at 0: a(v) = v above it, slope * v below
        torch.testing.assert_close(mod(v), torch.where(v > 0, v, slope * v), atol=0, rtol=0)


def test_per_sample_tangent_is_row_major_and_exact():
    """``tangent_per_sample`` through the first downstream Linear: ``h_ij W[:, j]`` for one unit per sample, laid out
    row-major (a column-major tangent made the next Linear's matmul 5x slower on the quadratic ``unit`` path)."""
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x = torch.randn(7, 4, dtype=DT)
    with torch.no_grad():
        chain = run_chain(net, as_chain(net, ["2"]), x, ["2"])
    units = torch.tensor([0, 5, 2, 2, 1, 3, 4])
    _, _, t = chain.tangent_per_sample("2", units)
    h = net[:2](x).detach()
    expected = torch.stack([h[i, j] * net[3].weight[:, j].detach() for i, j in enumerate(units.tolist())])
    torch.testing.assert_close(t.detach(), expected, rtol=1e-12, atol=1e-12)
    assert t.is_contiguous()
