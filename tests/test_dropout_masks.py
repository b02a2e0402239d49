"""Masks, dropout discovery and explicit-mask evaluation (dropgeom.dropout.masks / explicit)."""

import math

import pytest
import torch
from torch import nn

from dropgeom.dropout import enumerate_masks, find_dropout, forward_with_masks, resolve_p, sample_masks, unit_shapes
from dropgeom.dropout.kinds import module_kind
from reference.dropout import sequential_eta

D = torch.float64


def _net(act=nn.Tanh, p=0.3):
    return nn.Sequential(nn.Linear(3, 4), act(), nn.Dropout(p), nn.Linear(4, 3), act(), nn.Dropout(0.1), nn.Linear(3, 2)).double()


def test_find_dropout_and_errors():
    net = _net()
    assert list(find_dropout(net)) == ["2", "5"]
    assert list(find_dropout(net, ["5"])) == ["5"]
    with pytest.raises(ValueError, match="no dropout modules"):
        find_dropout(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="unknown layer name 'nope'"):
        find_dropout(net, ["nope"])
    with pytest.raises(ValueError, match="not a dropout module"):
        find_dropout(net, ["0"])
    with pytest.raises(ValueError, match="not multiplicative"):
        find_dropout(nn.Sequential(nn.Linear(2, 2), nn.AlphaDropout(0.1)), ["1"])


@pytest.mark.parametrize("p", [1.0, -0.1, float("nan"), 1.5])
def test_p_outside_range(p):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sample_masks(_net(), torch.zeros(2, 3, dtype=D), p=p)


def test_bad_arguments_name_the_problem():
    net, x = _net(), torch.zeros(2, 3, dtype=D)
    with pytest.raises(ValueError, match="n must be >= 0, got -2"):  # a torch RuntimeError (negative dimension) before
        sample_masks(net, -2, noise="dropconnect", p=0.1)
    with pytest.raises(TypeError, match="inputs_or_n must be the inputs"):  # an AttributeError on a list before
        sample_masks(net, [x], noise="dropconnect", p=0.1)
    with pytest.raises(TypeError, match="inputs_or_n must be the inputs"):  # a TypeError from torch.full before
        sample_masks(net, True, noise="dropconnect", p=0.1)
    with pytest.raises(TypeError, match="modules must be a mapping"):  # an AttributeError before
        resolve_p([nn.Dropout(0.3)])
    with pytest.raises(TypeError, match="the class Dropout; pass an instance"):  # None ("not dropout") before
        module_kind(nn.Dropout)
    assert module_kind(nn.Dropout(0.1)) == "dropout" and module_kind(nn.Linear(2, 2)) is None


def test_every_noise_has_unit_mean_and_the_dropout_variance(noise):
    """Each mask law of :class:`dropgeom.options.Noise` (at the dropout modules, or at the Linear weights
    for dropconnect): ``E m = 1``, ``Var m = p/(1-p)`` (5-sigma bands), reproducible from a seed."""
    net, p, n = _net(), 0.2, 20000
    layers = ["3"] if noise == "dropconnect" else ["2"]

    def draw(seed):
        return sample_masks(
            net, torch.zeros(n, 3, dtype=D), noise=noise, p=p, layers=layers, generator=torch.Generator().manual_seed(seed)
        )[layers[0]]

    m, v = draw(4), p / (1 - p)
    assert m.shape[0] == n
    assert abs(m.mean().item() - 1) < 5 * math.sqrt(v / m.numel())
    mu4 = ((m - 1) ** 4).mean().item()  # Var of the sample variance: (mu4 - v^2) / N
    assert abs(m.var().item() - v) < 5 * math.sqrt((mu4 - v * v) / m.numel())
    assert torch.equal(m, draw(4)) and not torch.equal(m, draw(5))


