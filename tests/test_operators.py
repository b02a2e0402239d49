"""Every curvature operator against its own dense matrix (float64).

Each operator is built from random factors; its dense reference is assembled
here independently (Kronecker products via ``torch.kron`` and an explicit
index map, block matrices by scattering), then ``mv``, ``diag``, ``trace``,
``dense``, ``eig`` and ``solve`` (with and without damping) are checked against
``torch.linalg`` on that matrix.
"""

from __future__ import annotations

from typing import Callable, Tuple

import pytest
import torch

from dropgeom.operators import (
    BlockDiagonalOperator,
    CurvatureOperator,
    DenseOperator,
    DiagonalOperator,
    ImplicitOperator,
    KFACOperator,
    KroneckerBlock,
    conjugate_gradient,
    top_eigenpairs,
)

DT = torch.float64


def _spd(k: int, jitter: float = 0.1) -> torch.Tensor:
    a = torch.randn(k, k + 2, dtype=DT)
    return a @ a.T / k + jitter * torch.eye(k, dtype=DT)


def _dense_case() -> Tuple[CurvatureOperator, torch.Tensor]:
    M = _spd(9)
    return DenseOperator(M, kind="exact", structure="dense"), M


def _diag_case() -> Tuple[CurvatureOperator, torch.Tensor]:
    d = torch.rand(9, dtype=DT) + 0.1
    return DiagonalOperator(d, structure="diag"), torch.diag(d)


def _block_case() -> Tuple[CurvatureOperator, torch.Tensor]:
    perm = torch.randperm(10)
    index = [perm[:3], perm[3:7], perm[7:]]
    blocks = [_spd(len(i)) for i in index]
    M = torch.zeros(10, 10, dtype=DT)
    for blk, idx in zip(blocks, index):
        M[idx[:, None], idx[None, :]] = blk
    return BlockDiagonalOperator(blocks, index, 10, names=["a", "b", "c"]), M


def _kfac_case(slices: bool = False) -> Tuple[CurvatureOperator, torch.Tensor]:
    """Two Kronecker layers (one with bias, one without) and one dense block, scattered over P = 25; with
    ``slices``, the layers occupy contiguous ranges given as slices (as the Fisher engine builds them)."""
    P = 25
    perm = torch.arange(P) if slices else torch.randperm(P)
    out1, in1 = 3, 2  # with bias: 6 weight + 3 bias entries, A is 3 x 3
    out2, in2 = 2, 4  # no bias: 8 weight entries
    w1, b1, w2, rest = perm[:6], perm[6:9], perm[9:17], perm[17:]
    A1, B1, A2, B2 = _spd(in1 + 1), _spd(out1), _spd(in2), _spd(out2)
    C = _spd(len(rest))
    idx = (slice(0, 6), slice(6, 9), slice(9, 17)) if slices else (w1, b1, w2)
    blocks = [
        KroneckerBlock(A=A1, B=B1, weight_index=idx[0], bias_index=idx[1], name="l1"),
        KroneckerBlock(A=A2, B=B2, weight_index=idx[2], bias_index=None, name="l2"),
    ]
    M = torch.zeros(P, P, dtype=DT)
    # vec of [W | b] (row-major, [out, in(+1)]) -> flat indices
    joint1 = torch.stack([torch.cat([w1.reshape(out1, in1)[o], b1[o : o + 1]]) for o in range(out1)]).reshape(-1)
    M[joint1[:, None], joint1[None, :]] = torch.kron(B1, A1)
    M[w2[:, None], w2[None, :]] = torch.kron(B2, A2)
    M[rest[:, None], rest[None, :]] = C
    return KFACOperator(blocks, [(C, rest)], P, DT, torch.device("cpu"), kind="exact", structure="kfac"), M


def _implicit_case(with_diag: bool) -> Callable[[], Tuple[CurvatureOperator, torch.Tensor]]:
    def make() -> Tuple[CurvatureOperator, torch.Tensor]:
        M = _spd(8)
        diag_fn = (lambda: M.diagonal().clone()) if with_diag else None
        return ImplicitOperator(lambda V: M @ V, 8, DT, torch.device("cpu"), diag_fn=diag_fn), M

    return make


CASES = {
    "dense": _dense_case,
    "diag": _diag_case,
    "block": _block_case,
    "kfac": _kfac_case,
    "kfac-slices": lambda: _kfac_case(slices=True),
    "implicit": _implicit_case(False),
    "implicit+diag": _implicit_case(True),
}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max().clamp_min(1.0))), float((a - b).abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_products_diag_trace_dense(case):
    op, M = CASES[case]()
    P = M.shape[0]
    assert op.shape == (P, P)
    v = torch.randn(P, dtype=DT)
    V = torch.randn(P, 3, dtype=DT)
    _close(op.mv(v), M @ v)
    _close(op @ V, M @ V)
    _close(op.diag(), M.diagonal())
    _close(op.trace(), M.trace())
    _close(op.dense(), M)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [1, 3])
