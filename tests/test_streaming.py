"""Streamed (batched, distributed) Fisher against the all-in-memory Fisher, float64, batch sizes that do not divide n."""

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dropgeom import ModelManifold
from dropgeom._fisher import fisher
from dropgeom.options import Structure
from dropgeom.streaming import fisher_streamed, iter_batches
from reference.gloo import free_port, gloo_rank

#: the structures compared as matrices (the implicit operator is compared through its products);
#: plain values, as the gloo workers' results are saved and loaded with weights_only
STRUCTURES = [s.value for s in Structure if s is not Structure.IMPLICIT]
N = 37


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double()


def _data(model):
    torch.manual_seed(2)
    x = (
        torch.randn(N, 5, dtype=torch.float64)
        if isinstance(model[0], nn.Linear)
        else torch.randn(N, 1, 6, 6, dtype=torch.float64)
    )
    y = torch.randint(0, model[-1].out_features, (N,))
    return x, y


def _dense(op):
    return op.dense() if op.structure != "kfac" else op @ torch.eye(op.size, dtype=torch.float64)


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_loader_equals_in_memory(make, structure, deterministic_kind):
    kind = deterministic_kind
    net = make()
    x, y = _data(net)
    ref = fisher(ModelManifold(net, x), kind, structure, targets=y if kind == "empirical" else None)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 37 = 4 * 8 + 5
    got = fisher_streamed(net, loader, kind=kind, structure=structure)
    assert got.structure == structure and got.meta.n == N
    torch.testing.assert_close(_dense(got), _dense(ref), atol=1e-10, rtol=1e-10)
    tensor_chunks = fisher_streamed(net, x, targets=y, kind=kind, structure=structure, batch_size=10)
    torch.testing.assert_close(_dense(tensor_chunks), _dense(ref), atol=1e-10, rtol=1e-10)


