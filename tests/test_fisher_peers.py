"""Peer libraries as oracles for the Fisher engine (float64).

BackPACK, nngeometry, curvlinops and ASDL (PyPI ``asdfghjkl``, imported as
``asdl``) are test dependencies: if one fails to import, this module errors (no skip). Models: logistic regression, a small MLP,
a small CNN (Conv2d), a Linear layer on inputs with an extra axis; family
``categorical`` with ``CrossEntropyLoss``.

Scaling conventions, ours = mean over inputs ``(1/n) sum_i``:
* BackPACK DiagGGNExact / DiagGGNMC / KFLR with ``CrossEntropyLoss(reduction="mean")``
  return the mean (the loss Hessian square root carries ``1/sqrt(n)``);
  SumGradSquared with ``reduction="sum"`` returns ``sum_i g_i^2 = n * ours``;
  BatchGrad with ``reduction="sum"`` returns the per-sample gradients ``g_i``.
* nngeometry FIM returns the mean. Its ``classif_logits`` Cholesky factor adds
  ``torch.finfo().eps`` (the default dtype's) to a denominator, so it is called
  under a float64 default dtype.
* curvlinops GGN/EF/KFAC with ``reduction="mean"`` return the mean; its KFAC
  ``kfac_approx="expand"`` with ``separate_weight_and_bias=False`` is exactly our
  KFAC/KFC convention.
* ASDL's ``FisherMaker`` with ``data_size=n`` (its loss summed, then scaled by
  ``1/n``) returns the mean. ``SHAPE_KRON`` keeps weight and bias apart: its
  weight factors are ``(B, A[:-1, :-1])`` of ours for Linear and Conv2d alike.
  With ``n_mc_samples=M`` its MC Fisher comes out ``M`` times too small (each
  sampled loss is divided by ``M`` before the squared gradients are summed), so
  the MC comparison multiplies by ``M``.
* BackPACK KFLR keeps weight and bias blocks apart: for Linear layers its
  weight factors are ``(B, A[:-1, :-1])`` of ours and its bias block is our
  ``B``; for convolutions its input factor is ``T`` (output positions) times ours
  and its gradient factor is the exact bias block ``sum_i (sum_t g_it)(sum_t g_it)^T / n``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import asdl
import torch.nn.functional as tF
from backpack import backpack, extend
from backpack.extensions import KFLR, BatchGrad, DiagGGNExact, DiagGGNMC, SumGradSquared
from curvlinops import EFLinearOperator, GGNLinearOperator, KFACLinearOperator
from nngeometry.metrics import FIM
from nngeometry.object import PMatDense, PMatDiag, PMatKFAC
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dropgeom import ModelManifold, fisher

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths"),
    pytest.mark.filterwarnings("ignore:Using a non-full backward hook"),  # ASDL's module hooks
]

DT = torch.float64
N, K = 12, 4


def _logreg() -> tuple:
    return nn.Sequential(nn.Linear(5, K)), torch.randn(N, 5, dtype=DT)


def _mlp() -> tuple:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, K)), torch.randn(N, 5, dtype=DT)


def _cnn() -> tuple:
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(3, 2, 2), nn.Flatten(), nn.Linear(2 * 2 * 2, K)
    )
    return net, torch.randn(N, 2, 6, 6, dtype=DT)


MODELS = {"logreg": _logreg, "mlp": _mlp, "cnn": _cnn}


def _setup(name: str):
    net, x = MODELS[name]()
    net = net.to(DT)
    with torch.no_grad():  # spread the outputs so that the classes are far from uniform
        for p in net.parameters():
            p.mul_(2.0)
    y = torch.randint(0, K, (N,))
    return net, x, y, ModelManifold(net, x, "categorical")


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _backpack(net: nn.Module, x, y, ext, attr: str, reduction: str = "mean"):
    bnet = extend(copy.deepcopy(net))
    loss = extend(nn.CrossEntropyLoss(reduction=reduction))(bnet(x), y)
    with backpack(ext):
        loss.backward()
    return [getattr(p, attr) for p in bnet.parameters()]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> None:
    scale = b.abs().max().clamp_min(1e-300)
    assert (a - b).abs().max() <= rtol * scale, f"max rel. difference {float((a - b).abs().max() / scale):.3e}"


def _dense_of(op, P: int) -> torch.Tensor:
    return op @ torch.eye(P, dtype=DT)


# ---------------------------------------------------------------------------
# diagonals and trace
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_diag_matches_backpack_diag_ggn_exact(name):
    net, x, y, m = _setup(name)
    ref = _flat(_backpack(net, x, y, DiagGGNExact(), "diag_ggn_exact"))
    F = fisher(m, "exact", "diag")
    _close(F.diag(), ref)
    _close(F.trace(), ref.sum())
    _close(fisher(m, "exact", "diag", reduction="sum").diag(), N * ref)


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_diag_matches_nngeometry_fim(name):
    net, x, y, m = _setup(name)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)  # several batches: nngeometry averages over them
    old = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        ref = FIM(net, loader, PMatDiag, variant="classif_logits").get_diag()
    finally:
        torch.set_default_dtype(old)
    _close(fisher(m, "exact", "diag").diag(), ref, rtol=1e-9)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_dense_matches_nngeometry_pmat_dense(name):
    net, x, y, m = _setup(name)
    loader = DataLoader(TensorDataset(x, y), batch_size=N)
    old = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        ref = FIM(net, loader, PMatDense, variant="classif_logits").to_torch()
    finally:
        torch.set_default_dtype(old)
    _close(fisher(m, "exact", "dense").dense(), ref, rtol=1e-9)


def test_mc_diag_statistics_agree_with_backpack_diag_ggn_mc():
    """Both MC estimators (ours, BackPACK's DiagGGNMC) converge to the same exact
    diagonal with the same (mean) scaling: many samples, a statistical tolerance."""
    net, x, y, m = _setup("mlp")
    exact = _flat(_backpack(net, x, y, DiagGGNExact(), "diag_ggn_exact"))
    M = 1000
    torch.manual_seed(1)
    bp = _flat(_backpack(net, x, y, DiagGGNMC(mc_samples=M), "diag_ggn_mc"))
    ours = fisher(m, "mc", "diag", n_samples=M, generator=torch.Generator().manual_seed(2)).diag()
    for est in (ours, bp):
        assert abs(float(est.sum() / exact.sum()) - 1) < 0.03
        _close(est, exact, rtol=0.1)


@pytest.mark.parametrize("name", list(MODELS))
def test_empirical_diag_matches_backpack_sum_grad_squared_and_batch_grad(name):
    net, x, y, m = _setup(name)
    sgs = _flat(_backpack(net, x, y, SumGradSquared(), "sum_grad_squared", "sum")) / N
    per_sample = torch.cat([g.reshape(N, -1) for g in _backpack(net, x, y, BatchGrad(), "grad_batch", "sum")], dim=1)
    ours = fisher(m, "empirical", "diag", targets=y).diag()
    _close(ours, sgs)
    _close(ours, (per_sample**2).mean(0))
    # the implicit operator is the full empirical Fisher (1/n) sum_i g_i g_i^T
    V = torch.randn(m.num_params, 3, dtype=DT)
    _close(fisher(m, "empirical", "implicit", targets=y).mv(V), per_sample.T @ (per_sample @ V) / N)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_mc_diag_is_the_empirical_fisher_at_sampled_labels(name):
    """One MC sample per input = the empirical Fisher at labels drawn from the model:
    BackPACK's SumGradSquared at the labels our generator draws."""
    net, x, y, m = _setup(name)
    yhat = m.family.sample(m.eta(), generator=torch.Generator().manual_seed(5))
    ref = _flat(_backpack(net, x, yhat, SumGradSquared(), "sum_grad_squared", "sum")) / N
    ours = fisher(m, "mc", "diag", generator=torch.Generator().manual_seed(5)).diag()
    _close(ours, ref)


# ---------------------------------------------------------------------------
# matrix-free products against curvlinops
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_implicit_matches_curvlinops_ggn_and_ef(name):
    net, x, y, m = _setup(name)
    params = list(net.parameters())
    V = torch.randn(m.num_params, 3, dtype=DT)
    ggn = GGNLinearOperator(net, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    _close(fisher(m, "exact", "implicit").mv(V), ggn @ V)
    ef = EFLinearOperator(net, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    _close(fisher(m, "empirical", "implicit", targets=y).mv(V), ef @ V)


# ---------------------------------------------------------------------------
# KFAC / KFC
# ---------------------------------------------------------------------------


def _curvlinops_kfac(net, x, y, fisher_type: str) -> KFACLinearOperator:
    return KFACLinearOperator(
        net,
        nn.CrossEntropyLoss(),
        list(net.parameters()),
        [(x, y)],
        fisher_type=fisher_type,
        kfac_approx="expand",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_kfac_matches_curvlinops_expand(name):
    net, x, y, m = _setup(name)
    P = m.num_params
    ours = fisher(m, "exact", "kfac")
    assert not ours.dense_blocks  # Linear and Conv2d all have Kronecker rules
    _close(ours.dense(), _dense_of(_curvlinops_kfac(net, x, y, "type-2"), P))
    emp = fisher(m, "empirical", "kfac", targets=y)
    _close(emp.dense(), _dense_of(_curvlinops_kfac(net, x, y, "empirical"), P))


def test_kfac_linear_on_extra_axis_matches_curvlinops_expand():
    class Pool(nn.Module):
        def forward(self, h):
            return h.mean(1)

    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), Pool(), nn.Linear(5, K)).to(DT)
    x = torch.randn(N, 4, 3, dtype=DT)
    y = torch.randint(0, K, (N,))
    m = ModelManifold(net, x, "categorical")
    ours = fisher(m, "exact", "kfac")
    assert [kb.A.shape[0] for kb in ours.kron_blocks] == [4, 6]
    _close(ours.dense(), _dense_of(_curvlinops_kfac(net, x, y, "type-2"), m.num_params))
    # the exact diagonal on the weight-shared layer (per-sample gradients summed over the axis)
    V = torch.eye(m.num_params, dtype=DT)
    dense = GGNLinearOperator(net, nn.CrossEntropyLoss(), list(net.parameters()), [(x, y)], check_deterministic=False) @ V
    _close(fisher(m, "exact", "diag").diag(), dense.diagonal())


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_kfac_linear_matches_backpack_kflr(name):
    net, x, y, m = _setup(name)
    kflr = _backpack(net, x, y, KFLR(), "kflr")
    ours = fisher(m, "exact", "kfac")
    for kb, (w_factors, b_factors) in zip(ours.kron_blocks, zip(kflr[0::2], kflr[1::2])):
        B_bp, A_bp = w_factors
        _close(kb.B, B_bp)
        _close(kb.A[:-1, :-1], A_bp)
        _close(kb.B, b_factors[0])


def test_kfc_conv_relation_to_backpack_kflr():
    net, x, y, m = _setup("cnn")
    kflr = dict(zip([k for k, _ in net.named_parameters()], _backpack(net, x, y, KFLR(), "kflr")))
    ours = {kb.name: kb for kb in fisher(m, "exact", "kfac").kron_blocks}
    layer = fisher(m, "exact", "layer").dense()
    slices = m.param_slices()
    h = x
    for idx, mod in enumerate(net):
        h = mod(h)
        if not isinstance(mod, nn.Conv2d):
            continue
        T = h.shape[-2:].numel()  # output positions
        B_bp, A_bp = kflr[f"{idx}.weight"]
        kb = ours[str(idx)]
        _close(A_bp, T * kb.A[:-1, :-1])
        b = slices[f"{idx}.bias"]
        _close(B_bp, layer[b, b])  # BackPACK's gradient factor: the exact bias block
        _close(kflr[f"{idx}.bias"][0], layer[b, b])


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_kfac_linear_matches_nngeometry(name):
    net, x, y, m = _setup(name)
    loader = DataLoader(TensorDataset(x, y), batch_size=N)
    old = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        ref = FIM(net, loader, PMatKFAC, variant="classif_logits")
        ref_dense = ref.to_torch(split_weight_bias=True)
    finally:
        torch.set_default_dtype(old)
    _close(fisher(m, "exact", "kfac").dense(), ref_dense, rtol=1e-9)


def test_inplace_activations_after_rule_layers():
    """ReLU(inplace=True) overwrites the recorded Linear outputs (even the last one):
    the layer rules must notice and still give the exact diagonal and KFAC."""
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, K), nn.ReLU(inplace=True)).to(DT)
    x, y = torch.randn(N, 5, dtype=DT), torch.randint(0, K, (N,))
    m = ModelManifold(net, x, "categorical")
    params = list(net.parameters())
    ggn = GGNLinearOperator(net, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    _close(fisher(m, "exact", "diag").diag(), _dense_of(ggn, m.num_params).diagonal())
    _close(fisher(m, "exact", "kfac").dense(), _dense_of(_curvlinops_kfac(net, x, y, "type-2"), m.num_params))


def test_tied_weights_take_the_generic_path():
    """A weight shared by two Linear modules: no layer rule may see only one use of it."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.o = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, K)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.o(torch.tanh(self.b(torch.tanh(self.a(x)))))

    net = Tied().to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, K, (N,))
    m = ModelManifold(net, x, "categorical")
    ggn = GGNLinearOperator(net, nn.CrossEntropyLoss(), list(net.parameters()), [(x, y)], check_deterministic=False)
    _close(fisher(m, "exact", "diag").diag(), _dense_of(ggn, m.num_params).diagonal())


def test_conv_padding_variants_diag_and_kfac():
    """Conv1d/Conv2d with padding="same", "valid", dilation and stride use the unfold rule;
    "same" with an even kernel (uneven padding) takes the generic path. Exact diagonals
    against curvlinops' GGN, KFC against curvlinops' KFAC-expand (which has no uneven padding)."""

    def net_with(middle: nn.Module) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding="same", dilation=2),
            nn.Tanh(),
            middle,
            nn.ReLU(),
            nn.Conv2d(2, 2, 2, stride=2, padding="valid"),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, K),
        ).to(DT)

    x, y = torch.randn(N, 2, 6, 6, dtype=DT), torch.randint(0, K, (N,))
    uneven = net_with(nn.Conv2d(3, 2, (3, 2), padding="same"))
    m = ModelManifold(uneven, x, "categorical")
    ggn = GGNLinearOperator(uneven, nn.CrossEntropyLoss(), list(uneven.parameters()), [(x, y)], check_deterministic=False)
    _close(fisher(m, "exact", "diag").diag(), _dense_of(ggn, m.num_params).diagonal())
    assert sorted(kb.name for kb in fisher(m, "exact", "kfac").kron_blocks) == ["0", "4", "6"]  # "2" pads unevenly

    even = net_with(nn.Conv2d(3, 2, 3, padding="same"))
    m = ModelManifold(even, x, "categorical")
    kfac = fisher(m, "exact", "kfac")
    assert not kfac.dense_blocks
    _close(kfac.dense(), _dense_of(_curvlinops_kfac(even, x, y, "type-2"), m.num_params))
    conv1 = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding="same", dilation=2), nn.Tanh(), nn.Conv1d(3, 2, 3, stride=2), nn.Flatten(), nn.Linear(6, K)
    ).to(DT)
    x1 = torch.randn(N, 2, 8, dtype=DT)
    m = ModelManifold(conv1, x1, "categorical")
    ggn = GGNLinearOperator(conv1, nn.CrossEntropyLoss(), list(conv1.parameters()), [(x1, y)], check_deterministic=False)
    _close(fisher(m, "exact", "diag").diag(), _dense_of(ggn, m.num_params).diagonal())
    assert len(fisher(m, "exact", "kfac").kron_blocks) == 3

    # Conv1d KFC = the Conv2d KFC of the same layers on a height-1 image (curvlinops has Conv2d only)
    class Height1(nn.Module):
        def forward(self, h):
            return h.unsqueeze(-2)

    conv2 = nn.Sequential(
        Height1(),
        nn.Conv2d(2, 3, (1, 3), padding=(0, 2), dilation=(1, 2)),
        nn.Tanh(),
        nn.Conv2d(3, 2, (1, 3), stride=(1, 2)),
        nn.Flatten(),
        nn.Linear(6, K),
    ).to(DT)
    with torch.no_grad():
        for p2, p1 in zip(conv2.parameters(), conv1.parameters()):
            p2.copy_(p1.reshape(p2.shape))
    _close(fisher(m, "exact", "kfac").dense(), _dense_of(_curvlinops_kfac(conv2, x1, y, "type-2"), m.num_params))


# ---------------------------------------------------------------------------
# ASDL (kazukiosawa/asdl): diagonal, full and Kronecker-factored Fisher
# ---------------------------------------------------------------------------


def _asdl(net: nn.Module, batches, fisher_type: str, shape: str, loss_fn=None, loss_type=None, **config) -> nn.Module:
    """A deep copy of ``net`` after ASDL's ``forward_and_backward`` over ``batches`` (``[(x, y), ...]``, accumulated;
    ``data_size`` = all inputs: the mean): the Fisher sits on its modules (``module.fisher``), or on the copy itself
    for ``SHAPE_FULL``. Cross-entropy unless ``loss_fn`` / ``loss_type`` say otherwise."""
    copy_ = copy.deepcopy(net)
    cfg = asdl.FisherConfig(
        fisher_type=fisher_type,
        fisher_shapes=[shape],
        loss_type=loss_type or asdl.LOSS_CROSS_ENTROPY,
        data_size=sum(x.shape[0] for x, _ in batches),
        **config,
    )
    maker = asdl.get_fisher_maker(copy_, cfg)
    for i, (x, y) in enumerate(batches):
        maker.setup_loss_call(loss_fn or tF.cross_entropy, maker.setup_model_call(copy_, x), y)
        maker.forward_and_backward(accumulate=i > 0)
    return copy_


def _asdl_diag(net: nn.Module) -> torch.Tensor:
    """ASDL's diagonal in parameter order (every module here has a weight and a bias)."""
    mods = [m for m in net.modules() if hasattr(m, "fisher")]
    return torch.cat([torch.cat([m.fisher.diag.weight.reshape(-1), m.fisher.diag.bias.reshape(-1)]) for m in mods])


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_and_empirical_diag_match_asdl(name):
    net, x, y, m = _setup(name)
    _close(fisher(m, "exact", "diag").diag(), _asdl_diag(_asdl(net, [(x, y)], asdl.FISHER_EXACT, asdl.SHAPE_DIAG)))
    emp = _asdl_diag(_asdl(net, [(x, y)], asdl.FISHER_EMP, asdl.SHAPE_DIAG))
    _close(fisher(m, "empirical", "diag", targets=y).diag(), emp)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_dense_matches_asdl_full(name):
    net, x, y, m = _setup(name)
    _close(fisher(m, "exact", "dense").dense(), _asdl(net, [(x, y)], asdl.FISHER_EXACT, asdl.SHAPE_FULL).fisher.data)
    emp = _asdl(net, [(x, y)], asdl.FISHER_EMP, asdl.SHAPE_FULL).fisher.data
    _close(fisher(m, "empirical", "dense", targets=y).dense(), emp)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_kfac_weight_factors_match_asdl_kron(name):
    """Linear and Conv2d: ASDL's Kronecker factors of the weight are our ``B`` and ``A`` without the bias row."""
    net, x, y, m = _setup(name)
    ours = {kb.name: kb for kb in fisher(m, "exact", "kfac").kron_blocks}
    theirs = {
        k: mod.fisher.kron
        for k, mod in _asdl(net, [(x, y)], asdl.FISHER_EXACT, asdl.SHAPE_KRON).named_modules()
        if hasattr(mod, "fisher")
    }
    assert sorted(theirs) == sorted(ours)
    for k, kron in theirs.items():
        _close(kron.B, ours[k].B)
        _close(kron.A, ours[k].A[:-1, :-1])


