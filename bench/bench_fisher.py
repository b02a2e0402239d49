"""Fisher engine speed and memory against BackPACK, nngeometry, curvlinops and ASDL.

Configurations (issue 2): a small CNN on the 8x8 digits, (a) MLP 64-256-256-10 on sklearn digits
(standardised) at batch 256 and (full mode only) at all 1,797 samples, (b) MLP 784-1024-1024-10
on synthetic inputs at batch 256, (c) logistic regression 784->10 at batch 256.
Float32, ReLU, cross-entropy (categorical family).

For each configuration and quantity (exact diag, MC diag, empirical diag,
trace, KFAC) the table gives the median time of every library that computes
it (dropgeom: ``fisher()`` on a built manifold; ``+manifold`` adds building the
manifold, i.e. one more forward pass and the input checks), as a ratio to one forward+backward pass of the same model on the same
batch measured in the same run (``x fwd+bwd``), and dropgeom's ratio to the
fastest peer (``vs peer``). ``disagree`` is the largest relative difference
``max|a - b| / max|b|`` between libraries computing the same quantity (MC
estimates draw different labels and are not compared). Peak memory: the
largest extra resident memory while dropgeom computes the quantity.

What each peer computes, in our convention (mean over inputs):
  exact diag   BackPACK DiagGGNExact (CrossEntropyLoss mean), nngeometry FIM(PMatDiag),
               ASDL FisherMaker(FISHER_EXACT, SHAPE_DIAG)
  mc diag      BackPACK DiagGGNMC (1 sample), nngeometry FIM_MonteCarlo(PMatDiag, trials=1),
               ASDL FISHER_MC (1 sample)
  empirical    BackPACK SumGradSquared with CrossEntropyLoss(reduction="sum"), divided by n; ASDL FISHER_EMP
  trace        sum of the peers' exact diagonals (nngeometry: PMatDiag.trace())
  kfac         BackPACK KFLR, nngeometry FIM(PMatKFAC), curvlinops KFACLinearOperator(type-2),
               ASDL SHAPE_KRON (FISHER_EXACT)
  implicit mv  exact Fisher times 16 columns (operator built in the call): curvlinops GGNLinearOperator
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn

from common import asdl_fisher, forward_backward, peak_memory, print_table

from dropgeom import ModelManifold, fisher


def _mlp(widths: List[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _digits() -> Tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X - X.mean(0)) / (X.std(0) + 1e-8)
    return torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def configurations(quick: bool) -> List[Tuple[str, nn.Module, Tensor, Tensor]]:
    torch.manual_seed(0)
    X, y = _digits()
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(256, 784, generator=g)
    ys = torch.randint(0, 10, (256,), generator=g)
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 10),
    )
    return [
        ("digits CNN conv16-conv16-maxpool-linear, n=256", cnn, X[:256].reshape(256, 1, 8, 8), y[:256]),
        ("digits MLP 64-256-256-10, n=256", _mlp([64, 256, 256, 10]), X[:256], y[:256]),
        *([] if quick else [("digits MLP 64-256-256-10, n=1797", _mlp([64, 256, 256, 10]), X, y)]),
        ("MLP 784-1024-1024-10, n=256", _mlp([784, 1024, 1024, 10]), xs, ys),
        ("logreg 784->10, n=256", _mlp([784, 10]), xs, ys),
    ]


# ---------------------------------------------------------------------------
# one closure per (quantity, library); each returns something comparable
# ---------------------------------------------------------------------------


def _ours(model: nn.Module, x: Tensor, y: Tensor) -> Dict[str, Callable[[], object]]:
    m = ModelManifold(model, x, "categorical")
    gen = torch.Generator().manual_seed(1)
    return {
        "exact diag": lambda: fisher(m, "exact", "diag").diag(),
        "mc diag": lambda: fisher(m, "mc", "diag", generator=gen).diag(),
        "empirical diag": lambda: fisher(m, "empirical", "diag", targets=y).diag(),
        "trace": lambda: fisher(m, "exact", "diag").trace(),
        "kfac": lambda: fisher(m, "exact", "kfac"),
        "implicit mv x16": lambda: fisher(m, "exact", "implicit").mv(_columns(m.num_params, x.dtype)),
    }


def _columns(P: int, dtype: torch.dtype) -> Tensor:
    return torch.randn(P, 16, generator=torch.Generator().manual_seed(4), dtype=dtype)


def _backpack(model: nn.Module, x: Tensor, y: Tensor) -> Dict[str, Callable[[], object]]:
    from backpack import backpack, extend
    from backpack.extensions import KFLR, DiagGGNExact, DiagGGNMC, SumGradSquared

    net = extend(copy.deepcopy(model))
    ce_mean = extend(nn.CrossEntropyLoss())
    ce_sum = extend(nn.CrossEntropyLoss(reduction="sum"))
    params = list(net.parameters())

    def run(ext, attr: str, loss_fn, scale: float = 1.0) -> Callable[[], object]:
        def go() -> object:
            loss = loss_fn(net(x), y)
            with backpack(ext):
                loss.backward()
            out = [getattr(p, attr) for p in params]
            for p in params:
                p.grad = None
            if attr == "kflr":
                return out
            return torch.cat([o.reshape(-1) for o in out]) * scale

        return go

    diag = run(DiagGGNExact(), "diag_ggn_exact", ce_mean)
    return {
        "exact diag": diag,
        "mc diag": run(DiagGGNMC(mc_samples=1), "diag_ggn_mc", ce_mean),
        "empirical diag": run(SumGradSquared(), "sum_grad_squared", ce_sum, 1.0 / x.shape[0]),
        "trace": lambda: diag().sum(),
        "kfac": run(KFLR(), "kflr", ce_mean),
    }


def _nngeometry(model: nn.Module, x: Tensor, y: Tensor) -> Dict[str, Callable[[], object]]:
    from nngeometry.metrics import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatDiag, PMatKFAC
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    net = copy.deepcopy(model)
    return {
        "exact diag": lambda: FIM(net, loader, PMatDiag, variant="classif_logits").get_diag(),
        "mc diag": lambda: FIM_MonteCarlo(net, loader, PMatDiag, variant="classif_logits").get_diag(),
        "trace": lambda: FIM(net, loader, PMatDiag, variant="classif_logits").trace(),
        "kfac": lambda: FIM(net, loader, PMatKFAC, variant="classif_logits"),
    }


def _curvlinops(model: nn.Module, x: Tensor, y: Tensor) -> Dict[str, Callable[[], object]]:
    from curvlinops import GGNLinearOperator, KFACLinearOperator

    net = copy.deepcopy(model)
    params = list(net.parameters())

    def kfac() -> object:
        op = KFACLinearOperator(
            net,
            nn.CrossEntropyLoss(),
            params,
            [(x, y)],
            fisher_type="type-2",
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        op.compute_kronecker_factors()
        return op

    def ggn_mv() -> Tensor:
        op = GGNLinearOperator(net, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
        return op @ _columns(sum(p.numel() for p in params), x.dtype)

    return {"kfac": kfac, "implicit mv x16": ggn_mv}


def _asdl(model: nn.Module, x: Tensor, y: Tensor) -> Dict[str, Callable[[], object]]:
    """ASDL (PyPI ``asdfghjkl``): a ``FisherMaker`` per quantity, built once, each on its own model copy
    (:func:`common.asdl_fisher`); the timed call is ``forward_and_backward`` plus collecting the result."""
    import asdl

    def maker(fisher_type: str, shape: str) -> Callable[[], object]:
        run = asdl_fisher(model, [(x, y)], fisher_type, shape, x.shape[0])

        def go() -> object:
            mods = run()
            if shape == asdl.SHAPE_KRON:
                return [(m.fisher.kron.B, m.fisher.kron.A) for m in mods]
            return torch.cat([torch.cat([m.fisher.diag.weight.reshape(-1), m.fisher.diag.bias.reshape(-1)]) for m in mods])

        return go

    diag = maker(asdl.FISHER_EXACT, asdl.SHAPE_DIAG)
    return {
        "exact diag": diag,
        "mc diag": maker(asdl.FISHER_MC, asdl.SHAPE_DIAG),
        "empirical diag": maker(asdl.FISHER_EMP, asdl.SHAPE_DIAG),
        "trace": lambda: diag().sum(),
        "kfac": maker(asdl.FISHER_EXACT, asdl.SHAPE_KRON),
    }


# ---------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _disagreement(quantity: str, results: Dict[str, object], model: nn.Module) -> float:
    ours = results.get("dropgeom")
    worst = 0.0
    if quantity in ("exact diag", "empirical diag", "trace", "implicit mv x16"):
        for lib, r in results.items():
            if lib != "dropgeom" and r is not None:
                worst = max(worst, _rel(torch.as_tensor(r), torch.as_tensor(ours)))
    elif quantity == "kfac":
        v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(3))
        ref = ours.mv(v)
        if results.get("curvlinops") is not None:
            op = results["curvlinops"]
            worst = max(worst, _rel(op @ v, ref))
        # conv layers: BackPACK's and nngeometry's KFC factors differ from the "expand" KFC by
        # documented factors (tests/test_fisher_peers.py); compare those models with curvlinops only
        conv = any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in model.modules())
        if results.get("nngeometry") is not None and not conv:
            worst = max(worst, _rel(results["nngeometry"].get_diag(), ours.diag()))
        if results.get("backpack") is not None and not conv:
            # Linear layers: BackPACK's weight block is B (x) A_xx, ours B (x) A[:-1, :-1].
            for kb, (B, A) in zip(ours.kron_blocks, results["backpack"][0::2]):
                worst = max(worst, _rel(B, kb.B), _rel(A, kb.A[:-1, :-1]))
        if results.get("asdl") is not None:  # ASDL's weight factors: (B, A[:-1, :-1]) of ours, Conv2d too
            for kb, (B, A) in zip(ours.kron_blocks, results["asdl"]):
                worst = max(worst, _rel(B, kb.B), _rel(A, kb.A[:-1, :-1]))
    return worst


QUANTITIES = ["exact diag", "mc diag", "empirical diag", "trace", "kfac", "implicit mv x16"]
PEERS = {"backpack": _backpack, "nngeometry": _nngeometry, "curvlinops": _curvlinops, "asdl": _asdl}


def _interleaved(
    fns: Dict[str, Callable[[], object]], first: Dict[str, float], repeat: int, window: float, budget: float
) -> Tuple[Dict[str, float], int]:
    """Median seconds per call of each closure, timed round-robin (one window of each
    per round) so that load from other processes hits every library alike. A window
    runs a closure ``k`` times back to back (``k`` calibrated from ``first``, the time of
    its warm-up call, so it lasts about ``window`` seconds), which smooths scheduler
    jitter on millisecond calls. At most ``repeat`` rounds; after 3, stop once ``budget``
    seconds are spent (the big MLP's slow quantities get 3 rounds; ``--quick`` takes 2). Returns the medians
    and the number of rounds."""
    reps = {k: max(1, min(50, int(window / max(first.get(k, window), 1e-6)))) for k in fns}
    times: Dict[str, List[float]] = {k: [] for k in fns}
    t_start = time.perf_counter()
    rounds = 0
    while rounds < repeat and (rounds < min(3, repeat) or time.perf_counter() - t_start < budget):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[k]):
                fn()
            times[k].append((time.perf_counter() - t0) / reps[k])
        rounds += 1
    return {k: statistics.median(v) for k, v in times.items()}, rounds


def _first(fn: Callable[[], object]) -> Tuple[object, float]:
    """The result of one call (the warm-up, and the value compared) and its time."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_config(
    name: str, model: nn.Module, x: Tensor, y: Tensor, repeat: int, window: float, budget: float, quantities: List[str]
) -> List[Dict[str, object]]:
    fb_fn = forward_backward(model, x, lambda out: nn.functional.cross_entropy(out, y))
    libs = {"dropgeom": _ours(model, x, y)}
    for peer, make in PEERS.items():
        libs[peer] = make(model, x, y)  # every peer on its own deep copy of the model
    manifold_fn = lambda: ModelManifold(model, x, "categorical")  # noqa: E731
    rows = []
    # peak memory before any timing, every child forked from the same state of this process (a child inherits its
    # parent's heap: after timed loops the same call reads more)
    mems = {q: peak_memory(libs["dropgeom"][q]) for q in quantities if q in libs["dropgeom"]}
    first = {"fwd+bwd": _first(fb_fn)[1], "manifold": _first(manifold_fn)[1]}
    for q in quantities:
        fns = {"fwd+bwd": fb_fn, "manifold": manifold_fn}
        results = {}
        for lib, table in libs.items():
            if q in table:
                fns[lib] = table[q]
                results[lib], first[lib] = _first(table[q])  # warm-up, and the value compared
        t, rounds = _interleaved(fns, first, repeat, window, budget)
        fb = t["fwd+bwd"]
        peers = {k: v for k, v in t.items() if k in PEERS}
        fastest = min(peers, key=peers.get) if peers else None
        row = {
            "config": name,
            "quantity": q,
            "fwd+bwd ms": 1e3 * fb,
            "dropgeom": t["dropgeom"] / fb,
            "+manifold": (t["dropgeom"] + t["manifold"]) / fb,
        }
        for peer in PEERS:
            row[peer] = t[peer] / fb if peer in t else "-"
        row["vs peer"] = f"{t['dropgeom'] / peers[fastest]:.2f} ({fastest})" if fastest else "-"
        row["disagree"] = "-" if q == "mc diag" else f"{_disagreement(q, results, model):.1e}"
        row["peak MiB"] = mems.get(q, float("nan"))
        row["rounds"] = rounds
        rows.append(row)
    return rows


