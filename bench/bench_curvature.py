"""Benchmark of the curvature estimators (issue 3).

1. Stochastic embedding curvature on the 784-1024-1024-10 tanh MLP at batch
   256 (categorical, float32): time of one estimator sample and of its pieces
   (one Fisher product g v, one second directional derivative D2 eta[u, v]) as
   multiples of one forward+backward pass measured in the same run, and the
   peak memory against the size of one parameter vector (the estimator keeps
   O(P + nK) memory: a few P-vectors per CG column and nK-sized outputs).
   CG iterations are capped (``cg_max_iter``) so the run stays short; the
   time per sample grows linearly with the iterations actually used, and the
   table reports the cost per CG iteration to extrapolate. Note that at batch
   256 the parameters (1.9M) outnumber n(K-1) = 2304, so the manifold over
   these inputs fills the output space and gamma^2 = 0 (theory.md section 3):
   this part measures cost only.
2. Dense vs stochastic on small tanh MLPs of growing width: wall time of the
   exact dense method against the stochastic one (32 samples, damping 1e-2),
   to locate the crossover.
3. The C1 measures (issue 9) on the quick preset's model size (tanh MLP
   10-16-16-10 with dropout, P = 618, n = 100 inputs, float64): each invariant
   curvature measure and each sharpness measure as a multiple of one
   forward+backward pass on the same inputs, with the settings C1 uses.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from common import forward_backward, in_child, median_time, print_table

from dropgeom import ModelManifold, embedding_curvature
from dropgeom.curvature._common import LinearisedManifold, ProjectionWarning, default_tol, projection_tolerance, whitening


def _build(n: int = 256):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 10))
    return net, torch.randn(n, 784), torch.randint(0, 10, (n,))


def _sampled_peak(fn) -> float:
    """Peak growth (MiB) of the resident set while ``fn`` runs, over its size just before.

    A thread samples ``/proc/self/statm`` every 0.2 ms (the process's lifetime
    max RSS is useless here: importing torch already set it higher). Large
    tensors are mmap-ed and returned to the OS when freed, so this tracks them.
    """
    import gc
    import os
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    try:  # glibc: serve every allocation >= 64 KiB by mmap, so freed tensors leave the RSS
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    except OSError:
        pass
    gc.collect()
    base = rss()
    peak = [base]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return max(peak[0], rss()) / 2**20 - base / 2**20


def _mnist_mlp(quick: bool) -> None:
    n = 256
    net, x, y = _build(n)
    P = sum(p.numel() for p in net.parameters())
    fb = median_time(forward_backward(net, x, lambda out: nn.functional.cross_entropy(out, y)), repeat=3 if quick else 7)
    m = ModelManifold(net, x, "categorical")
    lin = LinearisedManifold(m)
    _, S, _ = whitening(m)
    v = torch.randn(P, 1)
    t_gv = median_time(lambda: lin.metric_matmat(S, v), repeat=2 if quick else 5)
    t_d2 = median_time(lambda: lin.d2(v.T, v.T), repeat=2 if quick else 5)
    # one sample costs about (7 cg_iter + a few) Fisher products: 2 samples (the estimator's least) of 2 CG
    # iterations with --quick, of 4 in full mode (the time per sample grows linearly with the iterations)
    cg_iter = 2 if quick else 4
    print("(timing on a shared CPU: ratios against forward+backward, measured in the same run, are the numbers to read)")
    n_samples = 2
    gen = torch.Generator().manual_seed(0)

    def estimate(n_samples: int = n_samples, cg_iter: int = cg_iter) -> None:
        embedding_curvature(
            m, method="stochastic", n_samples=n_samples, generator=gen, batch_size=1, cg_max_iter=cg_iter, cg_tol=1e-5
        )

    with warnings.catch_warnings():  # CG stops early on purpose (cg_max_iter): its warning is expected here
        warnings.simplefilter("ignore", RuntimeWarning)
        estimate(2, 1)  # warm-up (first vmap traces), at a fraction of a timed sample
        # the peak does not grow with the CG iterations (each reuses the same few P-vectors): measured on 1
        mem = in_child(lambda: _sampled_peak(lambda: estimate(2, 1)))  # a child: the parent's allocator stays as is
        t0 = time.perf_counter()
        estimate()
        t_est = (time.perf_counter() - t0) / n_samples
    p_mib = P * 4 / 2**20
    print_table(
        [
            {"quantity": "forward+backward", "seconds": fb, "x fwd+bwd": 1.0},
            {"quantity": "Fisher product g v (1 column)", "seconds": t_gv, "x fwd+bwd": t_gv / fb},
            {"quantity": "D2 eta[u, v] (forward over forward)", "seconds": t_d2, "x fwd+bwd": t_d2 / fb},
            {
                "quantity": f"one estimator sample (cg_max_iter={cg_iter}, <= {2 * cg_iter}+{5 * cg_iter} CG products)",
                "seconds": t_est,
                "x fwd+bwd": t_est / fb,
            },
        ],
        title=f"stochastic curvature, MLP 784-1024-1024-10, batch {n}, P={P}, float32 (CPU)",
    )
    print_table(
        [
            {
                "run": "estimator, 2 samples (1 CG iteration: the peak does not grow with them)",
                "peak MiB": mem,
                "x |theta| (P floats)": mem / p_mib,
            },
            {"run": "P x P matrix (never formed)", "peak MiB": P * P * 4 / 2**20, "x |theta| (P floats)": float(P)},
        ],
        title=f"peak resident-memory growth (P floats = {p_mib:.1f} MiB, nK = {n * 10}; a CG column holds ~5 P-vectors)",
    )


def _crossover(quick: bool) -> None:
    torch.manual_seed(0)
    n, d, K = 64, 4, 3
    widths = [4, 8] if quick else [4, 8, 16, 32]
    rows = []
    for h in widths:
        net = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, K)).double()
        m = ModelManifold(net, torch.randn(n, d, dtype=torch.float64), "categorical")
        # the widest runs take seconds: one call each after the narrow ones warmed up the same code
        t_dense = median_time(lambda: embedding_curvature(m), repeat=1 if quick or h >= 16 else 3, warmup=int(h < 16))
        gen = torch.Generator().manual_seed(0)
        out = {}

        def stochastic() -> None:
            out["r"] = embedding_curvature(m, method="stochastic", n_samples=32, generator=gen, batch_size=32, damping=1e-2)

        with warnings.catch_warnings():  # a projection that stops short is reported in the table, not warned about
            warnings.simplefilter("ignore", ProjectionWarning)
            t_sto = median_time(stochastic, repeat=1, warmup=0)
        rows.append(
            {
                "width": h,
                "P": m.num_params,
                "dense s": t_dense,
                "stochastic(32, damped) s": t_sto,
                "stochastic / dense": t_sto / t_dense,
                "projection residual": out["r"].projection_residual,
            }
        )
    print_table(rows, title=f"dense vs stochastic, tanh MLP {d}-h-{K}, n={n}, categorical, float64")
    print(
        f"(projection residual: |J^T S r| / |J^T S Y| reached by the stochastic estimator's projections onto the tangent "
        f"space; above {projection_tolerance(default_tol(torch.float64)):g} they did not converge and its gamma^2 is "
        "too large: time an estimate only where it converged)"
    )


def _c1_measures(quick: bool) -> None:
    from dropgeom.curvature import (
        curvature_profile,
        dropout_mixture_manifold,
        dropout_tangent_directions,
        fisher_top_eigenvalue,
        fisher_trace,
        hessian_top_eigenvalue,
        hessian_trace,
        range_gamma2,
        sam_sharpness,
    )

    torch.manual_seed(0)
    D = torch.float64
    net = nn.Sequential(
        nn.Linear(10, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 10)
    ).double()
    x, y = torch.randn(100, 10, dtype=D), torch.randint(0, 10, (100,))
    fb = median_time(forward_backward(net.eval(), x, lambda out: nn.functional.cross_entropy(out, y)), repeat=5 if quick else 20)
    m = ModelManifold(net, x, "categorical")
    dirs = dropout_tangent_directions(m)
    U = torch.cat(dirs)
    xi = torch.randint(0, 2, (8, U.shape[0]), generator=torch.Generator().manual_seed(0)).to(D) * 2 - 1
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(100, 10, dtype=D)
    first = ModelManifold(net, x[:30], "categorical", param_names=["0.weight", "0.bias"])
    # every case runs its own torch.func transforms: after one shared warm-up (imports, first traces) the
    # first call is representative; --quick times each case once, full mode takes the median of 3
    rep = 1 if quick else 3
    curvature_profile(m, {"noise": xi @ U}, {"e": 1.0})
    cases = [
        (
            "mask e- and m-curvature + natural gradient (16 directions, 1 SVD)",
            lambda: curvature_profile(m, {"mask": dirs[0]}, {"e": 1.0, "m": -1.0}, targets=y),
        ),
        (
            "natural gradient, function-space regularised (reference: 100 other inputs)",
            lambda: curvature_profile(m, {}, {"e": 1.0}, targets=y, reference=ModelManifold(net, x_ref, "categorical")),
        ),
        ("undamped gamma^2 on range(J), first layer (176 params), 30 inputs", lambda: range_gamma2(first)),
        ("same, dense Hessian tensor (embedding_curvature)", lambda: embedding_curvature(first)),
        ("noise-tangent e-curvature (8 Rademacher directions)", lambda: curvature_profile(m, {"noise": xi @ U}, {"e": 1.0})),
        (
            "same, on the m-mixture manifold (16 common masks)",
            lambda: curvature_profile(
                dropout_mixture_manifold(net, x, masks=16, generator=torch.Generator().manual_seed(0)),
                {"noise": xi @ U},
                {"e": 1.0},
            ),
        ),
        ("Fisher trace", lambda: fisher_trace(m)),
        ("Fisher top eigenvalue", lambda: fisher_top_eigenvalue(m)),
        ("Hessian trace (Hutchinson, 8 probes)", lambda: hessian_trace(m, y, n_probes=8, generator=g)),
        ("top Hessian eigenvalue (Lanczos, tol 1e-3)", lambda: hessian_top_eigenvalue(m, y, tol=1e-3)),
        ("SAM sharpness (rho 0.05, 3 ascent steps)", lambda: sam_sharpness(m, y, rho=0.05, steps=3)),
    ]
    rows = [{"measure": "forward+backward", "seconds": fb, "x fwd+bwd": 1.0}]
    for name, fn in cases:
        t = median_time(fn, repeat=rep, warmup=0)
        rows.append({"measure": name, "seconds": t, "x fwd+bwd": t / fb})
    print_table(rows, title=f"C1 measures, tanh MLP 10-16-16-10 with dropout, P={m.num_params}, n=100, float64 (one thread)")


def main(quick: bool) -> None:
    torch.set_num_threads(1)
    _crossover(quick)
    _c1_measures(quick)
    _mnist_mlp(quick)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
