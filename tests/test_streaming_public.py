"""The public entry points over a data set of batches (dropgeom.dispatch) against the in-memory results.

float64, 37 inputs in batches of 8 or 10 (neither divides 37); oracles: the same function on a ModelManifold of all
inputs (itself tested against brute force and the peer libraries elsewhere). Two gloo processes with uneven shards
for the curvature estimator sums and the dropout terms.
"""

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dropgeom import ModelManifold, StreamedManifold, dropout, embedding_curvature
from dropgeom.curvature import fisher_top_eigenvalue, fisher_trace, natural_gradient_curvature
from dropgeom.dispatch import streamed_functions
from dropgeom._fisher import fisher
from reference.gloo import free_port, gloo_rank

N = 37


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 4)).double()


def _data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(N, 5, dtype=torch.float64, generator=g), torch.randint(0, 4, (N,), generator=g)


def _loader(x, y, bs=8):
    return DataLoader(TensorDataset(x, y), batch_size=bs)


def _mat(op):
    return op @ torch.eye(op.size, dtype=torch.float64)


@pytest.mark.parametrize("structure", ["dense", "diag", "layer", "kfac", "implicit"])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_fisher_of_a_loader_equals_in_memory(kind, structure):
    net, (x, y) = _net(), _data()
    ref = fisher(ModelManifold(net, x), kind, structure, targets=y if kind == "empirical" else None)
    got = fisher(StreamedManifold(net, _loader(x, y)), kind, structure)
    assert got.structure == structure and got.meta.n == N
    torch.testing.assert_close(_mat(got), _mat(ref), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got.diag(), ref.diag(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got.trace(), ref.trace(), atol=1e-10, rtol=1e-10)
    if structure in ("dense", "implicit"):
        vals, _ = got.eig(k=2)
        torch.testing.assert_close(vals, ref.eig(k=2)[0], atol=1e-9, rtol=1e-9)


def test_sharpness_and_tensor_data_stream():
    net, (x, y) = _net(), _data()
    m = ModelManifold(net, x)
    streamed = StreamedManifold(net, x, targets=y, batch_size=10)
    assert fisher_trace(streamed) == pytest.approx(fisher_trace(m), rel=1e-10)
    assert fisher_top_eigenvalue(streamed) == pytest.approx(fisher_top_eigenvalue(m), rel=1e-9)
    assert streamed.n == N and fisher(streamed, "empirical", "diag").meta.n == N


#: The stochastic estimator, small for CI. Its conjugate-gradient solves carry the rounding differences of the batch
#: sums up to their tolerance, so the streamed estimate equals the in-memory one to ~cg_tol (the products themselves
#: agree to 1e-10: test_batched_linearisation_products_equal_in_memory); ranks agree bit for bit.
CURV = dict(method="stochastic", n_samples=2, batch_size=2, damping=0.1, cg_tol=1e-6)
CURV_RTOL = 1e-5


def test_batched_linearisation_products_equal_in_memory():
    from dropgeom.curvature._common import LinearisedManifold
    from dropgeom.curvature.streamed import BatchedLinearisation

    net, (x, y) = _net(), _data()
    whole = LinearisedManifold(ModelManifold(net, x))
    parts = BatchedLinearisation([m for m, _ in StreamedManifold(net, _loader(x, y, 10)).manifolds()])
    g = torch.Generator().manual_seed(1)
    V = torch.randn(3, whole.m.num_params, dtype=torch.float64, generator=g)
    W = torch.randn(3, N, 4, dtype=torch.float64, generator=g)
    torch.testing.assert_close(parts.jvp(V), whole.jvp(V), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(parts.vjp(W), whole.vjp(W), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(parts.d2(V, V.flip(0)), whole.d2(V, V.flip(0)), atol=1e-12, rtol=1e-10)


def test_linearisation_needs_a_streamed_manifold():
    from dropgeom.curvature.streamed import linearisation

    net, (x, _) = _net(), _data()
    with pytest.raises(TypeError, match=r"linearisation\(\) needs a StreamedManifold, got ModelManifold"):
        linearisation(ModelManifold(net, x))  # an AttributeError (no .model) before


@pytest.fixture
def cg_in_memory(monkeypatch):
    """In memory, the stochastic estimator projects and solves by the same conjugate gradients as over a loader
    (not the dense SVD or the Gram matrix it takes for a small Jacobian), so the two paths can be compared draw for
    draw."""
    from dropgeom.curvature import _tangent, embedding

    monkeypatch.setattr(embedding, "dense_projection_fits", lambda manifold: False)
    monkeypatch.setattr(_tangent, "MAX_GRAM_ROWS", 0)


@pytest.fixture
def gram_in_memory(monkeypatch):
    """In memory, the stochastic estimator takes the Gram solver (not the dense SVD it takes for a small Jacobian),
    as it does over a loader for ``nR <= MAX_GRAM_ROWS``."""
    from dropgeom.curvature import embedding

    monkeypatch.setattr(embedding, "dense_projection_fits", lambda manifold: False)


#: The stochastic estimator with the Gram solver (``nR = 37 x 4``): exact linear algebra, so the streamed estimate
#: equals the in-memory one up to the rounding of the batch sums in ``K`` (not a solver tolerance).
GRAM = dict(method="stochastic", n_samples=4, batch_size=2)
GRAM_RTOL = 1e-9


@pytest.mark.parametrize("alpha, damping", [(1.0, 0.1), (-1.0, 0.1), (1.0, None)])
def test_loader_with_the_gram_solver_equals_in_memory_draw_for_draw(alpha, damping, gram_in_memory):
    """Over a loader the Gram matrix is formed from the batch products (it used conjugate gradients whatever the
    size); same generator, same draws, same value as in memory, with and without damping."""
    net, (x, y) = _net(), _data()
    kw = dict(alpha=alpha, damping=damping, **GRAM)
    ref = embedding_curvature(ModelManifold(net, x), generator=torch.Generator().manual_seed(0), **kw)
    got = embedding_curvature(StreamedManifold(net, _loader(x, y, 10)), generator=torch.Generator().manual_seed(0), **kw)
    assert ref.solver == got.solver == "gram"
    for f in ("gamma2", "gamma2_per_sample", "stderr"):
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), atol=0, rtol=GRAM_RTOL)
    if damping is not None:
        assert got.damping_abs == pytest.approx(ref.damping_abs, rel=1e-12)


def test_a_float32_model_over_a_loader_is_estimated_in_float64(gram_in_memory):
    """A float32 model over batches runs on a float64 copy, each batch cast as it is read (as in memory, where
    the float32 Gram solver was 50-fold off): the streamed and in-memory float32 estimates agree, in float64."""
    net, (x, y) = _net().float(), _data()
    kw = dict(damping=0.1, **GRAM)
    ref = embedding_curvature(ModelManifold(net, x.float()), generator=torch.Generator().manual_seed(0), **kw)
    got = embedding_curvature(StreamedManifold(net, _loader(x.float(), y, 10)), generator=torch.Generator().manual_seed(0), **kw)
    assert got.gamma2.dtype == ref.gamma2.dtype == torch.float64 and got.solver == "gram"
    torch.testing.assert_close(got.gamma2, ref.gamma2, atol=0, rtol=GRAM_RTOL)
    assert next(net.parameters()).dtype == torch.float32  # the caller's model is untouched


@pytest.mark.parametrize("alpha", [1.0, -1.0])
def test_stochastic_embedding_curvature_of_a_loader_equals_in_memory(alpha, cg_in_memory):
    net, (x, y) = _net(), _data()
    kw = dict(alpha=alpha, **CURV)
    ref = embedding_curvature(ModelManifold(net, x), generator=torch.Generator().manual_seed(0), **kw)
    got = embedding_curvature(StreamedManifold(net, _loader(x, y, 10)), generator=torch.Generator().manual_seed(0), **kw)
    for f in ("gamma2", "gamma2_per_sample", "stderr"):
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), atol=0, rtol=CURV_RTOL)
    assert got.damping_abs == pytest.approx(ref.damping_abs, rel=CURV_RTOL)


