"""The model zoo (tests/reference/zoo.py): every architecture against the peers.

* the exact Fisher (dense and diagonal) against curvlinops' GGN, which equals it for
  softmax cross-entropy;
* for rows with dropout, dropgeom's Monte Carlo dropout gap -- which includes every
  dropout site, attention-weight dropout too -- against torch's own train-mode forward
  averaged over as many passes (within 4 standard errors);
* dropgeom leaves the model's training flags and torch's fast-path flag as it found them.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from curvlinops import GGNLinearOperator
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dropgeom import ModelManifold
from dropgeom.curvature import embedding_curvature
from dropgeom.dropout import gap, penalty, terms
from dropgeom._fisher import fisher
from reference.zoo import ZOO, build

DROPOUT_ROWS = [k for k, r in ZOO.items() if r.dropout]


def _ggn(net, x, y):
    params = [p for p in net.parameters() if p.requires_grad]
    op = GGNLinearOperator(net, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    P = sum(p.numel() for p in params)
    torch.backends.mha.set_fastpath_enabled(False)  # curvlinops' jvp cannot go through the fused kernels either
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return torch.as_tensor(op @ torch.eye(P, dtype=torch.float64))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


@pytest.mark.parametrize("name", list(ZOO))
def test_exact_fisher_matches_curvlinops_ggn(name):
    net, x, y = build(name)
    m = ModelManifold(net, x)
    ref = _ggn(net, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # per-sample products batched: no loop fallback
        dense = fisher(m, "exact", "dense").dense()
    torch.testing.assert_close(dense, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fisher(m, "exact", "diag").diag(), torch.diagonal(ref), rtol=1e-9, atol=1e-12)
    assert torch.backends.mha.get_fastpath_enabled()
    assert not any(mod.training for mod in net.modules())


@pytest.mark.parametrize("name", DROPOUT_ROWS)
def test_dropout_gap_matches_torch_train_mode(name):
    net, x, y = build(name)
    draws = 400
    r = gap(net, x, y, method="mc", n_samples=draws, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = F.cross_entropy(net(x), y)
        net.train()
        for mod in net.modules():  # train-mode dropout, eval-mode batch statistics (what dropgeom analyses)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.eval()
        torch.manual_seed(1)
        losses = torch.stack([F.cross_entropy(net(x), y) for _ in range(draws)])
    net.eval()
    ref, se = float(losses.mean() - clean), float(losses.std() / math.sqrt(draws))
    assert abs(r.value - ref) < 4 * math.hypot(se, r.stderr), (r.value, ref, se, r.stderr)
    assert not any(mod.training for mod in net.modules())


def test_transformer_every_quantity_runs_and_restores_flags():
    net, x, y = build("transformer_encoder")
    net.train()
    m = ModelManifold(net, x)
    for structure in ("kfac", "layer", "implicit"):
        assert torch.isfinite(fisher(m, "exact", structure).dense()).all()
    assert math.isfinite(float(embedding_curvature(m, method="dense").gamma2))
    t = terms(net, x, y)
    assert set(t.per_layer) == {"body.dropout", "body.dropout1", "body.dropout2", "body.self_attn"}
    assert all(math.isfinite(v) for v in (t.fisher, t.divergence, t.curvature_gaussian, t.curvature_bernoulli))
    pen = penalty(net, x).value  # every site, attention weights included (no warning)
    expect = sum(0.5 * q / (1 - q) * t.per_layer[k]["fisher"] for k, q in t.p.items())
    assert abs(pen.item() - expect) < 1e-10 * max(1.0, abs(expect))
    pen.backward()
    assert all(mod.training for mod in net.modules())  # restored to what it was
    assert torch.backends.mha.get_fastpath_enabled()
