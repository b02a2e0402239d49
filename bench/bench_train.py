"""Cost of one training step per objective, as ratios measured in the same run.

Models (the core issue's benchmark MLPs, with ``nn.Dropout(p=0.5)`` after each
hidden layer): 64-256-256-10 on digits at batch 256, and 784-1024-1024-10 on
synthetic inputs at batch 256, float32. One *step* = zero_grad + objective +
backward + SGD step. Columns: seconds, the ratio to one plain forward+backward
of the same model (``x fwd+bwd``), to the plain (``none``) step and to the
Bernoulli dropout step (``x dropout``; module mode, i.e. the model's own
``nn.Dropout``). Goal (issue 5): a Fisher-dropout step <= 1.0x the dropout step.
Steps are timed round-robin (one of each per round, medians over rounds) so
that every objective sees the same load on a shared machine. ``--quick`` uses 5 rounds and leaves out the exact divergence form on the
784-1024-1024-10 MLP (one downstream forward per unit: over a minute a step
on a shared 2-core CPU); the full run adds the curvature terms.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Dict, List

import torch
from torch import nn

from common import forward_backward, print_table
from dropgeom.data import load_dataset
from dropgeom.train import make_objective

OBJECTIVES = [
    ("none", "none", {}),
    ("dropout (module)", "dropout", {}),
    ("dropout (explicit masks)", "dropout", {"masks": "explicit"}),
    ("gaussian_dropout", "gaussian_dropout", {}),
    ("fisher quadratic exact", "fisher_dropout", {"form": "quadratic"}),
    ("fisher divergence exact", "fisher_dropout", {"form": "divergence"}),
    ("fisher quadratic mc", "fisher_dropout", {"form": "quadratic", "estimator": "mc"}),
    ("fisher divergence mc", "fisher_dropout", {"form": "divergence", "estimator": "mc"}),
    ("fisher quadratic unit", "fisher_dropout", {"form": "quadratic", "estimator": "unit"}),
]
SLOW = [
    ("fisher quadratic exact +curv", "fisher_dropout", {"form": "quadratic", "curvature": True}),
    ("fisher divergence exact +curv", "fisher_dropout", {"form": "divergence", "curvature": True}),
]


def mlp(sizes: List[int], p: float = 0.5) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(p)]
    return nn.Sequential(*layers)


def configs(quick: bool) -> Dict[str, tuple]:
    torch.manual_seed(0)
    digits = load_dataset("digits", seed=0)
    x1, y1 = digits.x_train[:256], digits.y_train[:256]
    x2 = torch.randn(256, 784)
    y2 = torch.randint(0, 10, (256,))
    return {
        "MLP 64-256-256-10 digits b256": (mlp([64, 256, 256, 10]), x1, y1),
        "MLP 784-1024-1024-10 synth b256": (mlp([784, 1024, 1024, 10]), x2, y2),
    }


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(quick: bool) -> None:
    rounds = 5 if quick else 15
    for title, (model, x, y) in configs(quick).items():
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        items = OBJECTIVES + ([] if quick else SLOW)
        if quick and "784" in title:  # one forward of the 1,024 downstream units each: minutes per step here
            items = [it for it in items if it[0] != "fisher divergence exact"]
        state = {k: v.clone() for k, v in model.state_dict().items()}

        def fwd_bwd() -> None:
            model.eval()  # the unit: a plain forward+backward (dropout off)
            forward_backward(model, x, lambda out: nn.functional.cross_entropy(out, y))()
            model.train()

        steps = {"fwd+bwd": fwd_bwd}
        for label, name, opts in items:
            obj = make_objective(name, **opts)
            gen = torch.Generator().manual_seed(0)

            def step(obj=obj, gen=gen) -> None:
                opt.zero_grad(set_to_none=True)
                out = obj(model, x, y, "categorical", gen)
                out.loss.backward()
                opt.step()
                model.load_state_dict(state)  # every step starts from the same parameters

            steps[label] = step
        # Round-robin: every round times each step once, so all of them see the same
        # (shared, fluctuating) machine load; report per-step medians over rounds.
        samples: Dict[str, List[float]] = {k: [] for k in steps}
        for fn in steps.values():
            fn()  # warm-up
        for _ in range(rounds):
            for k, fn in steps.items():
                gc.collect()
                samples[k].append(_once(fn))
        times = {k: statistics.median(v) for k, v in samples.items()}
        base = times["fwd+bwd"]
        rows = []
        for label, _, _ in items:
            t = times[label]
            rows.append(
                {
                    "objective": label,
                    "seconds": t,
                    "x fwd+bwd": t / base,
                    "x plain step": t / times["none"],
                    "x dropout": t / times["dropout (module)"],
                }
            )
        print_table(rows, title=f"{title} (one fwd+bwd = {base * 1e3:.2f} ms; medians of {rounds} interleaved rounds)")
