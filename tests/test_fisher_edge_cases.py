"""The Fisher engine on models a researcher brings, beyond the model table: float64 against the dense-Jacobian brute
force ``(1/n) sum_i J_i^T Sigma_i J_i`` of tests/reference/dense.py (reverse mode on a copy of the model, nothing from
dropgeom), for every structure the case concerns; or a clear error where the Fisher is not defined as dropgeom
computes it.

Each case here once gave a silently wrong answer: the layer rules (Linear, Conv) took a layer whose weight the forward
also used outside the layer's call, or whose input's leading axis was not the sample axis although it had ``n`` rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as tF
from torch import nn

from dropgeom import ModelManifold, fisher
from reference import dense as ref
from reference.compare import assert_close_to_scale as _close

D64 = torch.float64
N, K = 5, 3
STRUCTURES = ["dense", "diag", "layer", "kfac", "implicit"]


def _brute(model: nn.Module, x, family: str = "categorical") -> torch.Tensor:
    free = [k for k, p in model.named_parameters() if p.requires_grad]
    f, theta0, _ = ref.flat_model(model, x, free)
    return ref.exact_fisher(ref.dense_jacobian(f, theta0), f(theta0).detach(), family)


def _module_mask(m: ModelManifold) -> torch.Tensor:
    """True on the blocks of parameters of one module (what ``layer`` keeps)."""
    slices = m.param_slices()
    owner = {k: k.rsplit(".", 1)[0] if "." in k else "" for k in m.param_names}
    mask = torch.zeros(m.num_params, m.num_params, dtype=torch.bool)
    for a in m.param_names:
        for b in m.param_names:
            if owner[a] == owner[b]:
                mask[slices[a], slices[b]] = True
    return mask


def _agrees(model: nn.Module, x, family: str = "categorical", structures=STRUCTURES, F=None) -> ModelManifold:
    """Every structure against the brute force ``F`` (default: of ``model``): dense and implicit in full, layer on its
    blocks, KFAC on its exact dense blocks (its Kronecker blocks are approximations) and the diagonal of the others."""
    F = _brute(model, x, family) if F is None else F
    m = ModelManifold(model, x, family)
    scale = F.abs().max().item()
    for structure in structures:
        op = fisher(m, "exact", structure)
        if structure in ("dense", "implicit"):
            _close(op @ torch.eye(m.num_params, dtype=D64), F, scale)
        if structure == "layer":
            _close(op.dense(), torch.where(_module_mask(m), F, torch.zeros_like(F)), scale)
        if structure == "kfac":
            for block, idx in op.dense_blocks:
                _close(block, F[idx[:, None], idx[None, :]], scale)
        else:
            _close(op.diag(), F.diagonal(), scale)
    return m


# ---------------------------------------------------------------------------
# a rule layer's weight used outside the layer's own call
# ---------------------------------------------------------------------------


class TiedAutoencoder(nn.Module):
    """Decodes with the transposed encoder weight, through ``F.linear`` (no second module holds it)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(5, 3)

    def forward(self, x):
        return tF.linear(torch.tanh(self.enc(x)), self.enc.weight.T)


class OutputTiedEmbedding(nn.Module):
    """Looks tokens up in the output layer's weight (``F.embedding``): input embedding tied to the output layer."""

    def __init__(self, vocab: int = 7, d: int = 4) -> None:
        super().__init__()
        self.out = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.out(torch.tanh(tF.embedding(tokens, self.out.weight).mean(1)))


def test_weight_used_outside_its_layer_takes_the_generic_path():
    _agrees(TiedAutoencoder().to(D64), torch.randn(N, 5, dtype=D64), "gaussian")
    m = _agrees(OutputTiedEmbedding().to(D64), torch.randint(0, 7, (N, 3)))
    assert not fisher(m, "exact", "kfac").kron_blocks  # no Kronecker block for a weight with two uses


def test_other_tied_and_partly_frozen_models_agree():
    """Tied through a second module, a layer called twice, frozen parameters, an unused branch: already right."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mid, self.skip = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight
            self.unused = nn.Linear(4, 4)

        def forward(self, tokens):
            h = torch.tanh(self.emb(tokens).mean(1))
            return self.out(torch.tanh(self.mid(torch.tanh(self.mid(h)))) + self.skip(h))

    net = Tied().to(D64)
    net.skip.bias.requires_grad_(False)
    m = _agrees(net, torch.randint(0, 7, (N, 3)))
    assert "unused.weight" in m.param_names and "skip.bias" not in m.param_names


# ---------------------------------------------------------------------------
# a rule layer whose input has n rows that are not the n inputs
# ---------------------------------------------------------------------------


class SequenceFirst(nn.Module):
    """A ``batch_first=False`` transformer layer: its Linear layers see ``[L, n, d]``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0)
        self.head = nn.Linear(4, K)

    def forward(self, x):
        return self.head(self.block(x.transpose(0, 1)).mean(0))


