"""Cost of one training step per objective, as ratios measured in the same run.

Models (``nn.Dropout(p=0.5)`` after each hidden layer, batch 256, float32):

* MLP 64-256-256-10 (ReLU) on digits and MLP 784-1024-1024-10 (ReLU) on synthetic
  inputs: the chain fast path of :func:`dropgeom.dropout.penalty`;
* a small CNN on the 8x8 digits (conv-ReLU-Dropout2d-conv-ReLU-pool-Linear-ReLU-
  Dropout-Linear): the generic ``torch.func`` path for the channel-dropout layer.

One *step* = zero_grad + objective + backward + SGD step. Columns: seconds, the
ratio to one plain forward+backward of the same model (``x fwd+bwd``), to the
plain (``none``) step and to the Bernoulli dropout step (``x dropout``; module
mode, the model's own ``nn.Dropout``), and the goal of issue 14 for that row
(``<= 1`` sampled estimators; ``<= 2`` exact quadratic; ``<= 3`` exact divergence
and exact + curvature on the chain path; ``<= 10`` exact + curvature on the CNN).
Steps are timed round-robin (one of each per round, medians over rounds) so
that every objective sees the same load on a shared machine; a configuration
stops adding rounds when its time budget is spent (at least 3 rounds), so the
whole topic stays within about 1 minute with ``--quick`` (which also leaves out
the exact divergence rows of the 784-1024-1024-10 MLP, seconds per step) and 5
without, even on a loaded machine.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from common import forward_backward, print_table
from dropgeom.data import load_dataset
from dropgeom.train import make_objective

Item = Tuple[str, str, Dict[str, object], Optional[float]]  # label, objective, options, goal (x dropout step)

OBJECTIVES: List[Item] = [
    ("none", "none", {}, None),
    ("dropout (module)", "dropout", {}, None),
    ("dropout (explicit masks)", "dropout", {"masks": "explicit"}, None),
    ("gaussian_dropout", "gaussian_dropout", {}, None),
    ("fisher quadratic mc", "fisher_dropout", {"form": "quadratic", "estimator": "mc"}, 1.0),
    ("fisher quadratic unit", "fisher_dropout", {"form": "quadratic", "estimator": "unit"}, 1.0),
    ("fisher divergence mc", "fisher_dropout", {"form": "divergence", "estimator": "mc"}, 1.0),
    ("fisher quadratic exact", "fisher_dropout", {"form": "quadratic"}, 2.0),
    ("fisher divergence exact", "fisher_dropout", {"form": "divergence"}, 3.0),
    ("fisher quadratic mc +curv", "fisher_dropout", {"form": "quadratic", "estimator": "mc", "curvature": True}, 1.0),
    ("fisher divergence mc +curv", "fisher_dropout", {"form": "divergence", "estimator": "mc", "curvature": True}, 1.0),
    ("fisher quadratic exact +curv", "fisher_dropout", {"form": "quadratic", "curvature": True}, 3.0),
    ("fisher divergence exact +curv", "fisher_dropout", {"form": "divergence", "curvature": True}, 3.0),
]
#: the CNN (generic path): the exact rows with the curvature term have the goal <= 10x
CNN_OBJECTIVES: List[Item] = [
    it if "exact +curv" not in it[0] else (it[0], it[1], it[2], 10.0)
    for it in OBJECTIVES
    if it[0] not in ("dropout (explicit masks)", "gaussian_dropout")
]


def mlp(sizes: List[int], p: float = 0.5) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(p)]
    return nn.Sequential(*layers)


def cnn(p: float = 0.5) -> nn.Sequential:
    """8x8 digits: conv(1->8) ReLU Dropout2d conv(8->16) ReLU pool Linear(256->64) ReLU Dropout Linear(64->10)."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Dropout2d(0.2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 16, 64),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(64, 10),
    )


def configs(quick: bool) -> Dict[str, Tuple[nn.Module, torch.Tensor, torch.Tensor, List[Item], float]]:
    """title -> (model, x, y, objectives, time budget in seconds)."""
    torch.manual_seed(0)
    digits = load_dataset("digits", seed=0)
    x1, y1 = digits.x_train[:256], digits.y_train[:256]
    x2 = torch.randn(256, 784)
    y2 = torch.randint(0, 10, (256,))
    # --quick: the exact divergence rows of the large MLP (seconds per step) are left out
    big = [it for it in OBJECTIVES if not (quick and it[0].startswith("fisher divergence exact"))]
    return {
        "MLP 64-256-256-10 digits b256": (mlp([64, 256, 256, 10]), x1, y1, OBJECTIVES, 8.0 if quick else 60.0),
        "MLP 784-1024-1024-10 synth b256": (mlp([784, 1024, 1024, 10]), x2, y2, big, 20.0 if quick else 180.0),
        "CNN digits 8x8 b256 (generic path)": (cnn(), x1, y1, CNN_OBJECTIVES, 8.0 if quick else 60.0),
    }


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(quick: bool) -> None:
    max_rounds = 5 if quick else 15
    for title, (model, x, y, items, budget) in configs(quick).items():
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        state = {k: v.clone() for k, v in model.state_dict().items()}

        def fwd_bwd() -> None:
            model.eval()  # the unit: a plain forward+backward (dropout off)
            forward_backward(model, x, lambda out: nn.functional.cross_entropy(out, y))()
            model.train()

        steps = {"fwd+bwd": fwd_bwd}
        for label, name, opts, _ in items:
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
        t_start = time.perf_counter()
        for fn in steps.values():
            fn()  # warm-up
        rounds = 0
        while rounds < max_rounds and (rounds < 3 or time.perf_counter() - t_start < budget):
            for k, fn in steps.items():
                gc.collect()
                samples[k].append(_once(fn))
            rounds += 1
        times = {k: statistics.median(v) for k, v in samples.items()}
        base = times["fwd+bwd"]
        rows = []
        for label, _, _, goal in items:
            t = times[label]
            ratio = t / times["dropout (module)"]
            rows.append(
                {
                    "objective": label,
                    "seconds": t,
                    "x fwd+bwd": t / base,
                    "x plain step": t / times["none"],
                    "x dropout": ratio,
                    "goal": "" if goal is None else f"<= {goal:g}",
                    "met": "" if goal is None else ("yes" if ratio <= goal else "no"),
                }
            )
        print_table(
            rows,
            title=f"{title} (one fwd+bwd = {base * 1e3:.2f} ms; medians of {rounds} interleaved rounds, "
            f"{time.perf_counter() - t_start:.0f} s)",
        )
