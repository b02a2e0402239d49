"""The stochastic embedding-curvature estimator off the dense path (theory.md section 3): the tangent-space linear
algebra of :mod:`dropgeom.curvature._tangent` against dense references.

Models beyond :func:`~dropgeom.curvature.dense.dense_projection_fits` used conjugate gradients on the normal
equations ``g = J^T S S^T J``; on a badly conditioned ``g`` they stopped short and the estimate sat 6 and 15 standard
errors above the dense value (tanh MLPs 4-16-3 and 4-32-3 on 64 inputs, damping 1e-2, 256 samples). The tests force
that path with ``monkeypatch`` on models small enough for a dense reference.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dropgeom import ModelManifold, embedding_curvature
from dropgeom.curvature import _tangent, embedding
from dropgeom.curvature._common import LinearisedManifold, ProjectionWarning, whiten, whitening

D64 = torch.float64


def tanh_mlps(widths=(4, 8, 16, 32), n: int = 64, d: int = 4, k: int = 3) -> dict:
    """The models of the measurement in docs/benchmarks.md (one seed, built in this order)."""
    torch.manual_seed(0)
    out = {}
    for width in widths:
        net = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, k)).double()
        out[width] = ModelManifold(net, torch.randn(n, d, dtype=D64), "categorical")
    return out


def stochastic(m: ModelManifold, **kw):
    return embedding_curvature(
        m, method="stochastic", n_samples=256, generator=torch.Generator().manual_seed(0), batch_size=64, **kw
    )


def test_matrix_free_estimate_agrees_with_dense_on_a_badly_conditioned_metric(monkeypatch):
    """Off the dense path (forced), the damped estimate agrees with the dense value within 4 standard errors. With
    conjugate gradients it sat 6 (width 16) and 15 (width 32) standard errors high. At width 32 ``S^T J`` has full
    rank ``n (K - 1)``: the normal space is empty, gamma^2 = 0, and any tangent remainder shows at once."""
    monkeypatch.setattr(embedding, "dense_projection_fits", lambda manifold: False)
    models = tanh_mlps()
    for width in (16, 32):
        m = models[width]
        exact = embedding_curvature(m, damping=1e-2).gamma2.item()
        with warnings.catch_warnings():
            warnings.simplefilter("error", ProjectionWarning)
            est = stochastic(m, damping=1e-2)
        assert est.solver == "gram"
        assert est.projection_residual is not None and est.projection_residual <= 1e-6
        # + 1e-12: at width 32 both values are rounding noise (~1e-26 dense); conjugate gradients gave 3.4e-5
        assert abs(est.gamma2.item() - exact) < 4 * est.stderr.item() + 1e-12, (width, est.gamma2.item(), exact)


def rank_deficient(n: int = 7, K: int = 2, P: int = 11, rank: int = 6) -> tuple:
    """A linear manifold ``eta = A theta`` (Gaussian, unit variance) with ``A`` of rank ``rank < min(nK, P)`` and
    singular values from 1 to 1e-3, and its whitened Jacobian as a dense matrix."""
    g = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(n * K, rank, generator=g, dtype=D64))[0]
    V = torch.linalg.qr(torch.randn(P, rank, generator=g, dtype=D64))[0]
    A = U @ torch.diag(torch.logspace(0, -3, rank, dtype=D64)) @ V.T
    m = ModelManifold.from_function(lambda th: (A @ th).reshape(n, K), torch.randn(P, generator=g, dtype=D64), "gaussian")
    _, S, _ = whitening(m)
    jw = whiten(S, m.jacobian().permute(2, 0, 1)).permute(1, 2, 0).reshape(-1, P)
    return m, S, jw


def test_gram_solver_matches_a_dense_projection_and_solve():
    """The Gram projection and sampling solves against dense linear algebra on a rank-deficient ``S^T J``
    (float64): ``(I - Pi) y`` with ``Pi`` from ``pinv``, ``(g + lambda I)^{-1} b``, ``g^+ A^T z`` and
    ``lambda_max(g)``."""
    m, S, jw = rank_deficient()
    n, R, P = m.n, S.shape[-1], m.num_params
    lin = LinearisedManifold(m)
    tangent = _tangent.GramTangent(lin, S, 1e-12, 2 * P + 100, n)
    assert torch.linalg.matrix_rank(jw) == 6 < min(jw.shape)
    g = torch.Generator().manual_seed(4)
    Y = torch.randn(5, n, R, generator=g, dtype=D64)
    pi = jw @ torch.linalg.pinv(jw)
    want = Y.reshape(5, -1) - Y.reshape(5, -1) @ pi
    torch.testing.assert_close(tangent.normal(Y).reshape(5, -1), want, rtol=0, atol=1e-10)
    assert tangent.residual <= 1e-6
    z, zp, lam = torch.randn(3, n, R, generator=g, dtype=D64), torch.randn(P, 3, generator=g, dtype=D64), 0.05
    gm = jw.T @ jw
    b = jw.T @ z.reshape(3, -1).T
    damped = torch.linalg.solve(gm + lam * torch.eye(P, dtype=D64), b + lam**0.5 * zp)
    torch.testing.assert_close(tangent.sample(z, zp, lam), damped, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(tangent.sample(z, None, 0.0), torch.linalg.pinv(gm) @ b, rtol=1e-7, atol=1e-8)
    assert tangent.top() == pytest.approx(float(torch.linalg.matrix_norm(jw, 2)) ** 2, rel=1e-12)


def test_a_float32_model_off_the_dense_path_is_estimated_in_float64(monkeypatch):
    """The Gram matrix squares the condition number: in float32 the estimate was 26.3 against the dense 0.544 on the
    4-16-3 tanh MLP, with no warning. Off the dense path a float32 model now runs on a float64 copy."""
    monkeypatch.setattr(embedding, "dense_projection_fits", lambda manifold: False)
    m64 = tanh_mlps(widths=(4, 8, 16))[16]
    exact = embedding._dense(m64, 1.0, 1e-2).gamma2.item()
    m32 = ModelManifold(m64.model.float(), m64.inputs[0].float(), "categorical")
    est = stochastic(m32, damping=1e-2)
    assert est.solver == "gram" and est.gamma2.dtype == torch.float64
    assert abs(est.gamma2.item() - exact) < 4 * est.stderr.item(), (est.gamma2.item(), exact)
    assert next(m32.model.parameters()).dtype == torch.float32  # the caller's model is untouched


def test_streamed_estimate_agrees_with_dense_on_a_badly_conditioned_metric():
    """Over batches (a ``StreamedManifold``), the damped estimate of the 4-16-3 tanh MLP agrees with the dense value
    within 4 standard errors, with the same draws as in memory. The streamed path used conjugate gradients whatever
    the size: 6 standard errors high, with a ``ProjectionWarning``, in about 100 s; now the Gram solver
    (``nR = 64 x 3 <= MAX_GRAM_ROWS``)."""
    from dropgeom import StreamedManifold

    m = tanh_mlps(widths=(4, 8, 16))[16]
    x = m.inputs[0]
    exact = embedding_curvature(m, damping=1e-2).gamma2.item()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProjectionWarning)
        est = stochastic(StreamedManifold(m.model, [x[:16], x[16:40], x[40:]], "categorical"), damping=1e-2)
    assert est.solver == "gram"
    assert est.projection_residual is not None and est.projection_residual <= 1e-6
    assert abs(est.gamma2.item() - exact) < 4 * est.stderr.item(), (est.gamma2.item(), exact, est.stderr.item())
