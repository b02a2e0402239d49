"""Dropout analysis cost: ``terms`` and the Fisher-dropout ``penalty`` on a
784-1024-1024-10 MLP with dropout after each hidden layer, batch 256.

Times are multiples of one forward+backward of the same model (plain
cross-entropy, eval mode) measured in the same run; the penalty is also
compared with one ordinary dropout training step (train-mode forward+backward).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from common import forward_backward, median_time, print_table
from dropgeom.dropout import penalty, terms


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Dropout(0.5), nn.Linear(width, width), nn.Tanh(), nn.Dropout(0.5),
        nn.Linear(width, 10),
    )


def main(quick: bool) -> None:
    torch.manual_seed(0)
    width, batch = 1024, 256
    net = _mlp(width)
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    ce = nn.CrossEntropyLoss()
    params = [p for p in net.parameters()]
    net.eval()
    fb = median_time(forward_backward(net, x, lambda out: ce(out, y)), repeat=3 if quick else 7)
    net.train()
    drop_step = median_time(forward_backward(net, x, lambda out: ce(out, y)), repeat=3 if quick else 7)
    net.eval()
    rows = [{"what": "forward+backward (eval)", "seconds": fb, "x fwd+bwd": 1.0, "x dropout step": fb / drop_step},
            {"what": "dropout training step", "seconds": drop_step, "x fwd+bwd": drop_step / fb, "x dropout step": 1.0}]
    gen = torch.Generator().manual_seed(0)
    for form in ("quadratic", "divergence"):
        for est in ("mc", "exact"):
            if quick and form == "divergence" and est == "exact":
                continue

            def step(form=form, est=est) -> None:
                loss = ce(net(x), y) + penalty(net, x, form=form, estimator=est, generator=gen)
                torch.autograd.grad(loss, params)

            t = median_time(step, repeat=2 if quick else 5)
            rows.append({"what": f"clean + penalty({form}, {est}) fwd+bwd", "seconds": t, "x fwd+bwd": t / fb,
                         "x dropout step": t / drop_step})
    layers = ["5"] if quick else None
    t0 = time.perf_counter()
    terms(net, x, y, layers=layers)
    t_terms = time.perf_counter() - t0
    rows.append({"what": f"terms (layers={'last' if quick else 'both'}, exact, per unit)", "seconds": t_terms,
                 "x fwd+bwd": t_terms / fb, "x dropout step": t_terms / drop_step})
    print_table(rows, title=f"dropout terms / penalty, MLP 784-{width}-{width}-10, batch {batch}")


if __name__ == "__main__":
    main(quick=True)