def test_mc_diag_statistics_agree_with_asdl():
    """Both MC estimators converge to the same exact diagonal (ASDL's rescaled by its sample count)."""
    net, x, y, m = _setup("mlp")
    exact = fisher(m, "exact", "diag").diag()
    M = 1000
    theirs = M * _asdl_diag(_asdl(net, [(x, y)], asdl.FISHER_MC, asdl.SHAPE_DIAG, n_mc_samples=M, seed=1))
    ours = fisher(m, "mc", "diag", n_samples=M, generator=torch.Generator().manual_seed(2)).diag()
    for est in (ours, theirs):
        assert abs(float(est.sum() / exact.sum()) - 1) < 0.03
        _close(est, exact, rtol=0.1)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_streamed_diag_and_kfac_match_asdl_accumulated_over_the_loader(name):
    """A loader of uneven batches: our streamed Fisher against ASDL's ``accumulate=True`` over the same batches."""
    from dropgeom.streaming import fisher_streamed

    net, x, y, _ = _setup(name)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)  # 5 + 5 + 2
    diag = fisher_streamed(net, loader, structure="diag").diag()
    kfac = {kb.name: kb for kb in fisher_streamed(net, loader, structure="kfac").kron_blocks}
    for shape in (asdl.SHAPE_DIAG, asdl.SHAPE_KRON):
        copy_ = _asdl(net, list(loader), asdl.FISHER_EXACT, shape)
        if shape == asdl.SHAPE_DIAG:
            _close(diag, _asdl_diag(copy_))
            continue
        for k, mod in copy_.named_modules():
            if hasattr(mod, "fisher"):
                _close(mod.fisher.kron.B, kfac[k].B)
                _close(mod.fisher.kron.A, kfac[k].A[:-1, :-1])


def _half_mse(out: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """``(1/2) |out - target|^2``: the Gaussian negative log-likelihood (unit variance) up to a constant."""
    return 0.5 * tF.mse_loss(out, target, reduction=reduction)


def test_gaussian_family_matches_asdl_mse():
    """Family ``gaussian``: the exact Fisher ``J^T J`` is ASDL's ``LOSS_MSE`` Fisher; the empirical one is ASDL's
    empirical Fisher of the half squared error (a family the other peers here cover for the exact kind only)."""
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    x, y = torch.randn(N, 5, dtype=DT), torch.randn(N, 3, dtype=DT)
    m = ModelManifold(net, x, "gaussian")
    for fisher_type, kind, kw in ((asdl.FISHER_EXACT, "exact", {}), (asdl.FISHER_EMP, "empirical", {"targets": y})):
        copy_ = _asdl(net, [(x, y)], fisher_type, asdl.SHAPE_FULL, loss_fn=_half_mse, loss_type=asdl.LOSS_MSE)
        _close(fisher(m, kind, "dense", **kw).dense(), copy_.fisher.data)
