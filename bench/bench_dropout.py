"""Dropout analysis cost: the Fisher-dropout training step and ``terms``.

Models: MLP 784-1024-1024-10 (synthetic inputs) and MLP 64-256-256-10 (the
digits set), ``nn.Dropout(0.5)`` after each hidden layer, batch 256.

* Training steps (forward + backward + SGD step): a plain step (eval mode, the
  unit ``x fwd+bwd``), an ordinary dropout step (the model's ``nn.Dropout`` in
  train mode, ``x dropout step``), and Fisher-dropout steps ``clean loss +
  penalty`` for the quadratic and divergence forms, ``mc`` / ``unit`` / ``exact``. The
  clean loss reuses the penalty's forward (``penalty(...).eta``);
  one row shows the cost of a separate clean forward instead (what an objective
  that calls ``model(x)`` and ``penalty`` separately pays). Goal (issues 4/5):
  a Fisher-dropout step <= 1.0x a dropout step.
* ``terms`` (exact, all units) on the 784-1024-1024-10 MLP (ReLU then Tanh, so
  the curvature terms are not trivially zero), per layer and in total, as a
  multiple of one forward+backward.

* ``terms`` on a CNN (digits) and a small Transformer encoder (generic ``torch.func``
  path), one layer at a time, as multiples of one forward+backward
  (:func:`architecture_terms`).

``--quick`` skips the exact divergence step on the large MLP and ``terms`` of
the deep layer (each costs tens of forward+backward passes).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch
from torch import nn

from common import median_time, print_table
from dropgeom.dropout import penalty, terms


def _mlp(sizes, act=nn.ReLU, last_act=None) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-2], sizes[1:-1])):
        layers += [nn.Linear(a, b), (last_act if (last_act and i == len(sizes) - 3) else act)(), nn.Dropout(0.5)]
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


def _digits(batch: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:batch], dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, torch.tensor(d.target[:batch])


def _interleaved(fns: Dict[str, Callable[[], None]], repeat: int) -> Dict[str, float]:
    """Median time of each function, measured round-robin (one call of each per round, after a
    warm-up round) so that load changes on a shared machine hit every candidate alike."""
    for f in fns.values():
        f()
    times: Dict[str, list] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _steps(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor, quick: bool, big: bool, label: str):
    ce = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)
    gen = torch.Generator().manual_seed(0)
    repeat = 5 if quick else 7  # medians of 7 interleaved rounds: spread a few per cent

    def plain() -> None:
        net.eval()
        opt.zero_grad()
        ce(net(x), y).backward()
        opt.step()

    def dropout() -> None:
        net.train()
        opt.zero_grad()
        ce(net(x), y).backward()
        opt.step()
        net.eval()

    def fisher(form: str, est: str, shared: bool = True):
        def step() -> None:
            opt.zero_grad()
            if shared:
                res = penalty(net, x, form=form, method=est, generator=gen)
                pen, eta = res.value, res.eta
                loss = ce(eta, y) + pen
            else:
                loss = ce(net(x), y) + penalty(net, x, form=form, method=est, generator=gen).value
            loss.backward()
            opt.step()

        return step

    fns = {f"{label}: plain step (eval)": plain, f"{label}: dropout step": dropout}
    cases = [
        ("quadratic", "mc", True),
        ("quadratic", "unit", True),
        ("quadratic", "exact", True),
        ("divergence", "mc", True),
        ("divergence", "exact", True),
        ("quadratic", "mc", False),
    ]
    slow = {}
    for form, est, shared in cases:
        what = f"{label}: clean + penalty({form}, {est})" + ("" if shared else ", separate forward")
        if big and form == "divergence" and est == "exact":
            if not quick:
                slow[what] = fisher(form, est, shared)
            continue
        fns[what] = fisher(form, est, shared)
    times = _interleaved(fns, repeat)
    times.update({k: median_time(f, repeat=1, warmup=0) for k, f in slow.items()})
    fb, drop = times[f"{label}: plain step (eval)"], times[f"{label}: dropout step"]
    rows = list(times.items())
    return [{"what": w, "seconds": t, "x fwd+bwd": t / fb, "x dropout step": t / drop} for w, t in rows], fb


def main(quick: bool) -> None:
    torch.manual_seed(0)
    batch = 256
    big = _mlp([784, 1024, 1024, 10])
    xb, yb = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    r, _ = _steps(big, xb, yb, quick, True, "784-1024-1024-10")
    print_table(r, title=f"Fisher-dropout training step vs dropout step, batch {batch}")
    small = _mlp([64, 256, 256, 10])
    xs, ys = _digits(batch)
    r, _ = _steps(small, xs, ys, quick, False, "64-256-256-10 digits")
    print_table(r, title=f"Fisher-dropout training step vs dropout step, batch {batch}")

    net = _mlp([784, 1024, 1024, 10], act=nn.ReLU, last_act=nn.Tanh).eval()
    params = list(net.parameters())
    ce = nn.CrossEntropyLoss()

    def fwd_bwd() -> None:
        torch.autograd.grad(ce(net(xb), yb), params)

    fb = _interleaved({"fb": fwd_bwd}, 3 if quick else 7)["fb"]
    trows = [{"what": "forward+backward (eval)", "seconds": fb, "x fwd+bwd": 1.0}]
    total = 0.0
    for layer in ["5"] if quick else ["5", "2"]:
        t0 = time.perf_counter()
        terms(net, xb, yb, layers=[layer])
        t = time.perf_counter() - t0
        total += t
        where = "before the output Linear" if layer == "5" else "first hidden layer"
        trows.append({"what": f"terms layer {layer} ({where}), 1024 units, exact", "seconds": t, "x fwd+bwd": t / fb})
    if not quick:
        trows.append({"what": "terms, both layers", "seconds": total, "x fwd+bwd": total / fb})
    print_table(trows, title=f"dropout terms, MLP 784-1024(ReLU)-1024(Tanh)-10, batch {batch}, all units")

    architecture_terms(quick)


class _Encoder(nn.Module):
    """Embedding -> nn.TransformerEncoderLayer (attention-weight dropout included) -> mean -> Linear."""

    def __init__(self, vocab: int = 50, width: int = 32, k: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True)
        self.head = nn.Linear(width, k)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.emb(ids)).mean(1))


def architecture_terms(quick: bool) -> None:
    """``dropout.terms`` (generic torch.func path) on a CNN and a small Transformer, every unit
    of one layer at a time, as multiples of one forward+backward of the same model and batch.

    Cost per unit: one batched downstream forward for ``eta^(-j)`` plus, unless every module
    after the layer is piecewise linear (then ``C_jj = 0`` and no pass is run), one batched
    forward-over-forward pass whose first-order tangent also gives ``d_j eta`` (so ``F^mask``
    and ``<r, d_j eta>`` need no reverse products); otherwise the cheaper of ``U`` forward
    tangents and ``R + 1`` reverse products. Measured 2026-12-04 on the shared 2-core VM
    (load ~16-20, so ratios only, old and new interleaved in one process, 1 thread, same
    values): CNN ReLU ``Dropout2d`` (8 channels) 21x -> 6x forward+backward, CNN Tanh 30x -> 22x,
    Transformer ``layer.dropout1`` (256 units) 302x -> 229x, attention weights (256 units)
    396x -> 417x (unchanged within noise): about 1-1.6 forward+backward per unit, most of it
    the forward-over-forward pass of the Gaussian curvature term ``C_jj``."""
    torch.manual_seed(0)
    xs, ys = _digits(256)
    cnn = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Dropout2d(0.2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(128, 10),
    ).eval()
    enc = _Encoder().eval()
    ids, yi = torch.randint(0, 50, (64, 8)), torch.randint(0, 10, (64,))
    cases = [
        ("CNN digits, batch 256", cnn, xs, ys, [("3", "Dropout2d, 8 channels"), ("8", "Dropout, 128 units")]),
        (
            "Transformer encoder 32x4 heads, batch 64, length 8",
            enc,
            ids,
            yi,
            [("layer.dropout1", "Dropout, 8x32 units"), ("layer.self_attn", "attention weights, 4x8x8 units")],
        ),
    ]
    ce = nn.CrossEntropyLoss()
    for title, net, x, y, layers in cases[: 1 if quick else 2]:
        params = list(net.parameters())

        def fwd_bwd() -> None:
            torch.autograd.grad(ce(net(x), y), params)

        fb = _interleaved({"fb": fwd_bwd}, 3 if quick else 7)["fb"]
        rows = [{"what": "forward+backward (eval)", "seconds": fb, "x fwd+bwd": 1.0}]
        terms(net, x[:2], y[:2], layers=[layers[0][0]])  # warm-up: torch.func's first jvp imports torch._dynamo
        for name, what in layers:
            t0 = time.perf_counter()
            terms(net, x, y, layers=[name])
            t = time.perf_counter() - t0
            rows.append({"what": f"terms {name} ({what})", "seconds": t, "x fwd+bwd": t / fb})
        print_table(rows, title=f"dropout terms (generic path), {title}")


if __name__ == "__main__":
    main(quick=True)
