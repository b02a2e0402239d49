"""The one dropout signature and its deprecation shims: old positional orders, old keyword names,
``n_samples="exact"``, ``return_output``, and results used as the old tuples / tensors.

Every old spelling must warn (``DeprecationWarning``) and give exactly the new call's numbers."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from dropgeom.dropout import GapResult, MixtureResult, PenaltyResult, gap, mixture, penalty, terms
from dropgeom.dropout._legacy import legacy_signature

D = torch.float64


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.2), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 3, dtype=D), torch.randint(0, 3, (6,))
    return net, x, y


def _new_style_does_not_warn(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        return fn()


def test_new_signature_is_keyword_only_and_silent():
    net, x, y = _setup()
    g = _new_style_does_not_warn(lambda: gap(net, x, y, family="categorical", p=0.1, method="exact"))
    t = _new_style_does_not_warn(lambda: terms(net, x, y, family="categorical", layers=["2"]))
    m = _new_style_does_not_warn(lambda: mixture(net, x, y, family="categorical", method="exact", alpha=0.3))
    r = _new_style_does_not_warn(lambda: penalty(net, x, y, form="quadratic", curvature=True, method="exact"))
    assert isinstance(g, GapResult) and isinstance(m, MixtureResult) and isinstance(r, PenaltyResult)
    assert t.fisher > 0 and torch.equal(r.eta.detach(), net.eval()(x))
    for result in (g, m, r, t):
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.family = "x"  # type: ignore[misc]


def test_old_positional_orders_warn_and_agree():
    net, x, y = _setup()
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    pairs = [
        (
            lambda: gap(net, x, y, "categorical", 0.1, "bernoulli", "mc", 50, gen()),
            lambda: gap(net, x, y, family="categorical", p=0.1, noise="bernoulli", method="mc", n_samples=50, generator=gen()),
        ),
        (lambda: terms(net, x, y, "categorical", ["2"]), lambda: terms(net, x, y, layers=["2"])),
        (
            lambda: mixture(net, x, y, 0.3, 0.1, 20, gen()),
            lambda: mixture(net, x, y, alpha=0.3, p=0.1, n_samples=20, generator=gen()),
        ),
        (
            lambda: penalty(net, x, "categorical", 0.1, "divergence", y, True, None, "mc", gen()),
            lambda: penalty(net, x, y, p=0.1, form="divergence", curvature=True, method="mc", generator=gen()).value,
        ),
    ]
    for old, new in pairs:
        with pytest.warns(DeprecationWarning, match="by position") as caught:
            a = old()
        assert caught[0].filename == __file__  # the warning points at the caller's line
        b = new()
        if isinstance(b, torch.Tensor):
            assert torch.equal(a.value, b)
        else:
            assert repr(a) == repr(b)


def test_old_keyword_names_and_values_warn_and_agree():
    net, x, y = _setup()
    with pytest.warns(DeprecationWarning, match="'estimator' is now 'method'"):
        a = penalty(net, x, estimator="unit", generator=torch.Generator().manual_seed(2))
    b = penalty(net, x, method="unit", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.value, b.value)
    with pytest.warns(DeprecationWarning, match="method='exact'"):
        a = mixture(net, x, y, n_samples="exact")
    b = mixture(net, x, y, method="exact")
    assert a.nll == b.nll and a.n_masks == b.n_masks == 16
    with pytest.raises(TypeError, match="both 'estimator'"):
        penalty(net, x, estimator="mc", method="mc")
    with pytest.raises(TypeError, match="multiple values for argument 'p'"):
        gap(net, x, y, "categorical", 0.1, p=0.2)
    with pytest.raises(TypeError, match="at most"):
        terms(net, x, y, "categorical", None, "extra")


def test_return_output_and_tensor_use_of_the_penalty_warn():
    net, x, y = _setup()
    new = penalty(net, x)
    with pytest.warns(DeprecationWarning, match="return_output"):
        pen, eta = penalty(net, x, return_output=True)
    assert torch.equal(pen, new.value) and torch.equal(eta, new.eta)
    with pytest.warns(DeprecationWarning, match="return_output"):
        bare = penalty(net, x, return_output=False)
    assert isinstance(bare, torch.Tensor) and torch.equal(bare, new.value)
    for use in (
        lambda r: r.item(),
        lambda r: float(r),
        lambda r: r + 1.0,
        lambda r: 2.0 * r,
        lambda r: torch.as_tensor(1.0, dtype=D) + r,
    ):
        with pytest.warns(DeprecationWarning, match="as a tensor"):
            got = use(new)
        assert float(got) == float(use(new.value))
    with pytest.warns(DeprecationWarning, match="as a tensor"):
        new.backward()
    assert net[0].weight.grad is not None


def test_results_still_unpack_like_the_old_named_tuples():
    net, x, y = _setup()
    r = gap(net, x, y)
    with pytest.warns(DeprecationWarning, match="unpacking a GapResult"):
        drop, clean, value, *_ = r
    assert (drop, clean, value) == (r.dropout_loss, r.clean_loss, r.value)
    with pytest.warns(DeprecationWarning, match="indexing a GapResult"):
        assert r[2] == r.value
    m = mixture(net, x, y, method="exact")
    with pytest.warns(DeprecationWarning, match="indexing a MixtureResult"):
        assert m[1] is m.nll


def test_legacy_signature_helper():
    @legacy_signature(old=("family", "p"), renamed={"q": "p"})
    def f(model, inputs, targets=None, *, family="c", p=0.0):
        return targets, family, p

    assert f(1, 2) == (None, "c", 0.0)
    t = torch.zeros(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert f(1, 2, t)[0] is t  # a tensor third: the new targets
        assert f(1, 2, None, p=1.0) == (None, "c", 1.0)
    with pytest.warns(DeprecationWarning, match="family by position"):
        assert f(1, 2, "g") == (None, "g", 0.0)
    with pytest.warns(DeprecationWarning, match="'q' is now 'p'"):
        assert f(1, 2, q=3.0) == (None, "c", 3.0)
