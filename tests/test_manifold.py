"""ModelManifold against float64 dense references (torch.autograd.functional), across a table of models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dropgeom.manifold as manifold_mod
from dropgeom import ModelManifold
from reference import dense as ref
from reference.models import SETTINGS, build

D64 = torch.float64
MODELS = list(SETTINGS)
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def cases():
    """Per model: (manifold, reference function, theta0, dense Jacobian)."""
    out = {}
    for name in MODELS:
        model, x = build(name)
        f, theta0, _ = ref.flat_model(model, x)
        out[name] = (ModelManifold(model, x, "categorical"), f, theta0, ref.dense_jacobian(f, theta0), model)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_eta_theta_and_jacobian(cases, name):
    m, f, theta0, J, model = cases[name]
    assert torch.equal(m.theta, nn.utils.parameters_to_vector(model.parameters()))
    torch.testing.assert_close(m.eta(), f(theta0), **TOL)
    assert m.eta().shape == (m.n, m.num_outputs) and m.num_params == theta0.numel()
    torch.testing.assert_close(m.jacobian(), J, **TOL)


@pytest.mark.parametrize("name", MODELS)
def test_jvp_vjp_per_sample_vjp(cases, name):
    m, f, theta0, J, _ = cases[name]
    g = torch.Generator().manual_seed(5)
    v = torch.randn(m.num_params, generator=g, dtype=D64)
    w = torch.randn(m.n, m.num_outputs, generator=g, dtype=D64)
    torch.testing.assert_close(m.jvp(v), torch.einsum("nkp,p->nk", J, v), **TOL)
    torch.testing.assert_close(m.jvp(m.unflatten(v)), torch.einsum("nkp,p->nk", J, v), **TOL)
    torch.testing.assert_close(m.vjp(w), torch.einsum("nkp,nk->p", J, w), **TOL)
    S = torch.randn(m.n, m.num_outputs, 2, generator=g, dtype=D64)
    expect = torch.einsum("nkp,nkr->nrp", J, S)
    torch.testing.assert_close(m.per_sample_vjp(S), expect, **TOL)
    chunks = list(m.iter_per_sample_vjp(S, max_bytes=1))  # one sample per chunk
    assert len(chunks) == m.n
    torch.testing.assert_close(torch.cat([c for _, c in chunks]), expect, **TOL)


@pytest.mark.parametrize("name", MODELS)
def test_second_directional_derivative(cases, name):
    m, f, theta0, _, _ = cases[name]
    g = torch.Generator().manual_seed(6)
    u = torch.randn(m.num_params, generator=g, dtype=D64)
    v = torch.randn(m.num_params, generator=g, dtype=D64)
    expect = ref.dense_d2(f, theta0, u, v)
    torch.testing.assert_close(m.d2(u, v), expect, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m.d2(v, u), expect, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m.d2(u), m.d2(u, u), rtol=1e-12, atol=1e-12)
    # finite-difference sanity check of the reference itself
    h = 1e-4
    with torch.no_grad():
        fd = (f(theta0 + h * u + h * v) - f(theta0 + h * u - h * v) - f(theta0 - h * u + h * v) + f(theta0 - h * u - h * v)) / (
            4 * h * h
        )
    if name not in ("mlp_relu", "cnn_maxpool", "cnn_avgpool"):  # kinks: finite differences may straddle one
        torch.testing.assert_close(expect, fd, rtol=1e-4, atol=1e-4 * (1 + expect.abs().max().item()))


@pytest.mark.parametrize("name", ["mlp_tanh", "cnn_maxpool", "layernorm", "attention"])
def test_param_names_restriction(cases, name):
    m_full, _, _, _, model = cases[name]
    _, x = build(name)
    names = [k for k, _ in model.named_parameters()]
    chosen = [names[-1], names[0]]  # deliberately out of model order
    m = ModelManifold(model, x, "categorical", param_names=chosen)
    ordered = [k for k in names if k in chosen]
    assert m.param_names == tuple(ordered)
    f, theta0, _ = ref.flat_model(model, x, ordered)
    assert m.num_params == theta0.numel()
    torch.testing.assert_close(m.theta, theta0, rtol=0, atol=0)
    torch.testing.assert_close(m.jacobian(), ref.dense_jacobian(f, theta0), **TOL)
    # the restricted Jacobian is made of the full Jacobian's columns
    sl = m_full.param_slices()
    cols = torch.cat([m_full.jacobian()[..., sl[k]] for k in ordered], dim=-1)
    torch.testing.assert_close(m.jacobian(), cols, **TOL)


def test_param_names_unknown():
    model, x = build("mlp_tanh")
    with pytest.raises(ValueError, match="unknown parameter names"):
        ModelManifold(model, x, param_names=["0.weight", "nope"])


def test_frozen_parameters_are_fixed_by_default():
    model, x = build("mlp_tanh")
    model[0].weight.requires_grad_(False)
    m = ModelManifold(model, x)
    assert "0.weight" not in m.param_names
    assert m.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_from_function_matches_autograd():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, generator=g, dtype=D64)

    def eta_fn(th: torch.Tensor) -> torch.Tensor:
        w = th[:6].reshape(3, 2)
        return torch.tanh(x @ w) * th[6:]

    theta = torch.randn(8, generator=g, dtype=D64)
    m = ModelManifold.from_function(eta_fn, theta, "bernoulli")
    J = ref.dense_jacobian(eta_fn, theta)
    torch.testing.assert_close(m.eta(), eta_fn(theta), **TOL)
    torch.testing.assert_close(m.jacobian(), J, **TOL)
    u, v = torch.randn(8, generator=g, dtype=D64), torch.randn(8, generator=g, dtype=D64)
    torch.testing.assert_close(m.jvp(u), J @ u, **TOL)
    w = torch.randn(6, 2, generator=g, dtype=D64)
    torch.testing.assert_close(m.vjp(w), torch.einsum("nkp,nk->p", J, w), **TOL)
    torch.testing.assert_close(m.d2(u, v), ref.dense_d2(eta_fn, theta, u, v), rtol=1e-9, atol=1e-11)
    S = torch.randn(6, 2, 3, generator=g, dtype=D64)
    torch.testing.assert_close(m.per_sample_vjp(S), torch.einsum("nkp,nkr->nrp", J, S), **TOL)
    m2 = m.at(theta + 1)
    torch.testing.assert_close(m2.eta(), eta_fn(theta + 1), **TOL)
    torch.testing.assert_close(m2.jacobian(), ref.dense_jacobian(eta_fn, theta + 1), **TOL)


@pytest.mark.parametrize("name", ["mlp_softplus", "cnn_avgpool"])
def test_at_moves_the_point_and_leaves_the_original(cases, name):
    m, f, theta0, J, model = cases[name]
    theta1 = theta0 + 0.1 * torch.randn(theta0.shape, generator=torch.Generator().manual_seed(4), dtype=D64)
    m1 = m.at(theta1)
    torch.testing.assert_close(m1.eta(), f(theta1), **TOL)
    torch.testing.assert_close(m1.jacobian(), ref.dense_jacobian(f, theta1), **TOL)
    torch.testing.assert_close(m.eta(theta1), f(theta1), **TOL)
    torch.testing.assert_close(m.eta(), f(theta0), **TOL)
    torch.testing.assert_close(m.jacobian(), J, **TOL)
    assert torch.equal(nn.utils.parameters_to_vector(model.parameters()), theta0)
    # named parameters work as well as flat vectors
    torch.testing.assert_close(m.at(m.unflatten(theta1)).eta(), f(theta1), **TOL)


def test_dropout_is_not_applied_and_training_flags_are_restored():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3), nn.Dropout(0.3)).double()
    x = torch.randn(5, 4, dtype=D64)
    net.train()
    net[4].eval()  # mixed flags must come back exactly as they were
    flags = [mod.training for mod in net.modules()]
    m = ModelManifold(net, x)
    with torch.no_grad():
        clean = net.eval()(x)
    net.train()
    net[4].eval()
    v = torch.randn(m.num_params, dtype=D64)
    for _ in range(2):  # deterministic: no mask is drawn
        torch.testing.assert_close(m.eta(), clean, **TOL)
        torch.testing.assert_close(m.eta(m.theta), clean, **TOL)
        m.jvp(v), m.vjp(torch.ones(5, 3, dtype=D64)), m.d2(v), m.jacobian()
        assert [mod.training for mod in net.modules()] == flags
    f, theta0, _ = ref.flat_model(net, x)  # eval-mode reference
    torch.testing.assert_close(m.jacobian(), ref.dense_jacobian(f, theta0), **TOL)


def test_batchnorm_running_stats_untouched():
    model, x = build("batchnorm_eval")
    model.train()
    before = {k: b.clone() for k, b in model.named_buffers()}
    m = ModelManifold(model, x)
    m.jacobian(), m.jvp(m.theta), m.d2(m.theta)
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k
    assert model.training


def test_explicit_mask_forward():
    """A custom forward with per-sample masks passed as a second input."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(5, 4, dtype=D64)
    mask = torch.bernoulli(torch.full((5, 6), 0.5, dtype=D64)) / 0.5

    def forward(params, inputs):
        xx, mm = inputs
        h = torch.tanh(xx @ params["0.weight"].T + params["0.bias"]) * mm
        return h @ params["2.weight"].T + params["2.bias"]

    m = ModelManifold(net, (x, mask), "bernoulli", forward=forward)

    def f(theta):
        w1, b1, w2, b2 = torch.split(theta, [24, 6, 12, 2])
        return (torch.tanh(x @ w1.reshape(6, 4).T + b1) * mask) @ w2.reshape(2, 6).T + b2

    J = ref.dense_jacobian(f, m.theta)
    torch.testing.assert_close(m.jacobian(), J, **TOL)
    S = torch.randn(5, 2, 2, dtype=D64)
    torch.testing.assert_close(m.per_sample_vjp(S), torch.einsum("nkp,nkr->nrp", J, S), **TOL)