def test_dropout_terms_gap_penalty_take_a_loader():
    net, (x, y) = _net(), _data()
    loader = _loader(x, y)
    t, t_ref = dropout.terms(net, loader), dropout.terms(net, x, y)
    for f in ("fisher", "curvature_gaussian", "divergence", "curvature_bernoulli"):
        assert getattr(t, f) == pytest.approx(getattr(t_ref, f), rel=1e-10, abs=1e-14)
    for layer, d in t_ref.per_unit.items():
        for k, v in d.items():
            torch.testing.assert_close(t.per_unit[layer][k], v, atol=1e-12, rtol=1e-10)
    g = dropout.gap(net, [(x[:20], y[:20]), (x[20:], y[20:])], p=0.3, method="exact")
    assert g.value == pytest.approx(dropout.gap(net, x, y, p=0.3, method="exact").value, rel=1e-10)
    for kw in (dict(), dict(form="divergence", curvature=True)):
        ref = dropout.penalty(net, x, p=0.3, targets=y if kw else None, **kw)
        got = dropout.penalty(net, loader, p=0.3, **kw)
        assert got.eta is None  # the batches' outputs are not kept
        torch.testing.assert_close(got.value, ref.value.detach(), atol=1e-12, rtol=1e-10)
    # gradient accumulation (the documented way to train on the penalty over a loader): sum_b (n_b / N) grad P_b
    net.zero_grad()
    for xb, _ in loader:
        (dropout.penalty(net, xb, p=0.3).value * xb.shape[0] / N).backward()
    acc = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    dropout.penalty(net, x, p=0.3).value.backward()
    for a, p in zip(acc, net.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-12, rtol=1e-10)