def test_implicit_products_and_diag_and_sum_reduction():
    net = _mlp()
    x, y = _data(net)
    ref = fisher(ModelManifold(net, x), "exact", "dense").dense()
    batches = [(x[i : i + 9], y[i : i + 9]) for i in range(0, N, 9)]
    op = fisher_streamed(net, batches, structure="implicit")
    V = torch.randn(op.size, 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, ref @ V, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(op.diag(), ref.diagonal(), atol=1e-10, rtol=1e-10)
    summed = fisher_streamed(net, batches, structure="diag", reduction="sum")
    torch.testing.assert_close(summed.diag(), N * ref.diagonal(), atol=1e-9, rtol=1e-10)


def test_memory_budget_chunks_tensor_inputs():
    net = _mlp()
    x, _ = _data(net)
    ref = fisher(ModelManifold(net, x), "exact", "diag").diag()
    tiny = fisher_streamed(net, x, structure="diag", memory_budget=2000)  # a few inputs per chunk
    torch.testing.assert_close(tiny.diag(), ref, atol=1e-12, rtol=1e-10)
    big_batches = fisher_streamed(net, [x[:30], x[30:]], structure="diag", memory_budget=2000)  # loader batches split
    torch.testing.assert_close(big_batches.diag(), ref, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="memory_budget"):
        fisher_streamed(net, x, structure="diag", memory_budget=0)


def test_mc_is_reproducible_and_unbiased():
    net = _mlp()
    x, _ = _data(net)
    a = fisher_streamed(net, x, kind="mc", structure="diag", batch_size=10, seed=3).diag()
    b = fisher_streamed(net, x, kind="mc", structure="diag", batch_size=10, seed=3).diag()
    assert torch.equal(a, b)
    exact = fisher(ModelManifold(net, x), "exact", "diag").diag()
    many = fisher_streamed(net, x, kind="mc", structure="diag", batch_size=10, seed=4, n_samples=4000).diag()
    assert float((many - exact).abs().max() / exact.abs().max()) < 0.08
    op = fisher_streamed(net, [x[:20], x[20:]], kind="mc", structure="implicit", seed=5)
    V = torch.randn(op.size, 2, dtype=torch.float64)
    assert torch.equal(op @ V, op @ V)  # one fixed matrix: the same draws at every product


def test_bad_input_is_named():
    net = _mlp()
    x, y = _data(net)
    with pytest.raises(ValueError, match="no batches"):
        fisher_streamed(net, [], structure="diag")
    with pytest.raises(ValueError, match="batch 1 has shapes"):
        fisher_streamed(net, [x[:5], torch.randn(5, 7, dtype=torch.float64)], structure="diag")
    with pytest.raises(TypeError, match="batch 0"):
        list(iter_batches(["not a tensor"]))
    with pytest.raises(ValueError, match="needs observed labels"):
        fisher_streamed(net, [x[:5]], kind="empirical", structure="diag")
    with pytest.raises(ValueError, match="one-shot iterator"):
        fisher_streamed(net, (b for b in [x[:5]]), structure="implicit")
    with pytest.raises(ValueError, match="targets= goes with tensor inputs"):
        list(iter_batches([x], targets=y))
    with pytest.raises(ValueError, match="batch 0: 5 inputs but targets"):
        fisher_streamed(net, [(x[:5], y[:4])], structure="diag")
    with pytest.raises(ValueError, match=r"batch 0: the model cannot take inputs of shape \(5, 3\)"):
        fisher_streamed(net, [(x[:5, :3], y[:5])], structure="diag")
    with pytest.raises(ValueError, match="unknown structure"):
        fisher_streamed(net, x, structure="triangular")
    from dropgeom.batches import all_reduce, shard

    with pytest.raises(TypeError, match="all_reduce sums a tensor in place, got float"):  # returned 3.0 before
        all_reduce(3.0)
    with pytest.raises(ValueError, match=r"n_local .* must be an int >= 0, got -1"):  # gave N = -1 before
        shard(-1)


# ------------------------------------------------------------------ two processes, gloo on 127.0.0.1
def _worker(rank: int, world: int, port: int, out: str, perturb: bool) -> None:
    def body() -> None:
        net = _mlp()
        if perturb and rank == 1:
            with torch.no_grad():
                net[0].weight[0, 0] += 1e-9
        x, y = _data(net)
        shard = slice(0, 15) if rank == 0 else slice(15, N)  # uneven shards
        res = {}
        try:
            for s in STRUCTURES:
                op = fisher_streamed(net, DataLoader(TensorDataset(x[shard], y[shard]), batch_size=6), structure=s)
                res[s] = _dense(op)
            imp = fisher_streamed(net, [(x[shard], y[shard])], structure="implicit")
            res["implicit"] = imp @ torch.eye(imp.size, dtype=torch.float64)
        except RuntimeError as err:
            res["error"] = str(err)
        torch.save(res, f"{out}.{rank}")

    gloo_rank(rank, world, port, body)


@pytest.mark.parametrize("perturb", [False, True], ids=["same", "different-parameters"])
def test_two_gloo_processes_equal_one(tmp_path, perturb):
    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(2, free_port(), out, perturb), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    if perturb:
        assert "ranks [1] hold different model parameters" in r0["error"] and "error" in r1
        return
    net = _mlp()
    x, _ = _data(net)
    m = ModelManifold(net, x)
    for s in STRUCTURES + ["implicit"]:
        ref = _dense(fisher(m, "exact", s if s != "implicit" else "dense"))
        torch.testing.assert_close(r0[s], ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(r1[s], r0[s], atol=0, rtol=0)


def test_dropout_terms_and_gap_streamed_equal_in_memory():
    from dropgeom import dropout
    from dropgeom.streaming import stream_mean

    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).double()
    x, y = torch.randn(N, 5, dtype=torch.float64), torch.randint(0, 3, (N,))
    ref = dropout.terms(net, x, y)
    got = stream_mean(lambda inp, t: dropout.terms(net, inp[0], t), DataLoader(TensorDataset(x, y), batch_size=8))
    for f in ("fisher", "curvature_gaussian", "divergence", "curvature_bernoulli"):
        assert getattr(got, f) == pytest.approx(getattr(ref, f), rel=1e-10, abs=1e-14)
    for layer, d in ref.per_unit.items():
        for k, t in d.items():
            torch.testing.assert_close(got.per_unit[layer][k], t, atol=1e-12, rtol=1e-10)
    g_ref = dropout.gap(net, x, y, p=0.3, method="exact")
    g = stream_mean(lambda inp, t: dropout.gap(net, inp[0], t, p=0.3, method="exact"), x, y, batch_size=10)
    assert g.value == pytest.approx(g_ref.value, rel=1e-10) and g.p == g_ref.p and g.method == "exact"
    # independent MC batch estimates: the standard errors add in quadrature
    gm = stream_mean(
        lambda inp, t: dropout.gap(net, inp[0], t, p=0.3, method="mc", n_samples=200, generator=torch.Generator().manual_seed(0)),
        x,
        y,
        batch_size=10,
    )
    assert 0 < gm.stderr and abs(gm.value - g_ref.value) < 5 * gm.stderr


def test_fisher_chunks_large_tensor_inputs_internally(structure, kind):
    """fisher() on a tensor too large for its chunk budget sums chunks; same result as one pass (same draws for mc)."""
    net = _cnn()
    x, y = _data(net)
    m = ModelManifold(net, x)
    per_input = m.activation_numel() * 4 * 8  # ~4 columns, float64: a budget of ~5 inputs per chunk
    kw = dict(targets=y if kind == "empirical" else None, n_samples=2)
    one = fisher(m, kind, structure, generator=torch.Generator().manual_seed(0), **kw)
    chunked = fisher(m, kind, structure, generator=torch.Generator().manual_seed(0), chunk_bytes=5 * per_input, **kw)
    assert chunked.meta.n == N and chunked.structure == structure
    torch.testing.assert_close(_dense(chunked), _dense(one), atol=1e-10, rtol=1e-10)
    if structure == "implicit":
        torch.testing.assert_close(chunked.diag(), one.diag(), atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="chunk_bytes"):
        fisher(m, kind, structure, chunk_bytes=0, **kw)


@pytest.mark.parametrize("structure", ["diag", "kfac"])
def test_later_batches_are_added_into_the_totals(structure):
    """From the second batch on, the diagonal and KFAC are added into the running totals in place
    (``_fisher.add_sum_into``): with a layer that has no Kronecker rule (LayerNorm: an exact dense block), the
    exact kind equals the in-memory Fisher, and the Monte Carlo kind equals the sum of each batch's own
    ``fisher(..., reduction="sum")`` drawn with that batch's seed (``seed + b``), divided by N."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    x = torch.randn(N, 5, dtype=torch.float64)
    batches = [x[i : i + 10] for i in range(0, N, 10)]  # 10, 10, 10, 7
    ref = fisher(ModelManifold(net, x), "exact", structure)
    got = fisher_streamed(net, batches, structure=structure)
    torch.testing.assert_close(_dense(got), _dense(ref), atol=1e-10, rtol=1e-10)
    mc = fisher_streamed(net, batches, kind="mc", structure=structure, seed=11)
    # batches split into chunks take the operator path instead; the draws (one per batch, seed + b) are the same
    chunked = fisher_streamed(net, batches, kind="mc", structure=structure, seed=11, memory_budget=2000)
    torch.testing.assert_close(_dense(chunked), _dense(mc), atol=1e-12, rtol=1e-10)
    if structure == "diag":
        parts = [
            fisher(ModelManifold(net, b), "mc", "diag", generator=torch.Generator().manual_seed(11 + i), reduction="sum").diag()
            for i, b in enumerate(batches)
        ]
        torch.testing.assert_close(mc.diag(), sum(parts) / N, atol=1e-12, rtol=1e-10)
    else:
        ops = [
            fisher(ModelManifold(net, b), "mc", "kfac", generator=torch.Generator().manual_seed(11 + i), reduction="sum")
            for i, b in enumerate(batches)
        ]
        for j, kb in enumerate(mc.kron_blocks):
            A = sum(op.kron_blocks[j].A * b.shape[0] for op, b in zip(ops, batches)) / N
            B = sum(op.kron_blocks[j].B for op in ops) / N
            torch.testing.assert_close(kb.A, A, atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(kb.B, B, atol=1e-12, rtol=1e-10)
        dense = sum(op.dense_blocks[0][0] for op in ops) / N
        torch.testing.assert_close(mc.dense_blocks[0][0], dense, atol=1e-12, rtol=1e-10)