# -- families and output widths --------------------------------------------------


@pytest.mark.parametrize("family", ["bernoulli", "gaussian", "poisson", "normal"])
def test_other_families_accept_their_widths(family):
    model, x = build("mlp_tanh", family, k=2)
    m = ModelManifold(model, x, family)
    f, theta0, _ = ref.flat_model(model, x)
    torch.testing.assert_close(m.jacobian(), ref.dense_jacobian(f, theta0), **TOL)


@pytest.mark.parametrize(
    "family,k,msg", [("categorical", 1, "at least 2"), ("normal", 3, "exactly 2"), ("normal", 1, "exactly 2")]
)
def test_family_must_fit_output_width(family, k, msg):
    model, x = build("mlp_tanh", "categorical", k=k)
    with pytest.raises(ValueError, match=msg):
        ModelManifold(model, x, family)


def test_normal_needs_negative_second_output():
    model, x = build("mlp_tanh", "categorical", k=2)
    with torch.no_grad():
        model[2].bias.fill_(5.0)
        model[2].weight.zero_()
    with pytest.raises(ValueError, match="negative"):
        ModelManifold(model, x, "normal")


# -- errors ---------------------------------------------------------------------------


class _Reshape(nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


@pytest.mark.parametrize(
    "model,msg",
    [
        (nn.Sequential(nn.Linear(4, 3), _Reshape(3, 1)), r"shape \[n, K\]"),
        (nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)), r"shape \[n, K\]"),
        (nn.Sequential(nn.Linear(4, 3), _Reshape(3)), None),  # fine
    ],
)
def test_outputs_must_be_n_by_k(model, msg):
    x = torch.randn(5, 4, dtype=D64)
    model = model.double()
    if msg is None:
        ModelManifold(model, x)
        return
    with pytest.raises(ValueError, match=msg):
        ModelManifold(model, x)