def test_eig_top_k(case, k):
    op, M = CASES[case]()
    vals, vecs = op.eig(k)
    ref = torch.linalg.eigvalsh(M).flip(0)[:k]
    _close(vals, ref, 1e-9)
    assert vecs.shape == (M.shape[0], k)
    _close(M @ vecs, vecs * vals, 1e-8)  # eigenvectors of the dense matrix
    _close(vecs.T @ vecs, torch.eye(k, dtype=DT), 1e-8)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_solve_with_damping(case, damping):
    op, M = CASES[case]()
    P = M.shape[0]
    b = torch.randn(P, dtype=DT)
    B = torch.randn(P, 2, dtype=DT)
    Md = M + damping * torch.eye(P, dtype=DT)
    _close(op.solve(b, damping=damping), torch.linalg.solve(Md, b), 1e-7)
    _close(op.solve(B, damping=damping), torch.linalg.solve(Md, B), 1e-7)


def test_kfac_eig_and_solve_use_the_kronecker_structure():
    """Kronecker eigenpairs are products of the factors' eigenpairs; the damped
    solve inverts ``B (x) A + lambda I`` exactly (not ``(B + .) (x) (A + .)``)."""
    A, B = _spd(3), _spd(2)
    w = torch.arange(6)
    op = KFACOperator([KroneckerBlock(A=A, B=B, weight_index=w, bias_index=None)], [], 6, DT, torch.device("cpu"))
    M = torch.kron(B, A)
    wa, wb = torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(B)
    _close(op.eig(6)[0], torch.outer(wb, wa).reshape(-1).sort(descending=True).values)
    x = torch.randn(6, dtype=DT)
    _close(op.solve(M @ x + 0.5 * x, damping=0.5), x, 1e-9)


def test_eig_large_operator_uses_lanczos():
    P = 2100  # beyond the dense-eigh threshold
    d = torch.rand(P, dtype=DT)
    d[:3] = torch.tensor([5.0, 4.0, 3.0], dtype=DT)
    op = ImplicitOperator(lambda V: d[:, None] * V, P, DT, torch.device("cpu"))
    vals, vecs = op.eig(3)
    _close(vals, torch.tensor([5.0, 4.0, 3.0], dtype=DT), 1e-7)
    _close(vecs.abs()[:3], torch.eye(3, dtype=DT), 1e-6)


def test_conjugate_gradient_solves_spd_systems():
    M = _spd(12)
    b = torch.randn(12, 2, dtype=DT)
    _close(conjugate_gradient(lambda V: M @ V, b, tol=1e-12), torch.linalg.solve(M, b), 1e-8)


def test_solver_argument_errors():
    M = _spd(3)
    with pytest.raises(ValueError, match="max_iter must be None or an int >= 0"):  # returned zeros before
        conjugate_gradient(lambda V: M @ V, torch.ones(3, dtype=DT), max_iter=-1)
    with pytest.raises(ValueError, match=r"b must be a vector \[P\] or a matrix \[P, m\]"):  # an IndexError before
        conjugate_gradient(lambda V: M @ V, torch.tensor(1.0, dtype=DT))
    for k in (0, -1, 4):  # k = -1 gave two eigenpairs, k = 4 three
        with pytest.raises(ValueError, match=r"k must be an int in \[1, m=3\]"):
            top_eigenpairs(M, k)
    with pytest.raises(ValueError, match="square"):
        top_eigenpairs(M[:, :2], 1)


def test_diagonal_solve_pseudo_inverse_on_zero_entries():
    op = DiagonalOperator(torch.tensor([2.0, 0.0], dtype=DT))
    _close(op.solve(torch.tensor([4.0, 1.0], dtype=DT)), torch.tensor([2.0, 0.0], dtype=DT))


def test_metadata_is_recorded():
    op = DiagonalOperator(torch.ones(3, dtype=DT), kind="mc", structure="diag", reduction="sum", n=7)
    assert (op.kind, op.structure, op.reduction) == ("mc", "diag", "sum")
    assert "kind='mc'" in repr(op) and "reduction='sum'" in repr(op)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_shape_and_argument_errors(case):
    op, M = CASES[case]()
    P = M.shape[0]
    with pytest.raises(ValueError, match="P="):
        op.mv(torch.ones(P + 1, dtype=DT))
    with pytest.raises(ValueError, match="P="):
        op.mv(torch.ones(P, 2, 2, dtype=DT))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping"):
            op.solve(torch.ones(P, dtype=DT), damping=bad)
    for k in (0, P + 1):
        with pytest.raises(ValueError, match="k must lie"):
            op.eig(k)


