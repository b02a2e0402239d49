"""Edge cases of the dropout analysis found by an adversarial audit against brute force (theory.md section 4).

Each test failed before its fix: the analysis gave a silently wrong number where it now agrees with
brute force or raises a clear error naming the module.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dropgeom import dropout as D


def _data(n: int = 3, d: int = 2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2][:n])


class _SharedDropout(nn.Module):
    """One ``nn.Dropout`` instance called at two places: torch draws an independent mask at each call."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.tanh(self.l1(x)))
        return self.l3(self.drop(torch.tanh(self.l2(h))))


class _SharedAttention(nn.Module):
    """One ``nn.MultiheadAttention`` with dropout applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(2, 4), nn.Linear(4, 3)
        self.att = nn.MultiheadAttention(4, 2, dropout=0.3, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.stack([self.lin(x), -0.5 * self.lin(x)], 1)
        a, _ = self.att(h, h, h, need_weights=False)
        a, _ = self.att(a, a, a, need_weights=False)
        return self.out(a.mean(1))


@pytest.mark.parametrize("quantity", ["gap", "terms", "penalty", "mixture"])
def test_a_dropout_module_called_twice_is_refused(quantity):
    """It was one mask reused at both calls: gap -0.019 where torch's train mode gives +0.022."""
    torch.manual_seed(0)
    net = _SharedDropout().double()
    x, y = _data()
    call = {
        "gap": lambda: D.gap(net, x, y),
        "terms": lambda: D.terms(net, x, y),
        "penalty": lambda: D.penalty(net, x),
        "mixture": lambda: D.mixture(net, x),
    }[quantity]
    with pytest.raises(ValueError, match="'drop'.*runs more than once"):
        call()


def test_a_sequential_holding_one_dropout_twice_is_refused_on_the_fast_paths():
    """The chain fast path saw the module once (``named_modules`` dedupes) and ignored the second call."""
    torch.manual_seed(0)
    d = nn.Dropout(0.3)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), d, nn.Linear(3, 3), nn.Tanh(), d, nn.Linear(3, 3)).double()
    x, y = _data()
    with pytest.raises(ValueError, match="'2'.*runs more than once"):
        D.penalty(net, x)
    with pytest.raises(ValueError, match="'2'.*runs more than once"):
        D.terms(net, x, y)


def test_an_attention_module_called_twice_is_refused():
    """Its attention-weight mask was reused at the second call."""
    torch.manual_seed(0)
    net = _SharedAttention().double()
    x, y = _data()
    with pytest.raises(ValueError, match="'att'.*runs more than once"):
        D.gap(net, x, y, max_masks=2**9)
    with pytest.raises(ValueError, match="'att'.*runs more than once"):
        D.penalty(net, x)


class _TrainOnlyAttention(nn.Module):
    """``dropout_p=p if self.training else 0.0`` (the usual way to write SDPA dropout) next to an ``nn.Dropout``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out, self.drop = nn.Linear(2, 6), nn.Linear(2, 3), nn.Dropout(0.2)
        self.norm = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.lin(x).reshape(-1, 1, 3, 2)
        a = nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.3 if self.training else 0.0)
        return self.out(self.drop(self.norm(a.mean(2).squeeze(1))))


def test_dropout_run_only_in_training_mode_is_named_not_left_out_in_silence():
    """The attention dropout was left out of gap and penalty without a word (gap 0.0023, torch's 0.0041)."""
    torch.manual_seed(0)
    net = _TrainOnlyAttention().double()
    x, y = _data()
    with pytest.warns(RuntimeWarning, match="only in training mode.*module '<root>'"):
        D.gap(net, x, y)
    with pytest.warns(RuntimeWarning, match="only in training mode.*attention dropout"):
        D.penalty(net, x)


def test_the_training_mode_probe_leaves_flags_buffers_and_random_state_alone():
    torch.manual_seed(0)
    net = _TrainOnlyAttention().double().train()
    net.drop.eval()
    x, _ = _data()
    before = {k: b.clone() for k, b in net.state_dict().items()}
    state = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match="only in training mode"):
        D.dropout_sites(net, x)
    assert net.training and net.norm.training and not net.drop.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(state, torch.get_rng_state())


class _CountingNoise(nn.Module):
    """In training mode: counts its calls in a buffer and draws noise (torch.randn_like) -- what the probe must undo."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        self.calls += 1
        return x + 0.0 * torch.randn_like(x)


def test_the_training_mode_probe_restores_what_a_training_mode_forward_changes():
    """The net above keeps its batch norm in eval and its dropout the identity, so it changes neither buffers nor
    the random state; this module does both in the probe's training-mode pass, which must restore them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.2), _CountingNoise(), nn.Linear(3, 3)).double()
    x, _ = _data()
    state = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match=r"draw random numbers.*'2' \(torch.randn_like\)"):
        D.dropout_sites(net, x)
    assert float(net[2].calls) == 0.0 and net.training and net[2].training and net[1].training
    assert torch.equal(state, torch.get_rng_state())