def test_output_rows_must_match_inputs():
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x).sum(0, keepdim=True)

    with pytest.raises(ValueError, match="rows for 5 inputs"):
        ModelManifold(Pool().double(), torch.randn(5, 4, dtype=D64))


def test_input_errors():
    model, x = build("mlp_tanh")
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="inputs contains? non-finite"):
        ModelManifold(model, bad)
    with pytest.raises(ValueError, match="same leading sample axis"):
        ModelManifold(model, (x, torch.zeros(x.shape[0] + 1, 2, dtype=D64)), forward=lambda p, i: None)
    with pytest.raises(ValueError, match="empty"):
        ModelManifold(model, x[:0])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ModelManifold(lambda z: z, x)
    with pytest.raises(TypeError, match="tensor"):
        ModelManifold(model, [x])
    with pytest.raises(RuntimeError, match="shape|size|mat1"):
        ModelManifold(model, torch.randn(6, 7, dtype=D64))  # wrong feature width: torch's own message


def test_non_finite_parameters_and_outputs():
    model, x = build("mlp_tanh")
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"parameter '0.weight' contains non-finite"):
        ModelManifold(model, x)
    model, x = build("mlp_tanh")
    m = ModelManifold(model, x)
    theta = m.theta.clone()
    theta[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        m.at(theta)
    with pytest.raises(ValueError, match="non-finite"):
        ModelManifold.from_function(lambda th: th[None].expand(3, 2), torch.tensor([1.0, float("nan")]), "gaussian")
    with pytest.raises(ValueError, match="non-finite"):
        ModelManifold(nn.Sequential(nn.Linear(4, 3), nn.Softplus(), _Log()).double(), x * 0 - 1e3)


class _Log(nn.Module):
    def forward(self, x):
        return torch.log(x - 1e9)


def test_direction_errors(cases):
    m, _, _, _, _ = cases["mlp_tanh"]
    P = m.num_params
    for bad in (torch.zeros(P + 1, dtype=D64), torch.zeros(P, 1, dtype=D64), torch.zeros(3, dtype=D64)):
        with pytest.raises(ValueError, match=f"P={P}"):
            m.jvp(bad)
        with pytest.raises(ValueError, match=f"P={P}"):
            m.d2(torch.zeros(P, dtype=D64), bad)
        with pytest.raises(ValueError, match=f"P={P}"):
            m.at(bad)
    wrong = m.unflatten(torch.zeros(P, dtype=D64))
    wrong["0.weight"] = torch.zeros(2, 2, dtype=D64)
    with pytest.raises(ValueError, match="0.weight"):
        m.jvp(wrong)
    missing = m.unflatten(torch.zeros(P, dtype=D64))
    del missing["2.bias"]
    with pytest.raises(ValueError, match="missing"):
        m.jvp(missing)
    with pytest.raises(ValueError, match=r"\[n, K\]"):
        m.vjp(torch.zeros(m.n, m.num_outputs + 1, dtype=D64))
    with pytest.raises(ValueError, match=r"\[n, K, R\]"):
        m.per_sample_vjp(torch.zeros(m.n, m.num_outputs, dtype=D64))


def test_dense_jacobian_too_large(monkeypatch, cases):
    m, _, _, _, _ = cases["mlp_tanh"]
    monkeypatch.setattr("dropgeom._utils.DEFAULT_MEMORY_LIMIT", 64)  # memory_guard lives there
    with pytest.raises(MemoryError, match="jvp/vjp"):
        m.jacobian()
    with pytest.raises(MemoryError, match="structure='diag'"):
        m.per_sample_vjp(torch.zeros(m.n, m.num_outputs, 1, dtype=D64))


def test_loss_is_mean_nll(cases):
    m, _, _, _, _ = cases["mlp_tanh"]
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    expect = ref.torch_distribution_nll("categorical", m.eta(), y).mean()
    torch.testing.assert_close(m.loss(y), expect, **TOL)
    with pytest.raises(ValueError, match="class indices"):
        m.loss(y[:3])


class _DataDependent(nn.Module):
    """Python control flow on tensor values: ``vmap`` cannot batch it, the per-sample loop can."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        if float(h.detach().sum()) > 0:
            return torch.tanh(h)
        return h * 2


def test_per_sample_fallback_without_vmap_rule():
    torch.manual_seed(3)
    model = _DataDependent().double()
    x = torch.randn(5, 4, dtype=D64)
    m = ModelManifold(model, x, "gaussian")
    W, b = model.lin.weight.detach(), model.lin.bias.detach()

    def f(theta):  # the same function evaluated sample by sample (the branch is per sample)
        w, bb = theta[:12].reshape(3, 4), theta[12:]
        rows = []
        for xi in x:
            h = xi @ w.T + bb
            rows.append(torch.tanh(h) if float(h.detach().sum()) > 0 else h * 2)
        return torch.stack(rows)

    theta0 = torch.cat([W.reshape(-1), b])
    J = ref.dense_jacobian(f, theta0)
    S = torch.randn(5, 3, 2, dtype=D64)
    with pytest.warns(RuntimeWarning, match="falling back"):
        G = m.per_sample_vjp(S)
    torch.testing.assert_close(G, torch.einsum("nkp,nkr->nrp", J, S), **TOL)
    with pytest.warns(RuntimeWarning, match="falling back"):
        torch.testing.assert_close(m.jacobian(), J, **TOL)


@pytest.mark.parametrize("name", ["mlp_tanh", "cnn_maxpool", "attention"])
def test_float32_models_keep_their_dtype(name):
    model, x = build(name)
    J64 = ref.dense_jacobian(*ref.flat_model(model, x)[:2])
    m32 = ModelManifold(model.float(), x.float())
    assert m32.dtype == torch.float32
    J32 = m32.jacobian()
    assert J32.dtype == torch.float32
    torch.testing.assert_close(J32.double(), J64, rtol=1e-4, atol=1e-5)
    v = torch.randn(m32.num_params)
    assert m32.jvp(v).dtype == torch.float32 and m32.d2(v).dtype == torch.float32


def test_autodiff_kernels_fix_batch_statistics_norms_and_restore_settings():
    """Inside ``autodiff_kernels`` the second forward derivative of batch-statistic norms is right
    (checked against reverse-over-reverse); the fused MHA fast path setting comes back."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=g, dtype=D64)
    w = torch.randn(3, generator=g, dtype=D64)
    u, v = torch.randn(x.shape, generator=g, dtype=D64), torch.randn(x.shape, generator=g, dtype=D64)
    fns = [
        lambda z: nn.functional.batch_norm(z, None, None, w, w, training=True),
        lambda z: nn.functional.instance_norm(z, weight=w, bias=w),
        lambda z: nn.functional.layer_norm(z, (5,), w.new_ones(5), None),
    ]
    for fn in fns:
        flat = lambda t: fn(t.reshape(x.shape))  # noqa: E731
        expect = ref.dense_d2(flat, x.reshape(-1), u.reshape(-1), v.reshape(-1))
        with manifold_mod.autodiff_kernels():
            got = torch.func.jvp(lambda z: torch.func.jvp(fn, (z,), (u,))[1], (x,), (v,))[1]
            torch.testing.assert_close(fn(x), flat(x.reshape(-1)))
        torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-10)
    before = torch.backends.mha.get_fastpath_enabled()
    with manifold_mod.autodiff_kernels():
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_from_function_errors():
    th = torch.zeros(3, dtype=D64)
    with pytest.raises(ValueError, match="1-D"):
        ModelManifold.from_function(lambda t: t[None], th[None], "gaussian")
    with pytest.raises(ValueError, match=r"shape \[n, K\]"):
        ModelManifold.from_function(lambda t: t, th, "gaussian")
    with pytest.raises(ValueError, match="at least 2"):
        ModelManifold.from_function(lambda t: t[:, None], th, "categorical")
    with pytest.raises(ValueError, match="unknown family"):
        ModelManifold.from_function(lambda t: t[None], th, "gamma")


def test_activation_numel_is_measured_once_and_shared():
    """The element count is measured by one forward pass on the first call and kept (shapes only): later calls,
    ``at()`` and ``subset()`` run the model no more, and give the count of an independent forward with hooks."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    m = ModelManifold(net, torch.randn(6, 3, dtype=torch.float64))
    calls = []
    handle = net.register_forward_hook(lambda mod, inp, out: calls.append(out.numel()))
    try:
        first = m.activation_numel()
        assert len(calls) == 1
        theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]) + 0.1
        moved, part = m.at(theta), m.subset(slice(0, 3))  # at() runs the model once for its eta
        calls.clear()
        assert m.activation_numel() == moved.activation_numel() == part.activation_numel() == first
        assert not calls
    finally:
        handle.remove()
    assert first == 4 + 4 + 2  # the outputs of Linear, Tanh and Linear for one input