def test_deprecated_call_forms_stream_too():
    """The old keyword ``estimator=`` (``train``'s objective option and the CLI's ``--estimator`` still use the word)
    and the old positional order reach the loader path, with the deprecation warning; they raised 'inputs must be a
    tensor' on a loader."""
    net, (x, y) = _net(), _data()
    loader = _loader(x, y)
    ref = dropout.penalty(net, x, p=0.3, method="exact").value.detach()
    with pytest.warns(DeprecationWarning, match="estimator"):
        got = dropout.penalty(net, loader, p=0.3, estimator="exact")
    torch.testing.assert_close(got.value, ref, atol=1e-12, rtol=1e-10)
    with pytest.warns(DeprecationWarning, match="by position"):
        old = dropout.penalty(net, loader, "categorical", 0.3)
    torch.testing.assert_close(old.value, ref, atol=1e-12, rtol=1e-10)
    with pytest.warns(DeprecationWarning, match="by position"):
        g = dropout.gap(net, [(x[:20], y[:20]), (x[20:], y[20:])], None, "categorical", 0.3, method="exact")
    assert g.value == pytest.approx(dropout.gap(net, x, y, p=0.3, method="exact").value, rel=1e-10)


def test_what_cannot_be_streamed_says_so():
    net, (x, y) = _net(), _data()
    s = StreamedManifold(net, _loader(x, y))
    with pytest.raises(ValueError, match=r"method='dense'\) cannot be streamed"):
        embedding_curvature(s)
    with pytest.raises(TypeError, match="is not streamed over batches"):
        natural_gradient_curvature(s, y)
    with pytest.raises(ValueError, match="return_output= cannot be used"):
        dropout.penalty(net, _loader(x, y), p=0.3, return_output=True)
    with pytest.raises(ValueError, match="targets= goes with tensor inputs"):
        dropout.terms(net, _loader(x, y), y)
    with pytest.raises(ValueError, match="takes its targets from the batches"):
        fisher(s, "empirical", "diag", targets=y)
    with pytest.raises(ValueError, match="targets= goes with tensor inputs"):
        StreamedManifold(net, _loader(x, y), targets=y)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        StreamedManifold(lambda t: t, [x])
    with pytest.raises(ValueError, match="one-shot iterator"):
        fisher(StreamedManifold(net, (b for b in [x[:5], x[5:]])), "exact", "implicit").diag()
    with pytest.raises(ValueError, match="no batches"):
        fisher(StreamedManifold(net, []), "exact", "diag")
    with pytest.raises(ValueError, match="batch 0: the model cannot take"):
        fisher(StreamedManifold(net, [x[:, :3]]), "exact", "diag")
    listed = streamed_functions()
    assert {"dropgeom._fisher.fisher", "dropgeom.curvature.embedding.embedding_curvature"} <= set(listed)


# ------------------------------------------------------------------ two processes, gloo on 127.0.0.1
def _worker(rank: int, world: int, port: int, out: str) -> None:
    from dropgeom.curvature import _tangent

    _tangent.MAX_GRAM_ROWS = 0  # conjugate gradients, as the in-memory reference (cg_in_memory: not inherited by spawn)

    def body() -> None:
        net, (x, y) = _net(), _data()
        shard = slice(0, 15) if rank == 0 else slice(15, N)  # uneven shards
        loader = _loader(x[shard], y[shard], 6)
        curv = embedding_curvature(StreamedManifold(net, loader), alpha=-1.0, generator=torch.Generator().manual_seed(0), **CURV)
        t = dropout.terms(net, loader)
        g = dropout.gap(net, loader, p=0.3, method="exact")
        pen = dropout.penalty(net, loader, p=0.3).value
        torch.save(dict(gamma2=curv.gamma2, stderr=curv.stderr, terms=t, gap=g.value, penalty=pen), f"{out}.{rank}")

    gloo_rank(rank, world, port, body)