class _NeverDrops(nn.Module):
    """``F.dropout(..., training=False)``: torch never drops there, in either mode."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(2, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.dropout(torch.tanh(self.l1(x)), 0.2, self.training)
        return self.l2(nn.functional.dropout(h, 0.3, training=False))


def test_functional_dropout_that_never_drops_is_named():
    """It was counted as a dropout site in silence (gap 0.0097 where torch's training mode gives 0.0032)."""
    torch.manual_seed(0)
    net = _NeverDrops().double()
    x, y = _data()
    with pytest.warns(RuntimeWarning, match=r"training=False.*'#dropout1': F.dropout\(p=0.3, training=False\)"):
        D.gap(net, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the site left out by layers= is not named
        assert list(D.dropout_sites(net, x, layers=["#dropout0"])) == ["#dropout0"]


class _ThirdPartyDropPath(nn.Module):
    """timm's ``DropPath``: its own ``bernoulli_`` draw in training mode, no dropout call at all."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def test_a_module_drawing_its_own_masks_is_named_as_left_out():
    """timm's DropPath was left out in silence (gap 0.013 where torch's training mode gives 0.019)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.2), _ThirdPartyDropPath(0.3), nn.Linear(3, 3)).double()
    x, y = _data()
    with pytest.warns(RuntimeWarning, match=r"draw random numbers.*'2' \(Tensor.bernoulli_\)"):
        D.gap(net, x, y)
    with pytest.warns(RuntimeWarning, match=r"draw random numbers.*'2'"):
        D.penalty(net, x)


class _LockedDropout(nn.Dropout):
    """An ``nn.Dropout`` subclass that shares its mask over the middle axis (locked dropout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - self.p) / (1 - self.p)


def test_a_dropout_subclass_with_its_own_forward_is_named():
    """It was analysed with nn.Dropout's elementwise law in silence, whatever its forward draws."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Unflatten(1, (2, 2)), _LockedDropout(0.3), nn.Flatten(), nn.Linear(4, 3))
    x, y = _data()
    with pytest.warns(RuntimeWarning, match=r"'2': _LockedDropout \(a Dropout with its own forward\)"):
        D.gap(net.double(), x, y)
    with pytest.warns(RuntimeWarning, match="overrides forward"):
        D.penalty(net, x)


class _SequenceFirst(nn.Module):
    """An ``nn.TransformerEncoderLayer`` with ``batch_first=False`` (torch's default): its dropout sees ``[L, n, d]``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(2, 4), nn.Linear(2, 3)
        self.layer = nn.TransformerEncoderLayer(2, 1, dim_feedforward=2, dropout=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x).reshape(-1, 2, 2).transpose(0, 1)  # [L=2, n, 2]
        return self.out(self.layer(h).mean(0))


def test_dropout_on_a_sequence_first_input_is_refused():
    """One mask was shared by the L positions (gap 1.4e-4 where enumerating every element gives -1.0e-4)."""
    torch.manual_seed(0)
    net = _SequenceFirst().double()
    x, y = _data()
    with pytest.raises(ValueError, match=r"'layer.dropout1'.*shape \(2, 3, 2\).*not the 3 samples"):
        D.gap(net, x, y, layers=["layer.dropout1"])
    with pytest.raises(ValueError, match="not the 3 samples"):
        D.terms(net, x, y, layers=["layer.dropout1"])
    with pytest.raises(ValueError, match="not the 3 samples"):
        D.penalty(net, x, layers=["layer.dropout1"])
    assert list(D.dropout_sites(net, x, layers=["layer.self_attn"])) == ["layer.self_attn"]  # attention is fine


class _FunctionalSequenceFirst(nn.Module):
    """``F.dropout`` on a ``[L, n, d]`` tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(2, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x)).reshape(-1, 2, 2).transpose(0, 1)
        h = nn.functional.dropout(h, 0.3, self.training)
        return self.out(torch.tanh(h).transpose(0, 1).reshape(-1, 4))


def test_functional_dropout_on_a_sequence_first_input_is_refused():
    """Its exact gap shared one mask over the L positions in silence."""
    torch.manual_seed(0)
    net = _FunctionalSequenceFirst().double()
    x, y = _data()
    with pytest.raises(ValueError, match=r"'#dropout0'.*not the 3 samples"):
        D.gap(net, x, y)
    with pytest.raises(ValueError, match="not the 3 samples"):
        D.terms(net, x, y)
