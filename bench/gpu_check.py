"""Device check: fisher() of every kind x structure, the Fisher over a data loader, the stochastic embedding
curvature and the dropout terms on a device against a CPU float64 reference.

Usage::

    python bench/gpu_check.py                      # CUDA, float32 (tolerance 1e-3)
    python bench/gpu_check.py --dtype float64      # CUDA, float64 (tolerance 1e-9)
    python bench/gpu_check.py --device cpu         # the same logic on the CPU

For each model (MLP, CNN, logistic regression, a LayerNorm model that takes the
generic per-sample path; categorical and gaussian families) and each kind x
structure, the operator is built from the model and inputs moved to the
device, its dense matrix is compared with the same Fisher computed on the CPU
in float64, and the time of the fisher() call plus ``.dense()`` on the device is
printed (median of 3, synchronised). MC is checked exactly: one MC sample per input is the
empirical Fisher at labels drawn from the model, so the reference is the CPU
empirical Fisher at the labels the device generator draws. Every result must
also live on the device and in the requested dtype. Then, on an MLP with
dropout: ``fisher(StreamedManifold(model, loader))`` (diag and kfac; the
``DataLoader`` yields CPU batches that move to the device), the damped
stochastic embedding curvature (draws made on the CPU, so the same on both
devices) and the dropout terms over the loader. ``x fwd+bwd`` is each time
divided by one forward+backward pass of the same model on the same inputs on
the device. Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Dict, List, Tuple

import torch
from torch import nn

from torch.utils.data import DataLoader, TensorDataset

from dropgeom import ModelManifold, StreamedManifold, dropout, embedding_curvature
from dropgeom._fisher import fisher

KINDS = ["exact", "mc", "empirical"]
STRUCTURES = ["dense", "diag", "layer", "kfac", "implicit"]


def _models() -> List[Tuple[str, nn.Module, torch.Tensor, str]]:
    g = torch.Generator().manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    cnn = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2), nn.Flatten(), nn.Linear(3 * 2 * 2, 4)
    )
    norm = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    return [
        ("mlp/categorical", mlp, torch.randn(24, 6, generator=g), "categorical"),
        ("cnn/categorical", cnn, torch.randn(16, 2, 6, 6, generator=g), "categorical"),
        ("logreg/categorical", nn.Linear(6, 4), torch.randn(24, 6, generator=g), "categorical"),
        ("layernorm/gaussian", norm, torch.randn(24, 6, generator=g), "gaussian"),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, reps: int):
    times, out = [], None
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _fwd_bwd(model: nn.Module, x: torch.Tensor, device: torch.device, reps: int) -> float:
    def run() -> None:
        out = model(x)
        torch.autograd.grad(out.square().sum(), list(model.parameters()))

    return _timed(run, device, reps)[1]


def _penalty_and_grad(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The exact divergence penalty and its gradient with respect to the parameters, in one vector."""
    value = dropout.penalty(net, x, form="divergence").value
    grads = torch.autograd.grad(value, list(net.parameters()))
    return torch.cat([value.reshape(1)] + [g.reshape(-1) for g in grads])


