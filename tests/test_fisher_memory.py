"""Dense requests beyond the memory limit fail early with an error naming the structure
to use instead; the diagonal and KFAC of the same model still work (no P x P or
n x K x P allocation)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dropgeom import ModelManifold
from dropgeom._fisher import fisher


@pytest.fixture
def small_limit(monkeypatch):
    # 128 KiB: every dense [P x P] (P = 2,124) and every per-sample [n, K, P] product is over it
    monkeypatch.setattr("dropgeom._utils.DEFAULT_MEMORY_LIMIT", 128 * 1024)  # memory_guard lives there


def _manifold(norm: bool = False) -> ModelManifold:
    layers = [nn.Linear(40, 48), nn.Tanh()] + ([nn.LayerNorm(48)] if norm else []) + [nn.Linear(48, 4)]
    return ModelManifold(nn.Sequential(*layers).double(), torch.randn(30, 40, dtype=torch.float64))


def test_dense_and_layer_requests_name_the_alternative(small_limit):
    m = _manifold()
    with pytest.raises(MemoryError, match=r"dense Fisher \[2164 x 2164\].*structure='diag', 'kfac' or 'implicit'"):
        fisher(m, "exact", "dense")
    with pytest.raises(MemoryError, match=r"layer block \[1968 x 1968\] for module '0'.*'kfac'"):
        fisher(m, "exact", "layer")
    with pytest.raises(MemoryError, match="implicit"):
        fisher(m, "exact", "implicit").dense()


def test_diag_and_kfac_fit_where_dense_does_not(small_limit):
    m = _manifold()
    d = fisher(m, "exact", "diag").diag()
    K = fisher(m, "exact", "kfac")
    assert d.shape == (m.num_params,) and torch.isfinite(d).all()
    assert torch.isfinite(K.diag()).all() and not K.dense_blocks


def test_generic_path_block_too_large_names_the_alternative(small_limit):
    m = _manifold(norm=True)  # LayerNorm has no Kronecker rule: an exact block, small here
    assert fisher(m, "exact", "kfac").dense_blocks
    with pytest.raises(MemoryError, match="per-sample products.*structure='diag', 'kfac' or 'implicit'"):
        m.per_sample_vjp(torch.ones(m.n, m.num_outputs, m.num_outputs, dtype=torch.float64))


def test_bad_requests_name_the_problem():
    m = _manifold()
    with pytest.raises(ValueError, match="needs observed labels: pass targets="):
        fisher(m, "empirical", "diag")
    with pytest.raises(ValueError, match="unknown structure 'blockwise'"):
        fisher(m, "exact", "blockwise")
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        fisher(m, "mc", "diag", n_samples=0)
    x = torch.randn(30, 40, dtype=torch.float64)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ModelManifold(nn.Linear(40, 4).double(), x)


def test_diag_and_kfac_do_not_import_sympy():
    """The rule path back-propagates <eta, S_r> rather than passing grad_outputs=S_r, whose shape check imports
    sympy (through torch.fx's symbolic shapes: ~50 MiB resident and ~0.3 s, once per process). Checked in a fresh
    interpreter: fails if the engine passes a grad_outputs tensor again (or imports sympy some other way)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from dropgeom import ModelManifold, fisher\n"
        "assert 'sympy' not in sys.modules, 'imported by dropgeom itself'\n"
        "nets = [(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), torch.randn(5, 8)),\n"
        "        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)), torch.randn(5, 1, 4, 4))]\n"
        "for net, x in nets:\n"
        "    m = ModelManifold(net, x)\n"
        "    for kind in ('exact', 'mc', 'empirical'):\n"
        "        kw = {'targets': torch.randint(0, 3, (5,))} if kind == 'empirical' else {}\n"
        "        fisher(m, kind, 'diag', **kw).diag(); fisher(m, kind, 'kfac', **kw).diag()\n"
        "        assert 'sympy' not in sys.modules, (net, kind)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("conv", [False, True])
def test_layer_outputs_are_not_kept_while_columns_are_back_propagated(conv):
    """The engine back-propagates to the layer outputs' gradient edges, not to the output tensors: a hidden layer's
    output that the graph does not save (ReLU saves its result, not its input) is freed once the forward is done,
    and the columns are still those of ``capture`` (which stacks them all). Fails if the records keep the outputs."""
    import gc
    import weakref

    from dropgeom._capture import capture, capture_columns, rule_layers

    torch.manual_seed(0)
    if conv:
        net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)).double()
        x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    else:
        net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4)).double()
        x = torch.randn(6, 5, dtype=torch.float64)
    m = ModelManifold(net, x)
    layers = rule_layers(m)
    S = torch.randn(6, 4, 3, dtype=torch.float64)
    refs = []
    handle = net[0].register_forward_hook(lambda mod, inp, out: refs.append(weakref.ref(out)))
    try:
        _, columns, _ = capture_columns(m, layers, S)
        gc.collect()
        assert refs and refs[-1]() is None, "the first layer's output is still alive during the backward passes"
        got = [c["0"] for c in columns]
    finally:
        handle.remove()
    _, g_all = capture(m, layers, S)["0"]
    assert len(got) == 3
    for r, g in enumerate(got):
        torch.testing.assert_close(g[0], g_all[r], rtol=0, atol=0)


def test_one_back_propagated_column_is_alive_at_a_time(monkeypatch):
    """The column generators drop their references before the next backward: once the consumer lets go of column
    ``r``, the gradients autograd returned for it are gone while column ``r + 1`` is computed (each column of a
    hidden layer is as large as its activation). Fails if a generator's locals keep the previous column."""
    import gc
    import weakref

    from dropgeom._capture import capture_columns, rule_layers

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 4)).double()
    m = ModelManifold(net, torch.randn(6, 5, dtype=torch.float64))
    S = torch.randn(6, 4, 3, dtype=torch.float64)
    calls = []
    grad = torch.autograd.grad

    alive_at_start = []

    def recording_grad(*args, **kwargs):
        gc.collect()
        alive_at_start.append(sum(ref() is not None for refs in calls for ref in refs))
        out = grad(*args, **kwargs)
        calls.append([weakref.ref(t) for t in out if t is not None])
        return out

    monkeypatch.setattr(torch.autograd, "grad", recording_grad)
    _, columns, _ = capture_columns(m, rule_layers(m), S)
    column = next(columns)
    del column
    second = next(columns)
    assert sorted(second) == ["0", "2", "4"] and len(calls) == 2 and len(calls[0]) == 2
    assert alive_at_start == [0, 0], "column 0's gradients were alive during column 1's backward"
    assert all(ref() is not None for ref in calls[1])  # the probe sees live columns
