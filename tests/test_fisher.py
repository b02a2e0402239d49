"""fisher() for every kind x structure x family against float64 references from the dense Jacobian.

References (tests/reference/dense.py) use only torch.autograd.functional and closed forms:
``F = (1/n) sum_i J_i^T A''(eta_i) J_i`` and ``F_emp = (1/n) sum_i g_i g_i^T``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dropgeom import ModelManifold, fisher
from reference import dense as ref
from reference.cases import APPROXIMATE_STRUCTURES, EXACT_STRUCTURES, RANDOM_KINDS, REDUCTION_FACTOR
from reference.compare import assert_close_to_scale as _close
from reference.models import FISHER_MODELS, build

D64 = torch.float64
FAMILIES = ["categorical", "bernoulli", "gaussian", "poisson", "normal"]
CASES = [(m, f) for m in FISHER_MODELS for f in FAMILIES]
CASE_IDS = [f"{m}-{f}" for m, f in CASES]


def _targets(family: str, eta: torch.Tensor, seed: int = 11) -> torch.Tensor:
    torch.manual_seed(seed)
    y = ref.torch_distribution(family, eta).sample()
    return y.long() if family == "categorical" else y.to(eta.dtype)


class Case:
    def __init__(self, model_name: str, family: str) -> None:
        self.model, self.x = build(model_name, family, k=3)
        self.family = family
        self.m = ModelManifold(self.model, self.x, family)
        f, theta0, names = ref.flat_model(self.model, self.x)
        self.J = ref.dense_jacobian(f, theta0)
        self.eta = f(theta0).detach()
        self.y = _targets(family, self.eta)
        self.F = {
            "exact": ref.exact_fisher(self.J, self.eta, family),
            "empirical": ref.empirical_fisher(self.J, self.eta, self.y, family),
        }
        params = dict(self.model.named_parameters())
        self.groups = {}
        i = 0
        for k in names:
            module = k.rsplit(".", 1)[0] if "." in k else ""  # a bare nn.Linear owns "weight" and "bias"
            self.groups.setdefault(module, []).extend(range(i, i + params[k].numel()))
            i += params[k].numel()
        self.block_mask = torch.zeros(theta0.numel(), theta0.numel(), dtype=torch.bool)
        for idx in self.groups.values():
            ix = torch.tensor(idx)
            self.block_mask[ix[:, None], ix[None, :]] = True

    def op(self, kind, structure, **kw):
        extra = {}
        if kind == "empirical":
            extra["targets"] = self.y
        if kind == "mc":
            extra["generator"] = torch.Generator().manual_seed(kw.pop("seed", 3))
            extra["n_samples"] = kw.pop("n_samples", 2)
        return fisher(self.m, kind, structure, **extra, **kw)


_CACHE = {}


def case(model_name: str, family: str) -> Case:
    key = (model_name, family)
    if key not in _CACHE:
        _CACHE[key] = Case(model_name, family)
    return _CACHE[key]


# -- exact and empirical: every structure equals the dense reference -------------------


@pytest.mark.parametrize("model_name,family", CASES, ids=CASE_IDS)
def test_structure_matches_dense_reference(model_name, family, deterministic_kind, exact_structure):
    kind, structure = deterministic_kind, exact_structure
    c = case(model_name, family)
    F = c.F[kind]
    op = c.op(kind, structure)
    assert op.shape == F.shape and op.kind == kind and op.structure == structure and op.reduction == "mean"
    expect = F if structure != "layer" else torch.where(c.block_mask, F, torch.zeros_like(F))
    scale = F.abs().max().item()
    if structure != "diag":
        _close(op.dense(), expect, scale)
    _close(op.diag(), F.diagonal(), scale)
    _close(op.trace(), F.trace(), scale * F.shape[0])
    V = torch.randn(F.shape[0], 3, dtype=D64, generator=torch.Generator().manual_seed(9))
    diag_or_full = torch.diag_embed(F.diagonal()) if structure == "diag" else expect
    _close(op.mv(V), diag_or_full @ V, scale * V.abs().sum(0).max().item())
    _close(op.mv(V[:, 0]), diag_or_full @ V[:, 0], scale * V[:, 0].abs().sum().item())


@pytest.mark.parametrize("model_name,family", CASES, ids=CASE_IDS)
def test_kfac_factors_and_exact_cases(model_name, family, kind):
    """KFAC of a Linear layer with inputs ``a_i`` (``a~ = [a; 1]``) and output factors ``g_ir``:
    ``B (x) A`` with ``A = (1/n) sum_i a~ a~^T`` and ``B = (1/n) sum_ir g_ir g_ir^T``. The bias
    gradient of the layer is ``g``, so ``B`` *is* the exact bias-bias block of the same Fisher:
    the whole KFAC block follows from the dense reference and the layer inputs."""
    c = case(model_name, family)
    acts = ref.layer_inputs(c.model, c.x)
    slices = c.m.param_slices()
    # a random kind: the same seeded draw in dense form is the reference
    F = c.op(kind, "dense").dense() if kind in RANDOM_KINDS else c.F[kind]
    K_op = c.op(kind, "kfac")
    Kd = K_op.dense()
    assert ref.is_psd(Kd)
    _close(K_op.diag(), Kd.diagonal())
    # no coupling between modules
    assert (Kd[~c.block_mask] == 0).all()
    for name, mod in c.model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        a = acts[name]
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=D64)], 1)
        A = a.T @ a / a.shape[0]
        pre = f"{name}." if name else ""
        bs = slices[pre + "bias"]
        B = F[bs, bs]
        idx = ref.wb_index(slices[pre + "weight"], bs, mod.out_features, mod.in_features)
        _close(Kd[idx[:, None], idx[None, :]], ref.kron_block(B, A), F.abs().max().item())
        # trace relation tr(B (x) A) = tr(B) tr(A)
        _close(Kd[idx, idx].sum(), B.trace() * A.trace(), F.abs().max().item() * len(idx))


@pytest.mark.parametrize("family", FAMILIES)
def test_kfac_is_exact_for_a_single_linear_layer_on_one_input(family, kind):
    """One Linear layer, n = 1: ``E[g g^T (x) a a^T] = E[g g^T] (x) E[a a^T]`` trivially."""
    model, x = build("logreg", family, k=3)
    x = x[:1]
    m = ModelManifold(model, x, family)
    f, th, _ = ref.flat_model(model, x)
    J, eta = ref.dense_jacobian(f, th), f(th).detach()
    extra = {}
    if kind == "empirical":
        extra["targets"] = _targets(family, eta)
        F = ref.empirical_fisher(J, eta, extra["targets"], family)
    elif kind == "exact":
        F = ref.exact_fisher(J, eta, family)
    else:
        extra["generator"] = torch.Generator().manual_seed(1)
        F = fisher(m, "mc", "dense", generator=torch.Generator().manual_seed(1)).dense()
    _close(fisher(m, kind, "kfac", **extra).dense(), F)


def test_kfac_is_exact_for_the_gaussian_glm():
    """Gaussian family, one Linear layer: ``Sigma_i = sigma^2 I`` is constant, so KFAC = F for any n."""
    model, x = build("logreg", "gaussian", k=3)
    m = ModelManifold(model, x, "gaussian")
    f, th, _ = ref.flat_model(model, x)
    F = ref.exact_fisher(ref.dense_jacobian(f, th), f(th).detach(), "gaussian")
    _close(fisher(m, "exact", "kfac").dense(), F)


# -- sum = n * mean, structures agree ---------------------------------------------------


def test_reduction_scales_the_mean(kind, structure, reduction):
    """sum = n * mean (and mean = mean): the factors of the case table, for every kind and structure."""
    c = case("mlp_tanh", "categorical")
    mean = c.op(kind, structure)
    total = c.op(kind, structure, reduction=reduction)
    assert total.reduction == reduction
    n = REDUCTION_FACTOR[reduction](c.m.n)
    V = torch.randn(mean.shape[0], 2, dtype=D64)
    _close(total.diag(), n * mean.diag())
    _close(total.mv(V), n * mean.mv(V))
    _close(total.trace(), n * mean.trace())


@pytest.mark.parametrize("model_name,family", [("mlp_tanh", "poisson"), ("cnn_maxpool", "categorical")])
def test_structures_agree_with_each_other(model_name, family, kind):
    """Same kind (same seeded MC draw): every structure has the dense diagonal and trace;
    implicit and layer products agree with dense; PSD."""
    c = case(model_name, family)
    ops = {s: c.op(kind, s) for s in EXACT_STRUCTURES}  # kfac approximates: checked on its own
    Fd = ops["dense"].dense()
    assert ref.is_psd(Fd)
    for op in ops.values():
        _close(op.diag(), Fd.diagonal())
        _close(op.trace(), Fd.trace())
        assert (op.diag() >= 0).all()
    V = torch.randn(Fd.shape[0], 2, dtype=D64)
    _close(ops["implicit"].mv(V), Fd @ V, Fd.abs().max().item() * V.abs().sum(0).max().item())
    Fl = ops["layer"].dense()
    assert ref.is_psd(Fl)
    _close(Fl, torch.where(c.block_mask, Fd, torch.zeros_like(Fd)))


# -- Monte Carlo converges to exact ------------------------------------------------------


@pytest.mark.parametrize("model_name,family", CASES, ids=CASE_IDS)
def test_mc_converges_to_exact(model_name, family):
    """``F_mc`` with M draws per input is a mean of i.i.d. terms ``X_im = g g^T``, ``g = J_i^T (t(yhat) - mu_i)``.
    Its standard error per entry is ``sqrt(sum_i Var X_i / M) / n``; ``Var X_i`` is estimated from
    independent reference draws (torch.distributions). Every entry must lie within z standard errors."""
    c = case(model_name, family)
    M = 200
    op = fisher(c.m, "mc", "dense", n_samples=M, generator=torch.Generator().manual_seed(5))
    F = c.F["exact"]
    # independent draws for the variance
    torch.manual_seed(17)
    R = 200
    dist = ref.torch_distribution(family, c.eta)
    _, mu, _, _ = ref.family_derivatives(family, c.eta)
    ys = dist.sample((R,))  # [R, n(, K)]
    t = torch.stack([ref.sufficient_statistic(family, y, c.eta.shape[1]) for y in ys])  # [R, n, K]
    g = torch.einsum("nkp,rnk->rnp", c.J, t - mu)
    X = torch.einsum("rnp,rnq->rnpq", g, g)
    var_i = X.var(0)  # [n, P, P]
    se = (var_i.sum(0) / M).sqrt() / c.m.n
    z = ref.gaussian_tolerance_sigma()
    dev = (op.dense() - F).abs()
    assert (dev <= z * se + 1e-12 * F.abs().max()).all(), (dev / (se + 1e-300)).max()
    # the estimate is not the exact one (it is random) but is unbiased: its trace error is small
    assert abs(op.trace() - F.trace()) <= z * (var_i.diagonal(dim1=1, dim2=2).sum() / M).sqrt() / c.m.n * math.sqrt(F.shape[0])
    # reproducible
    again = fisher(c.m, "mc", "diag", n_samples=M, generator=torch.Generator().manual_seed(5))
    _close(again.diag(), op.diag())


def test_mc_single_sample_equals_its_own_dense_reference():
    """``n_samples=1``: ``F_mc = (1/n) sum_i g_i g_i^T`` for the drawn labels. The draw is
    reproduced here from the same generator through the family's sampler (a format check of the
    factor path), and the Fisher then rebuilt from the dense Jacobian."""
    c = case("mlp_tanh", "bernoulli")
    gen = torch.Generator().manual_seed(21)
    y = c.m.family.sample(c.m.eta(), generator=gen)
    F = ref.empirical_fisher(c.J, c.eta, y, "bernoulli")  # same form with sampled labels
    op = fisher(c.m, "mc", "dense", n_samples=1, generator=torch.Generator().manual_seed(21))
    _close(op.dense(), F)


# -- empirical uses the targets -----------------------------------------------------------


def test_empirical_depends_on_targets_and_equals_exact_only_in_expectation():
    c = case("logreg", "categorical")
    y2 = (c.y + 1) % 3
    F1 = fisher(c.m, "empirical", "dense", targets=c.y).dense()
    F2 = fisher(c.m, "empirical", "dense", targets=y2).dense()
    assert not torch.allclose(F1, F2)
    _close(F2, ref.empirical_fisher(c.J, c.eta, y2, "categorical"))
    # averaging the empirical Fisher over all labels weighted by p(y|x) gives the exact Fisher
    p = torch.softmax(c.eta, -1)
    avg = torch.zeros_like(F1)
    n = c.m.n
    for i in range(n):
        for k in range(3):
            yi = c.y.clone()
            yi[i] = k
            Fi = ref.empirical_fisher(c.J[i : i + 1], c.eta[i : i + 1], yi[i : i + 1], "categorical")
            avg += p[i, k] * Fi / n
    _close(avg, c.F["exact"])


# -- eig and solve on the Fisher operators --------------------------------------------------


def test_eig_and_solve_against_dense(structure):
    c = case("mlp_tanh", "categorical")
    op = c.op("exact", structure)
    Fs = op.dense()
    w, Q = torch.linalg.eigh(Fs)
    vals, vecs = op.eig(2)
    _close(vals, w.flip(0)[:2], w.max().item())
    _close(op.mv(vecs), vecs * vals, w.max().item() * 10)
    b = torch.randn(Fs.shape[0], dtype=D64)
    lam = 0.1 * w.max().item()
    x = op.solve(b, damping=lam)
    expect = torch.linalg.solve(Fs + lam * torch.eye(Fs.shape[0], dtype=D64), b)
    torch.testing.assert_close(x, expect, rtol=1e-6, atol=1e-8 * expect.abs().max().item())


# -- errors ---------------------------------------------------------------------------------


def test_errors_name_the_problem(monkeypatch):
    c = case("mlp_tanh", "categorical")
    with pytest.raises(ValueError, match="unknown Fisher kind"):
        fisher(c.m, "natural", "dense")
    with pytest.raises(ValueError, match="unknown structure"):
        fisher(c.m, "exact", "blockwise")
    with pytest.raises(ValueError, match="unknown reduction"):
        fisher(c.m, "exact", "dense", reduction="max")
    with pytest.raises(ValueError, match="targets="):
        fisher(c.m, "empirical", "diag")
    with pytest.raises(ValueError, match=r"shape \[n\]"):
        fisher(c.m, "empirical", "diag", targets=c.y[:-1])
    with pytest.raises(ValueError, match="integer class indices"):
        fisher(c.m, "empirical", "diag", targets=c.y.double())
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        fisher(c.m, "empirical", "diag", targets=c.y + 3)
    with pytest.raises(ValueError, match="n_samples"):
        fisher(c.m, "mc", "diag", n_samples=0)
    with pytest.raises(TypeError, match="ModelManifold"):
        fisher(c.model, "exact", "diag")
    g = case("mlp_tanh", "gaussian")
    with pytest.raises(ValueError, match=r"shape \[n, K\]"):
        fisher(g.m, "empirical", "diag", targets=g.y[:, :1])
    with pytest.raises(ValueError, match="floating-point"):
        fisher(g.m, "empirical", "diag", targets=g.y.long())
    p = case("mlp_tanh", "poisson")
    with pytest.raises(ValueError, match="non-negative"):
        fisher(p.m, "empirical", "diag", targets=-p.y - 1)
    monkeypatch.setattr("dropgeom._utils.DEFAULT_MEMORY_LIMIT", 64)  # memory_guard lives there
    with pytest.raises(MemoryError, match="structure='(diag|kfac|implicit)'"):
        fisher(c.m, "exact", "dense")


def test_float32_saturated_model_stays_finite(structure, deterministic_kind):
    """Logits ~1e4 in float32 (a saturated classifier): every structure is finite, PSD on its
    diagonal, and close to the float64 reference (whose Fisher is ~0 there)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        net[2].weight.mul_(1e4)
    x = torch.randn(6, 3)
    m = ModelManifold(net, x, "categorical")
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    f, th, _ = ref.flat_model(net.double(), x.double())
    J, eta = ref.dense_jacobian(f, th), f(th).detach()
    F = {"exact": ref.exact_fisher(J, eta, "categorical"), "empirical": ref.empirical_fisher(J, eta, y, "categorical")}[
        deterministic_kind
    ]
    op = fisher(m, deterministic_kind, structure, targets=y)
    d = op.diag()
    assert d.dtype == torch.float32 and torch.isfinite(d).all() and (d >= 0).all()
    assert torch.isfinite(op.mv(torch.ones(op.shape[0]))).all()
    if structure not in APPROXIMATE_STRUCTURES:
        torch.testing.assert_close(d.double(), F.diagonal(), rtol=1e-3, atol=1e-3 * F.diagonal().abs().max().item() + 1e-6)