def check_streamed(device: str = "cuda", dtype: str = "float32", quick: bool = False) -> List[Dict[str, object]]:
    """The Fisher over a loader, the stochastic embedding curvature and the dropout terms: one row each."""
    dev, dt, reps = torch.device(device), getattr(torch, dtype), 1 if quick else 3
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 4))  # P = 92 < n (K - 1) = 180
    x, y = torch.randn(60, 6, generator=g), torch.randint(0, 4, (60,), generator=g)
    ref_net, dev_net = copy.deepcopy(net).double(), copy.deepcopy(net).to(dev, dt)
    relu = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 4)
    )
    relu_ref, relu_dev = copy.deepcopy(relu).double(), copy.deepcopy(relu).to(dev, dt)
    unit = _fwd_bwd(dev_net, x.to(dev, dt), dev, reps)
    loader = DataLoader(TensorDataset(x.to(dt), y), batch_size=8)  # CPU batches, 8 does not divide 60
    m_ref = ModelManifold(ref_net, x.double())
    curv = dict(method="stochastic", alpha=-1.0, n_samples=2, batch_size=2, damping=0.1, cg_tol=1e-6)
    cases = [
        (
            "loader",
            "diag",
            lambda: fisher(StreamedManifold(dev_net, loader), "exact", "diag").diag(),
            lambda: fisher(m_ref, "exact", "diag").diag(),
        ),
        (
            "loader",
            "kfac",
            lambda: fisher(StreamedManifold(dev_net, loader), "exact", "kfac").dense(),
            lambda: fisher(m_ref, "exact", "kfac").dense(),
        ),
        (
            "curvature",
            "stochastic",
            lambda: (
                embedding_curvature(
                    ModelManifold(dev_net, x.to(dev, dt)), generator=torch.Generator().manual_seed(0), **curv
                ).gamma2
            ),
            lambda: embedding_curvature(m_ref, generator=torch.Generator().manual_seed(0), **curv).gamma2,
        ),
        (
            "terms",
            "loader",
            lambda: torch.stack([dropout.terms(dev_net, loader).per_unit["2"][k] for k in ("fisher", "divergence")]),
            lambda: torch.stack([dropout.terms(ref_net, x.double(), y).per_unit["2"][k] for k in ("fisher", "divergence")]),
        ),
        (  # a ReLU between the dropout layer and the output: the kink blocks (dropout/_kinks.py)
            "penalty",
            "divergence+grad",
            lambda: _penalty_and_grad(relu_dev, x.to(dev, dt)),
            lambda: _penalty_and_grad(relu_ref, x.double()),
        ),
    ]
    rows = []
    for kind, structure, run, reference in cases:
        got, seconds = _timed(run, dev, reps)
        ref = reference()
        err = float((got.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
        on_device = got.device.type == dev.type and got.dtype == dt
        rows.append(
            {
                "model": "mlp+dropout/categorical",
                "kind": kind,
                "structure": structure,
                "max rel err": err,
                "on device": on_device,
                "ms": 1e3 * seconds,
                "x fwd+bwd": seconds / unit,
                # CG carries rounding differences to its tolerance: the curvature agrees to ~cg_tol
                "tol": 1e-5 if kind == "curvature" else None,
            }
        )
    return rows


def check(device: str = "cuda", dtype: str = "float32", quick: bool = False) -> List[Dict[str, object]]:
    """Run every check; return one row per (model, kind, structure)."""
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    rows = []
    models = _models()[:2] if quick else _models()
    for name, model, x, family in models:
        ref_model = copy.deepcopy(model).double()
        dev_model = copy.deepcopy(model).to(dev, dt)
        m_ref = ModelManifold(ref_model, x.double(), family)
        m_dev = ModelManifold(dev_model, x.to(dev, dt), family)
        targets = m_ref.family.sample(m_ref.eta(), generator=torch.Generator().manual_seed(1))
        unit = _fwd_bwd(dev_model, x.to(dev, dt), dev, 1 if quick else 3)
        for kind in KINDS:
            for structure in STRUCTURES:
                kw: Dict[str, object] = {}
                if kind == "empirical":
                    kw_ref = dict(targets=targets)
                    kw = dict(targets=targets.to(dev))
                elif kind == "mc":
                    g = torch.Generator(device=dev).manual_seed(7)
                    labels = m_dev.family.sample(m_dev.eta(), generator=g)
                    kw_ref = dict(targets=labels.cpu().to(targets.dtype))
                else:
                    kw_ref = {}
                ref = fisher(m_ref, "empirical" if kind == "mc" else kind, structure, **kw_ref).dense()
                times = []
                for _ in range(1 if quick else 3):
                    if kind == "mc":
                        kw = dict(generator=torch.Generator(device=dev).manual_seed(7))
                    _sync(dev)
                    t0 = time.perf_counter()
                    F = fisher(m_dev, kind, structure, **kw)
                    D = F.dense()
                    _sync(dev)
                    times.append(time.perf_counter() - t0)
                ok_place = D.device.type == dev.type and D.dtype == dt and F.diag().device.type == dev.type
                err = float((D.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
                rows.append(
                    {
                        "model": name,
                        "kind": kind,
                        "structure": structure,
                        "max rel err": err,
                        "on device": ok_place,
                        "ms": 1e3 * statistics.median(times),
                        "x fwd+bwd": statistics.median(times) / unit,
                    }
                )
    return rows


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--quick", action="store_true", help="two models, one timing run")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available here; run with --device cpu to check the logic", file=sys.stderr)
        return 2
    tol = 1e-3 if args.dtype == "float32" else 1e-9
    rows = check(args.device, args.dtype, args.quick) + check_streamed(args.device, args.dtype, args.quick)
    print(f"device {args.device}, dtype {args.dtype}, tolerance {tol:g} (relative to max |F|)")
    print(f"{'model':20s} {'kind':10s} {'structure':10s} {'max rel err':>12s} {'on device':>9s} {'ms':>9s} {'x fwd+bwd':>9s}")
    bad = 0
    for r in rows:
        flag = "" if r["max rel err"] <= max(tol, r.get("tol") or 0.0) and r["on device"] else "  <-- FAIL"
        bad += bool(flag)
        print(
            f"{r['model']:20s} {r['kind']:10s} {r['structure']:10s} {r['max rel err']:12.2e} {str(r['on device']):>9s} {r['ms']:9.2f} {r['x fwd+bwd']:9.1f}{flag}"
        )
    print("all checks passed" if not bad else f"{bad} checks FAILED")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