def test_two_gloo_processes_curvature_and_dropout_terms(tmp_path, cg_in_memory):
    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0", weights_only=False), torch.load(f"{out}.1", weights_only=False)
    net, (x, y) = _net(), _data()
    ref = embedding_curvature(ModelManifold(net, x), alpha=-1.0, generator=torch.Generator().manual_seed(0), **CURV)
    assert torch.equal(r0["gamma2"], r1["gamma2"]) and torch.equal(r0["stderr"], r1["stderr"])  # lockstep
    for r in (r0, r1):
        torch.testing.assert_close(r["gamma2"], ref.gamma2, atol=0, rtol=CURV_RTOL)
        torch.testing.assert_close(r["stderr"], ref.stderr, atol=0, rtol=CURV_RTOL)
        t_ref = dropout.terms(net, x, y)
        for f in ("fisher", "curvature_gaussian", "divergence", "curvature_bernoulli"):
            assert getattr(r["terms"], f) == pytest.approx(getattr(t_ref, f), rel=1e-10, abs=1e-14)
        assert r["gap"] == pytest.approx(dropout.gap(net, x, y, p=0.3, method="exact").value, rel=1e-10)
        torch.testing.assert_close(r["penalty"], dropout.penalty(net, x, p=0.3).value.detach(), atol=1e-12, rtol=1e-10)


def _gram_worker(rank: int, world: int, port: int, out: str) -> None:
    from dropgeom.curvature import _tangent

    # 7 rows of K per block (P + activations x n + nR = 64 + 22 x 37 + 148 elements a row): the block of rows
    # 56-62 straddles the ranks' boundary at row 15 x 4 = 60
    _tangent.GRAM_BLOCK_ELEMENTS = 7 * (64 + 22 * N + 4 * N)

    def body() -> None:
        net, (x, y) = _net(), _data()
        shard = slice(0, 15) if rank == 0 else slice(15, N)  # uneven shards
        res = embedding_curvature(
            StreamedManifold(net, _loader(x[shard], y[shard], 6)),
            alpha=-1.0,
            damping=0.1,
            generator=torch.Generator().manual_seed(0),
            **GRAM,
        )
        keep = dict(gamma2=res.gamma2, stderr=res.stderr, solver=res.solver, lam=res.damping_abs, resid=res.projection_residual)
        torch.save(keep, f"{out}.{rank}")

    gloo_rank(rank, world, port, body)


def test_two_gloo_processes_with_the_gram_solver_equal_in_memory(tmp_path, gram_in_memory):
    """Each rank holds its rows of ``A = S^T J``; ``K`` is formed from all-reduced vector-Jacobian products and an
    all-gather of the rows of ``A A^T e_i``, so both ranks decompose the same ``K`` and agree bit for bit, and the
    estimate equals the in-memory Gram estimate draw for draw."""
    out = str(tmp_path / "res")
    mp.spawn(_gram_worker, args=(2, free_port(), out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0", weights_only=False), torch.load(f"{out}.1", weights_only=False)
    net, (x, _) = _net(), _data()
    ref = embedding_curvature(ModelManifold(net, x), alpha=-1.0, damping=0.1, generator=torch.Generator().manual_seed(0), **GRAM)
    assert r0["solver"] == r1["solver"] == ref.solver == "gram"
    assert torch.equal(r0["gamma2"], r1["gamma2"]) and torch.equal(r0["stderr"], r1["stderr"]) and r0["lam"] == r1["lam"]
    torch.testing.assert_close(r0["gamma2"], ref.gamma2, atol=0, rtol=GRAM_RTOL)
    torch.testing.assert_close(r0["stderr"], ref.stderr, atol=0, rtol=GRAM_RTOL)
    assert r0["lam"] == pytest.approx(ref.damping_abs, rel=1e-12)
    assert r0["resid"] == r1["resid"] <= 1e-6  # the rounding floor of the residual from global norms, too