def main(quick: bool = False) -> None:
    """``quick``: 2 rounds, 10 ms windows, no ``trace`` rows (the exact diagonal summed: same cost), no
    ``implicit mv x16`` rows (about 35 forward+backward passes a call: a third of the quick topic's time on
    the large MLP) and no 1,797-input configuration; else at most 9 rounds, 30 ms windows, 4 s per quantity.
    Over rounds the spread of the medians is a few per cent."""
    warnings.filterwarnings("ignore")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: far less noise on a shared 2-core machine
    repeat, window, budget = (2, 0.01, 1.0) if quick else (9, 0.03, 4.0)
    quantities = [q for q in QUANTITIES if not (quick and q in ("trace", "implicit mv x16"))]
    rows = []
    for name, model, x, y in configurations(quick):
        t0 = time.perf_counter()
        rows += run_config(name, model, x, y, repeat, window, budget, quantities)
        print_table(rows[-len(quantities) :], title=f"{name} ({time.perf_counter() - t0:.0f} s)")
    print_table(
        rows, title="Fisher engine: time as multiples of one forward+backward (medians); 'vs peer' = dropgeom / fastest peer"
    )
    print(
        "Goals: exact diag <= 0.8x the fastest peer; mc diag <= 1.0x the fastest peer; "
        "empirical diag <= 1.0x BackPACK. 'disagree' = max relative difference to dropgeom.\n"
        "'dropgeom' times fisher(manifold, ...) on a built ModelManifold; '+manifold' adds building it "
        "(one forward for eta and input checks). One torch thread, float32, timed round-robin.",
        flush=True,
    )
    torch.set_num_threads(threads)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