def test_enumerations_and_strings_are_interchangeable():
    from dropgeom import FisherKind, Reduction, Structure

    c = case("logreg", "gaussian")
    a = fisher(c.m, FisherKind.EXACT, Structure.DIAG, reduction=Reduction.SUM)
    b = fisher(c.m, "EXACT", "diag", reduction="sum")
    _close(a.diag(), b.diag())
    _close(a.diag(), c.m.n * c.F["exact"].diagonal())
    assert a.kind == "exact" and a.structure == "diag" and a.reduction == "sum"


OTHER_MODELS = ["mlp_relu", "cnn_avgpool", "residual", "layernorm", "batchnorm_eval", "attention", "instancenorm"]


@pytest.mark.parametrize("model_name", OTHER_MODELS)
def test_exact_fisher_on_the_rest_of_the_model_table(model_name):
    """Residual, norm and attention models: every exact structure against the dense reference,
    KFAC's Linear-layer identity (see test_kfac_factors_and_exact_cases) and PSD."""
    c = case(model_name, "categorical")
    F = c.F["exact"]
    scale = F.abs().max().item()
    _close(c.op("exact", "dense").dense(), F, scale)
    _close(c.op("exact", "diag").diag(), F.diagonal(), scale)
    _close(c.op("exact", "layer").dense(), torch.where(c.block_mask, F, torch.zeros_like(F)), scale)
    V = torch.randn(F.shape[0], 2, dtype=D64)
    _close(c.op("exact", "implicit").mv(V), F @ V, scale * V.abs().sum(0).max().item())
    Kd = c.op("exact", "kfac").dense()
    assert ref.is_psd(Kd)
    assert (Kd[~c.block_mask] == 0).all()
    acts = ref.layer_inputs(c.model, c.x)
    slices = c.m.param_slices()
    for name, mod in c.model.named_modules():
        if type(mod) is not nn.Linear or acts[name].dim() != 2:
            continue
        a = torch.cat([acts[name], torch.ones(acts[name].shape[0], 1, dtype=D64)], 1)
        pre = f"{name}." if name else ""
        bs = slices[pre + "bias"]
        idx = ref.wb_index(slices[pre + "weight"], bs, mod.out_features, mod.in_features)
        _close(Kd[idx[:, None], idx[None, :]], ref.kron_block(F[bs, bs], a.T @ a / a.shape[0]), scale)


def test_custom_forward_takes_the_generic_path():
    """A forward that reparametrises a layer (W stored as W / c) must not go through the layer rules."""
    from torch.func import functional_call

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    c = 10.0

    def forward(params, inputs):
        scaled = {**params, "0.weight": params["0.weight"] * c}
        return functional_call(net, scaled, inputs)

    m = ModelManifold(net, x, forward=forward)
    dense = fisher(m, "exact", "dense").dense()
    for structure in ("diag", "kfac", "layer"):
        op = fisher(m, "exact", structure)
        torch.testing.assert_close(op.diag(), dense.diagonal(), atol=1e-12, rtol=1e-10)
    # and the stored-weight block is c^2 times that of the same function stored plainly (chain rule)
    import copy

    same = copy.deepcopy(net)
    with torch.no_grad():
        same[0].weight.mul_(c)
    plain = fisher(ModelManifold(same, x), "exact", "dense").dense()
    torch.testing.assert_close(dense[:12, :12], c**2 * plain[:12, :12], atol=1e-10, rtol=1e-10)
