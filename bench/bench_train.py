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
stops adding rounds when its time budget is spent (at least 3 rounds, at most
5 with ``--quick`` and 9 without; the interquartile spread of these steps over
rounds is a few per cent, below the differences the table is read for).
The exact divergence rows of the 784-1024-1024-10 MLP cost seconds per step:
they are timed apart, after the other rows, in few rounds (1 with ``--quick``,
3 without) interleaved with their own forward+backward and dropout step, so
their ratios are still measured in the same rounds. Every step is first run once
on 8 inputs (a shared warm-up: imports and first traces cost the same at any
batch size). Each model's table is
printed as soon as it is measured. Budgets: about 40 s with ``--quick`` and
2 minutes without on the idle 2-core VM.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from common import forward_backward, gc_paused, print_table
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


Config = Tuple[nn.Module, torch.Tensor, torch.Tensor, List[Item], List[Item], float]


def configs(quick: bool) -> Dict[str, Config]:
    """title -> (model, x, y, objectives, slow objectives timed apart in few rounds, time budget in seconds)."""
    torch.manual_seed(0)
    digits = load_dataset("digits", seed=0)
    x1, y1 = digits.x_train[:256], digits.y_train[:256]
    x2 = torch.randn(256, 784)
    y2 = torch.randint(0, 10, (256,))
    # the exact divergence rows of the large MLP cost seconds per step: timed apart, in few rounds
    slow = [it for it in OBJECTIVES if it[0].startswith("fisher divergence exact")]
    fast = [it for it in OBJECTIVES if it not in slow]
    return {
        "MLP 64-256-256-10 digits b256": (mlp([64, 256, 256, 10]), x1, y1, OBJECTIVES, [], 6.0 if quick else 25.0),
        "MLP 784-1024-1024-10 synth b256": (mlp([784, 1024, 1024, 10]), x2, y2, fast, slow, 12.0 if quick else 45.0),
        "CNN digits 8x8 b256 (generic path)": (cnn(), x1, y1, CNN_OBJECTIVES, [], 6.0 if quick else 25.0),
    }


def _once(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, items: List[Item]) -> Dict[str, Callable[[], None]]:
    """label -> one training step (every step starts from the same parameters); 'fwd+bwd' is the unit."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def fwd_bwd() -> None:
        model.eval()  # the unit: a plain forward+backward (dropout off)
        forward_backward(model, x, lambda out: nn.functional.cross_entropy(out, y))()
        model.train()

    steps: Dict[str, Callable[[], None]] = {"fwd+bwd": fwd_bwd}
    for label, name, opts, _ in items:
        obj = make_objective(name, **opts)
        gen = torch.Generator().manual_seed(0)

        def step(obj=obj, gen=gen) -> None:
            opt.zero_grad(set_to_none=True)
            out = obj(model, x, y, "categorical", gen)
            out.loss.backward()
            opt.step()
            model.load_state_dict(state)

        steps[label] = step
    return steps


def _warm_up(model: nn.Module, x: torch.Tensor, y: torch.Tensor, items: List[Item]) -> float:
    """Run every step once on 8 inputs (imports, first traces of torch.func: one-time costs shared by the
    full-batch steps, at a fraction of a full-batch step); returns the seconds it took."""
    t0 = time.perf_counter()
    for fn in _steps(model, x[:8], y[:8], items).values():
        fn()
    return time.perf_counter() - t0


def _medians(steps: Dict[str, Callable[[], None]], max_rounds: int, budget: float) -> Tuple[Dict[str, float], int]:
    """Round-robin: every round times each step once, so all of them see the same (shared,
    fluctuating) machine load; per-step medians over rounds, and the number of rounds. At least
    3 rounds (or ``max_rounds`` if fewer), then more until ``budget`` seconds are spent."""
    samples: Dict[str, List[float]] = {k: [] for k in steps}
    t_start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min(3, max_rounds) or time.perf_counter() - t_start < budget):
        with gc_paused():  # one collection per round, not per step (each takes 0.1-0.5 s here)
            for k, fn in steps.items():
                samples[k].append(_once(fn))
        rounds += 1
    return {k: statistics.median(v) for k, v in samples.items()}, rounds


def _rows(items: List[Item], times: Dict[str, float]) -> List[Dict[str, object]]:
    rows: List[Dict[str, object]] = []
    for label, _, _, goal in items:
        t = times[label]
        ratio = t / times["dropout (module)"]
        rows.append(
            {
                "objective": label,
                "seconds": t,
                "x fwd+bwd": t / times["fwd+bwd"],
                "x plain step": t / times["none"],
                "x dropout": ratio,
                "goal": "" if goal is None else f"<= {goal:g}",
                "met": "" if goal is None else ("yes" if ratio <= goal else "no"),
            }
        )
    return rows


def main(quick: bool) -> None:
    max_rounds, slow_rounds = (5, 1) if quick else (9, 3)
    for title, (model, x, y, items, slow, budget) in configs(quick).items():
        t_start = time.perf_counter()
        warm = _warm_up(model, x, y, items + slow)
        times, rounds = _medians(_steps(model, x, y, items), max_rounds, budget)
        print_table(
            _rows(items, times),
            title=f"{title} (one fwd+bwd = {times['fwd+bwd'] * 1e3:.2f} ms; medians of {rounds} interleaved rounds "
            f"after a warm-up on 8 inputs ({warm:.0f} s); {time.perf_counter() - t_start:.0f} s)",
        )
        if slow:
            t_start = time.perf_counter()
            base = [it for it in OBJECTIVES if it[0] in ("none", "dropout (module)")]
            times, rounds = _medians(_steps(model, x, y, base + slow), slow_rounds, 0.0)
            print_table(
                _rows(slow, times),
                title=f"{title}, slow rows timed apart (one fwd+bwd = {times['fwd+bwd'] * 1e3:.2f} ms; "
                f"{'median of ' if rounds > 1 else ''}{rounds} round(s), interleaved with their own plain and "
                f"dropout steps; {time.perf_counter() - t_start:.0f} s)",
            )