def test_constructor_errors():
    with pytest.raises(ValueError, match="square"):
        DenseOperator(torch.ones(2, 3, dtype=DT))
    with pytest.raises(ValueError, match="1-D"):
        DiagonalOperator(torch.ones(2, 2, dtype=DT))
    with pytest.raises(ValueError, match="one index set per block"):
        BlockDiagonalOperator([torch.eye(2, dtype=DT)], [], 2)


def test_dense_request_too_large_names_the_alternative():
    op = ImplicitOperator(lambda V: V, 4096, DT, torch.device("cpu"))
    with pytest.raises(MemoryError, match="implicit"):
        op.dense(memory_limit=1024)


def test_block_index_sets_must_partition():
    blk = torch.eye(2, dtype=DT)
    with pytest.raises(ValueError, match="partition"):
        BlockDiagonalOperator([blk, blk], [torch.tensor([0, 1]), torch.tensor([1, 2])], 4)
    with pytest.raises(ValueError, match="block 0 has shape"):
        BlockDiagonalOperator([blk], [torch.tensor([0, 1, 2])], 3)


def test_diagonal_dense_is_size_checked():
    op = DiagonalOperator(torch.ones(100, dtype=DT))
    with pytest.raises(MemoryError, match="diag"):
        op.dense(memory_limit=1000)
    _close(op.dense(), torch.eye(100, dtype=DT))


def test_kronecker_block_rejects_other_indices():
    A, B = _spd(2), _spd(2)
    with pytest.raises(TypeError, match="weight_index must be a slice or a 1-D long tensor"):
        KroneckerBlock(A=A, B=B, weight_index=[0, 1, 2, 3], bias_index=None)
    with pytest.raises(TypeError, match="bias_index must be a slice or a 1-D long tensor"):
        KroneckerBlock(A=A, B=B, weight_index=slice(0, 4), bias_index=torch.tensor([4.0, 5.0]))


@pytest.mark.parametrize("case", ["dense", "diag", "block", "kfac", "kfac-slices"])
def test_layout_and_parts_rebuild_the_sum_of_two_operators(case):
    """Summing parts in place (``sum_parts``) and rebuilding from a layout (no matrices kept) gives the operator of
    the union: for the mean over 3 + 5 inputs, ``(3 F_a + 5 F_b) / 8`` for dense, diagonal and block operators
    (their parts are sums), and for KFAC the count-weighted mean of the input factors."""
    from dropgeom.operator_parts import operator_from_parts, operator_layout, sum_parts

    torch.manual_seed(0)
    op_a, M_a = CASES[case]()
    M_a = M_a.clone()  # a dense operator holds M_a itself, and its matrix becomes the running total
    torch.manual_seed(0 if case in ("block", "kfac") else 1)  # random index layouts must agree for a sum
    op_b, M_b = CASES[case]()
    if case.startswith("kfac"):
        kb_a, kb_b = op_a.kron_blocks, op_b.kron_blocks
        expect_A = [(3 * a.A + 5 * b.A) / 8 for a, b in zip(kb_a, kb_b)]
        expect_B = [(a.B + b.B) / 8 for a, b in zip(kb_a, kb_b)]
    layout = operator_layout(op_a)
    B_before = [kb.B.clone() for kb in op_b.kron_blocks] if case.startswith("kfac") else None
    total = sum_parts(None, op_a, 3)
    total = sum_parts(total, op_b, 5)
    out = operator_from_parts(layout, total, count=8, scale=1 / 8, reduction="mean")
    assert type(out) is type(op_a) and out.meta.n == 8 and out.reduction == "mean"
    if case.startswith("kfac"):
        for kb, A, B in zip(out.kron_blocks, expect_A, expect_B):
            _close(kb.A, A)
            _close(kb.B, B)
        assert all(torch.equal(kb.B, b0) for kb, b0 in zip(op_b.kron_blocks, B_before))  # only the first is reused
    else:
        _close(out.dense(), (M_a + M_b) / 8)


@pytest.mark.parametrize("case", ["block", "kfac"])
def test_operator_from_parts_refuses_a_wrong_count_or_number_of_parts(case):
    from dropgeom.operator_parts import operator_from_parts, operator_layout, operator_parts

    torch.manual_seed(0)
    op, _ = CASES[case]()
    parts = operator_parts(op, 3)
    with pytest.raises(ValueError, match=f"a {type(op).__name__} layout takes {len(parts)} parts, got {len(parts) - 1}"):
        operator_from_parts(op, parts[:-1], count=3, scale=1.0)  # KFAC silently left a block out before
    with pytest.raises(ValueError, match="count .* must be a positive int, got 0"):  # inf input factors before
        operator_from_parts(operator_layout(op), parts, count=0, scale=1.0)
    with pytest.raises(TypeError, match="template must be a curvature operator or an OperatorLayout"):
        operator_from_parts(parts[0], parts, count=3, scale=1.0)  # an AttributeError before