class PositionTable(nn.Module):
    """A Linear layer applied to a learned ``[L, d]`` table, not to the inputs."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(length, 4))
        self.proj, self.head = nn.Linear(4, 4), nn.Linear(4, K)

    def forward(self, x):
        return self.head(torch.tanh(x + self.proj(self.pos)).mean(1))


def test_leading_axis_of_n_rows_that_are_not_the_inputs_takes_the_generic_path():
    """With ``L = n`` the leading axis has ``n`` rows, yet each row mixes the inputs: only a forward of one input tells."""
    m = _agrees(SequenceFirst().to(D64).eval(), torch.randn(N, N, 4, dtype=D64), structures=["diag", "kfac"])
    assert [kb.name for kb in fisher(m, "exact", "kfac").kron_blocks] == ["head"]
    m = _agrees(PositionTable(N).to(D64), torch.randn(N, N, 4, dtype=D64), structures=["diag", "kfac"])
    assert [kb.name for kb in fisher(m, "exact", "kfac").kron_blocks] == ["head"]


def test_batch_first_transformer_and_single_input_keep_the_fast_path():
    class BatchFirst(SequenceFirst):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=True)

        def forward(self, x):
            return self.head(self.block(x).mean(1))

    m = _agrees(BatchFirst().to(D64).eval(), torch.randn(N, 3, 4, dtype=D64), structures=["diag", "kfac"])
    assert [kb.name for kb in fisher(m, "exact", "kfac").kron_blocks] == ["block.linear1", "block.linear2", "head"]
    _agrees(SequenceFirst().to(D64).eval(), torch.randn(1, 3, 4, dtype=D64), structures=["dense", "diag"])


# ---------------------------------------------------------------------------
# samples that interact in eval mode
# ---------------------------------------------------------------------------


def _bn_net(**bn) -> nn.Module:
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, **bn), nn.Tanh(), nn.Linear(5, K)).to(D64)
    if net[1].running_var is not None:
        with torch.no_grad():
            net[1].running_mean.uniform_(-1, 1)
            net[1].running_var.uniform_(0.5, 2.0)
    return net


def test_batch_statistics_in_eval_mode_are_a_clear_error(structure):
    """BatchNorm without running statistics normalises with the batch's even in eval mode: there is no per-sample
    Jacobian, and every structure was silently wrong (dense 48% in float64). A clear error names the layer."""
    m = ModelManifold(_bn_net(track_running_stats=False), torch.randn(N, 4, dtype=D64))
    with pytest.raises(ValueError, match=r"samples interact \(batch statistics in '1' \(BatchNorm1d\)"):
        fisher(m, "exact", structure)

    class Centred(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.o = nn.Linear(4, 4), nn.Linear(4, K)

        def forward(self, x):
            h = self.a(x)
            return self.o(torch.tanh(h - h.mean(0, keepdim=True)))

    with pytest.raises(ValueError, match="the forward mixes the inputs or is random"):
        fisher(
            ModelManifold(Centred().to(D64), torch.randn(N, 4, dtype=D64)), "empirical", structure, targets=torch.zeros(N).long()
        )


def test_batch_norm_with_running_statistics_agrees_in_eval_and_train_mode():
    """Eval-mode batch norm (running statistics) is an affine map per sample; a model left in train mode is evaluated
    in eval mode, as documented, and its flags and running statistics are left untouched."""
    _agrees(_bn_net(), torch.randn(N, 4, dtype=D64))
    net = _bn_net().train()
    before = net[1].running_mean.clone()
    _agrees(net, torch.randn(N, 4, dtype=D64), structures=["diag", "kfac"])
    assert net.training and torch.equal(net[1].running_mean, before)


# ---------------------------------------------------------------------------
# nn.Embedding options that change the gradient, not the function
# ---------------------------------------------------------------------------


class Bag(nn.Module):
    def __init__(self, **options) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(9, 4, **options), nn.Linear(4, K)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)).mean(1))


TOKENS = torch.tensor([[0, 1, 1], [2, 2, 2], [3, 0, 8], [1, 5, 5], [0, 0, 0]])


def test_embedding_padding_row_has_no_gradient_in_forward_mode_either():
    """The padding row gets no gradient (torch's convention, and the brute force's reverse mode); the forward-mode
    product moved it, so the implicit Fisher ``J_rev^T Sigma J_fwd`` was not even symmetric (14% off)."""
    m = _agrees(Bag(padding_idx=0).to(D64), TOKENS)
    _agrees(Bag(padding_idx=-1).to(D64), TOKENS.clamp_max(7) + (TOKENS == 0) * 8, structures=["implicit"])
    assert float(fisher(m, "exact", "diag").diag()[m.param_slices()["emb.weight"]][:4].abs().max()) == 0.0


def test_embedding_gradient_scaling_and_sparse_gradients_leave_the_fisher_of_the_function():
    """``scale_grad_by_freq`` rescales the backward by each index's count in the batch (a training heuristic, and a
    different count for one input alone): the Fisher is that of the function, the same as without the option."""
    torch.manual_seed(3)
    plain = Bag().to(D64)
    for options in ({"scale_grad_by_freq": True}, {"sparse": True}):
        net = Bag(**options).to(D64)
        net.load_state_dict(plain.state_dict())
        _agrees(net, TOKENS, F=_brute(plain, TOKENS))


def test_meta_device_is_a_clear_error():
    """A model or inputs on the 'meta' device (shapes without values) failed with 'Tensor.item() cannot be called on
    meta tensors' from deep inside the input check."""
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, K)).to(D64)
    with pytest.raises(ValueError, match=r"inputs\[0\] is on the 'meta' device"):
        ModelManifold(net.to("meta"), torch.randn(N, 4, dtype=D64, device="meta"))
    with pytest.raises(ValueError, match=r"parameter '0.weight' is on the 'meta' device.*to_empty"):
        ModelManifold(net.to("meta"), torch.randn(N, 4, dtype=D64))