def test_bernoulli_and_gaussian_masks_moments_and_seed():
    net = _net(p=0.25)
    x = torch.zeros(20000, 3, dtype=D)
    m = sample_masks(net, x, generator=torch.Generator().manual_seed(3))
    assert set(m["2"].unique().tolist()) == {0.0, 1 / 0.75}
    assert m["2"].shape == (20000, 4) and m["5"].shape == (20000, 3)
    # E m = 1, Var m = p/(1-p) (5 sigma bands)
    for k, p in (("2", 0.25), ("5", 0.1)):
        v = p / (1 - p)
        se = math.sqrt(v / m[k].numel())
        assert abs(m[k].mean().item() - 1) < 5 * se
    again = sample_masks(net, x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(m["2"], again["2"])
    g = sample_masks(net, x, noise="gaussian", p={"2": 0.5}, generator=torch.Generator().manual_seed(0))["2"]
    assert abs(g.mean().item() - 1) < 5 * math.sqrt(1 / g.numel())
    assert abs(g.var().item() - 1.0) < 0.03
    dc = sample_masks(net, 7, noise="dropconnect", p=0.5, layers=["3"])
    assert dc["3"].shape == (7, 3, 4)
    with pytest.raises(ValueError, match="needs the inputs"):
        sample_masks(net, 7)


def test_channel_dropout_unit_shape_and_forward():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Dropout2d(0.5), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    x = torch.randn(5, 2, 6, 6, dtype=D)
    assert unit_shapes(net, x) == {"1": torch.Size([3])}
    m = sample_masks(net, x, generator=torch.Generator().manual_seed(0))["1"]
    out = forward_with_masks(net, x, {"1": m})
    h = net[0](x) * m[:, :, None, None]
    assert torch.allclose(out, net[3](h.flatten(1)))


def test_forward_with_masks_matches_reference_and_keeps_flags():
    net = _net().train()
    x = torch.randn(6, 3, dtype=D)
    ones = {"2": torch.ones(6, 4, dtype=D), "5": torch.ones(1, 3, dtype=D)}
    assert torch.equal(forward_with_masks(net, x, ones), net.eval()(x))
    net.train()
    m = sample_masks(net, x, generator=torch.Generator().manual_seed(1))
    out = forward_with_masks(net, x, m)
    assert all(mod.training for mod in net.modules())  # flags untouched
    with torch.no_grad():
        ref = sequential_eta(net, x, {2: m["2"], 5: m["5"]})
    assert torch.allclose(out, ref, atol=1e-14)
    out.sum().backward()  # reaches model.parameters()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
    params = {k: v.detach() * 2 for k, v in net.named_parameters()}
    out2 = forward_with_masks(net, x, m, params)
    assert not torch.allclose(out2, out)
    with pytest.raises(ValueError, match="unknown layer name"):
        forward_with_masks(net, x, {"zz": m["2"]})
    with pytest.raises(ValueError, match="must have shape"):
        forward_with_masks(net, x, {"2": torch.ones(6, 5, dtype=D)})


def test_dropconnect_forward_matches_manual():
    net = _net()
    x = torch.randn(4, 3, dtype=D)
    m = sample_masks(net, x, noise="dropconnect", p=0.4, layers=["0"], generator=torch.Generator().manual_seed(2))
    out = forward_with_masks(net, x, m)
    w = net[0].weight * m["0"]  # [n, out, in]
    h = torch.einsum("noi,ni->no", w, x) + net[0].bias
    with torch.no_grad():
        ref = nn.Sequential(*list(net)[1:]).eval()(h)
    assert torch.allclose(out, ref, atol=1e-14)


def test_enumerate_masks_probabilities_and_refusal():
    net = _net(p=0.3)
    x = torch.zeros(2, 3, dtype=D)
    e = enumerate_masks(net, x)
    assert e.probs.shape == (2**7,) and abs(e.probs.sum().item() - 1) < 1e-14
    # probability of the all-kept mask
    assert abs(e.probs[-1].item() - 0.7**4 * 0.9**3) < 1e-15
    assert torch.all(e.masks["2"][-1] == 1 / 0.7)
    with pytest.raises(ValueError, match="exact enumeration needs 2\\^7 masks"):
        enumerate_masks(net, x, max_masks=100)
