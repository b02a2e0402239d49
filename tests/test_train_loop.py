"""The training loop: reproducibility, resume after a simulated kill (bitwise),
early stopping, divergence detection, checkpoint atomicity, metrics."""

import os

import numpy as np
import pytest
import torch
from torch import nn

from dropgeom.data import load_dataset
from dropgeom.train import (
    CHECKPOINT_NAME,
    DropoutNLL,
    EarlyStopping,
    NLL,
    classification_metrics,
    evaluate,
    expected_calibration_error,
    load_checkpoint,
    make_objective,
    save_checkpoint,
    train,
)

D = torch.float64


@pytest.fixture(scope="module")
def data():
    return load_dataset("mlp_teacher", n=160, num_features=5, num_classes=3, seed=0, dtype=D)


def make_net(seed=0, p=0.2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(p), nn.Linear(16, 3)).to(D)


def params_of(net):
    return [p.detach().clone() for p in net.parameters()]


def same_params(a, b):
    return all(torch.equal(x, y) for x, y in zip(params_of(a), params_of(b)))


def strip_times(hist):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in hist.records]


class KillAt(DropoutNLL):
    """Dropout objective that raises on its k-th call (a simulated kill mid-epoch)."""

    def __init__(self, k):
        super().__init__()
        self.k, self.calls = k, 0

    def compute(self, *args):
        self.calls += 1
        if self.calls == self.k:
            raise KeyboardInterrupt("simulated kill")
        return super().compute(*args)

    def __repr__(self):  # same fingerprint as the plain objective
        return repr(DropoutNLL())


def test_same_seed_gives_bitwise_identical_parameters(data):
    runs = []
    for _ in range(2):
        net = make_net()
        h = train(net, data, "dropout", epochs=2, batch_size=32, seed=3, progress=False)
        runs.append((net, h))
    assert same_params(runs[0][0], runs[1][0])
    assert strip_times(runs[0][1]) == strip_times(runs[1][1])
    other = make_net()
    train(other, data, "dropout", epochs=2, batch_size=32, seed=4, progress=False)
    assert not same_params(runs[0][0], other)


@pytest.mark.parametrize(
    "name,options",
    [
        ("none", {}),
        ("l2", {"weight": 1e-2}),
        ("dropout", {"masks": "explicit"}),
        ("gaussian_dropout", {}),
        ("fisher_dropout", {"form": "divergence"}),
        ("fisher_dropout", {"estimator": "mc"}),
    ],
)
def test_every_objective_trains_reproducibly(data, name, options):
    nets = [make_net() for _ in range(2)]
    hs = [train(net, data, name, objective_options=options, epochs=1, batch_size=40, seed=5, progress=False) for net in nets]
    assert same_params(*nets) and strip_times(hs[0]) == strip_times(hs[1])
    assert not same_params(nets[0], make_net())  # it did move
    assert hs[0][-1]["objective_loss"] == pytest.approx(
        sum(
            v
            for k, v in hs[0][-1].items()
            if k
            in ("objective_nll", "objective_l2", "objective_penalty", "objective_nll_dropout", "objective_nll_gaussian_dropout")
        ),
        rel=1e-12,
    )


@pytest.mark.parametrize("kill_call", [11, 15])  # mid-epoch 3 (5 batches/epoch) and the first batch of epoch 3
def test_resume_after_kill_is_bitwise_identical(data, tmp_path, kill_call):
    kw = dict(epochs=4, batch_size=24, seed=1, progress=False, lr=0.01)
    ref = make_net()
    href = train(ref, data, DropoutNLL(), checkpoint_dir=tmp_path / "ref", **kw)
    assert len(href) == 4 and href.finished

    run_dir = tmp_path / "run"
    net = make_net()
    with pytest.raises(KeyboardInterrupt):
        train(net, data, KillAt(kill_call), checkpoint_dir=run_dir, **kw)
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    assert len(state["history"]["records"]) == 2
    assert not [f for f in os.listdir(run_dir) if f != CHECKPOINT_NAME]  # no temp files left

    fresh = make_net(seed=99)  # a different initialisation: the checkpoint decides
    h = train(fresh, data, DropoutNLL(), checkpoint_dir=run_dir, **kw)
    assert h.resumed_from == 2
    assert same_params(fresh, ref)
    assert strip_times(h) == strip_times(href)

    # a finished run is not recomputed
    counter = KillAt(1)
    again = make_net(seed=5)
    h2 = train(again, data, counter, checkpoint_dir=run_dir, **kw)
    assert counter.calls == 0 and same_params(again, ref) and strip_times(h2) == strip_times(href)

    # resume=False starts afresh; a different configuration is refused
    with pytest.raises(ValueError, match="different training"):
        train(make_net(), data, "dropout", checkpoint_dir=run_dir, **{**kw, "seed": 2})


def test_checkpoint_is_atomic_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"epoch": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(tmp_path / "bad.pt")
    assert load_checkpoint(tmp_path / "missing.pt") is None


class NaNAt(NLL):
    def __init__(self, k):
        self.k, self.calls = k, 0

    def compute(self, *args):
        self.calls += 1
        out = super().compute(*args)
        if self.calls >= self.k:
            out.loss = out.loss * float("nan")
        return out


def test_divergence_is_detected_not_raised(data, tmp_path):
    net = make_net()
    h = train(net, data, NaNAt(12), epochs=5, batch_size=24, seed=0, progress=False, checkpoint_dir=tmp_path)
    assert h.diverged and "non-finite loss" in h.divergence and "epoch 3" in h.divergence
    assert len(h) == 2 and h.finished
    # parameters are those after epoch 2: compare with a clean 2-epoch run
    ref = make_net()
    train(ref, data, "none", epochs=2, batch_size=24, seed=0, progress=False)
    assert same_params(net, ref)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["history"]["diverged"]
    # exploding SGD is caught as well
    boom = make_net()
    h = train(
        boom, data, "none", optimizer="sgd", lr=1e7, epochs=3, batch_size=24, seed=0, progress=False, divergence_threshold=1e3
    )
    assert h.diverged and all(torch.isfinite(p).all() for p in boom.parameters())


def test_non_finite_outputs_inside_an_objective_end_the_run_as_diverged(data):
    """Fisher-dropout checks the model's outputs and raises NonFiniteOutputError (a ValueError) when a step sent
    them to overflow: the loop ends the run as diverged (last good parameters back) instead of crashing."""
    from dropgeom import NonFiniteOutputError
    from dropgeom.dropout import penalty

    net = nn.Sequential(nn.Linear(data.x_train.shape[1], 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    x, y = data.x_train.float(), data.y_train
    before = [p.detach().clone() for p in net.parameters()]
    h = train(net, (x, y), "fisher_dropout", optimizer="sgd", lr=1e38, epochs=3, batch_size=24, seed=0, progress=False)
    assert h.diverged and "non-finite model outputs at epoch 1, batch 1" in h.divergence and len(h) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the state before epoch 1
    with torch.no_grad():
        net[0].weight.fill_(float("inf"))
    with pytest.raises(NonFiniteOutputError, match="non-finite"):
        penalty(net, x)  # the public function still raises (a ValueError)


def test_early_stopping_restores_best(data):
    small = load_dataset("mlp_teacher", n=60, num_features=5, num_classes=3, seed=2, label_noise=0.4, dtype=D)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 3)).to(D)
    h = train(
        net, small, "none", lr=0.05, epochs=80, batch_size=16, seed=0, progress=False, early_stopping=EarlyStopping(patience=3)
    )
    assert h.stopped_early and len(h) < 80
    nll = h.metric("test_nll")
    assert h.best_epoch == int(np.argmin(nll)) + 1
    assert len(h) == h.best_epoch + 3
    now = evaluate(net, small.x_test, small.y_test)["nll"]
    assert now == pytest.approx(min(nll), rel=1e-12)
    with pytest.raises(ValueError, match="not among the metrics"):
        train(make_net(), data, "none", epochs=1, progress=False, early_stopping=EarlyStopping(monitor="val_nll"))


def test_records_and_progress(data, capsys):
    net = make_net()
    h = train(net, data, make_objective("l2", weight=1e-3), epochs=2, batch_size=40, seed=0, progress=False)
    r = h[-1]
    for k in (
        "objective_loss",
        "objective_nll",
        "objective_l2",
        "train_nll",
        "train_accuracy",
        "train_ece",
        "test_nll",
        "test_accuracy",
        "test_ece",
        "lr",
        "seconds",
    ):
        assert k in r
    ref = evaluate(net, data.x_test, data.y_test)
    assert r["test_nll"] == ref["nll"] and r["test_accuracy"] == ref["accuracy"]
    assert capsys.readouterr().err == ""
    train(make_net(), data, "none", epochs=1, seed=0, progress=True)
    assert "train" in capsys.readouterr().err


def test_train_validates_its_arguments(data):
    net = make_net()
    with pytest.raises(ValueError, match="epochs"):
        train(net, data, epochs=-1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train(net, data, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="eval_batch_size"):  # refused before training, not after the first epoch
        train(net, data, eval_batch_size=0, progress=False)
    with pytest.raises(ValueError, match="unknown optimizer"):
        train(net, data, optimizer="lbfgs-ish", progress=False)
    with pytest.raises(TypeError, match="Dataset"):
        train(net, [1, 2], progress=False)
    with pytest.raises(ValueError, match="unknown objective"):
        train(net, data, "drop", progress=False)
    # a tuple without a test split trains; early stopping on test_nll is refused
    h = train(net, (data.x_train, data.y_train), epochs=1, progress=False)
    assert "test_nll" not in h[-1]
    with pytest.raises(ValueError, match="no test split"):
        train(net, (data.x_train, data.y_train), epochs=1, progress=False, early_stopping=2)


def test_metrics_against_brute_force():
    g = torch.Generator().manual_seed(0)
    eta = torch.randn(200, 4, generator=g, dtype=D) * 2
    y = torch.randint(0, 4, (200,), generator=g)
    probs = torch.softmax(eta, -1)
    # brute-force ECE: a Python loop over bins (lo, hi]
    conf, pred = probs.max(1)
    ece = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        sel = [(i) for i in range(200) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if sel:
            acc = sum(float(pred[i] == y[i]) for i in sel) / len(sel)
            c = sum(float(conf[i]) for i in sel) / len(sel)
            ece += len(sel) / 200 * abs(acc - c)
    assert expected_calibration_error(probs, y, n_bins=10) == pytest.approx(ece, rel=1e-12)
    m = classification_metrics(eta, y)
    assert m["nll"] == pytest.approx(float(-torch.log(probs[torch.arange(200), y]).mean()), rel=1e-12)
    assert m["accuracy"] == pytest.approx(float((pred == y).double().mean()))
    # bernoulli with one logit is a two-class problem
    mb = classification_metrics(eta[:, :1], (y[:, None] % 2).to(D), "bernoulli")
    s = torch.sigmoid(eta[:, 0])
    assert mb["accuracy"] == pytest.approx(float(((s > 0.5).long() == y % 2).double().mean()))


def test_evaluate_validates_its_arguments():
    net = nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    for bad in (0, -4):  # range(0, n, 0) and an empty torch.cat before
        with pytest.raises(ValueError, match="batch_size must be None or a positive int"):
            evaluate(net, x, y, batch_size=bad)
    with pytest.raises(TypeError, match="x and y must be tensors"):
        evaluate(net, x, [0, 1] * 5)
    assert evaluate(net, x, y, batch_size=3) == pytest.approx(evaluate(net, x, y, batch_size=None))


def test_regression_data_trains_with_the_gaussian_family():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 2, generator=g, dtype=D)
    y = (x @ torch.tensor([[1.5], [-2.0]], dtype=D)) + 0.1 * torch.randn(80, 1, generator=g, dtype=D)
    torch.manual_seed(0)
    net = nn.Linear(2, 1).to(D)
    h = train(
        net,
        (x[:60], y[:60], x[60:], y[60:]),
        "none",
        family="gaussian",
        lr=0.05,
        epochs=30,
        batch_size=20,
        seed=0,
        progress=False,
    )
    assert "test_accuracy" not in h[-1] and h[-1]["test_nll"] < h[0]["test_nll"]
    # the Gaussian NLL (sigma = 1) of the fitted line: 0.5 * mean squared error + 0.5 log(2 pi)
    with torch.no_grad():
        mse = float(((net(x[60:]) - y[60:]) ** 2).mean())
    assert h[-1]["test_nll"] == pytest.approx(0.5 * mse + 0.5 * np.log(2 * np.pi), rel=1e-10)


# --------------------------------------------------------------------------- bitwise resume of every way a run ends
class NaNBelow(NLL):
    """A loss that turns NaN once the batch NLL falls below a level: divergence decided by the state alone."""

    def __init__(self, level):
        self.level = level

    def compute(self, *args):
        out = super().compute(*args)
        if float(out.loss.detach()) < self.level:
            out.loss = out.loss * float("nan")
        return out

    def __repr__(self):
        return f"NaNBelow({self.level})"


def _endings(data):
    """(name, train kwargs) for a run that ends by callback, early stopping, divergence or its epoch count."""
    small = load_dataset("mlp_teacher", n=60, num_features=5, num_classes=3, seed=2, label_noise=0.4, dtype=D)
    return [
        ("epochs", data, dict(objective="dropout", epochs=5)),
        ("callback", data, dict(objective="none", epochs=10, callback=lambda r, m: r["epoch"] >= 3)),
        ("callback_on_fit", data, dict(objective="dropout", epochs=12, callback=lambda r, m: r["train_nll"] <= 0.84)),
        ("early_stopping", small, dict(objective="none", epochs=40, early_stopping=EarlyStopping(patience=2))),
        ("divergence", data, dict(objective=NaNBelow(0.8), epochs=12)),
    ]


@pytest.mark.parametrize("ending", ["epochs", "callback", "callback_on_fit", "early_stopping", "divergence"])
def test_resume_is_bitwise_for_every_ending(data, tmp_path, monkeypatch, ending):
    """Kill after each checkpoint write in turn; every resumed run ends bitwise like the uninterrupted one."""
    import dropgeom.train.loop as loop

    name, ds, kw = next(e for e in _endings(data) if e[0] == ending)
    base = dict(batch_size=24, seed=1, progress=False, checkpoint_every=1, checkpoint_seconds=None, lr=0.02)

    def run(ckpt, **extra):
        k = dict(kw)
        net = make_net()
        h = train(net, ds, k.pop("objective"), checkpoint_dir=ckpt, **base, **k, **extra)
        return net, h

    ref_net, ref = run(tmp_path / "ref")
    assert ref.finished
    how = {"divergence": ref.diverged, "early_stopping": ref.stopped_early, "epochs": len(ref) == kw["epochs"]}
    assert how.get(name, ref.stopped_by_callback) and 2 <= len(ref) <= kw["epochs"]
    saves = len(ref) + (1 if ref.diverged else 0)
    assert saves >= 2
    real_save = loop.save_checkpoint
    for kill_after in range(1, saves):
        ckpt = tmp_path / f"kill{kill_after}"
        count = [0]

        def killing_save(path, state):
            real_save(path, state)
            count[0] += 1
            if count[0] == kill_after:
                raise KeyboardInterrupt("simulated kill")

        monkeypatch.setattr(loop, "save_checkpoint", killing_save)
        with pytest.raises(KeyboardInterrupt):
            run(ckpt)
        monkeypatch.setattr(loop, "save_checkpoint", real_save)
        net, h = run(ckpt)
        assert same_params(net, ref_net), (name, kill_after)
        assert strip_times(h) == strip_times(ref), (name, kill_after)
        assert (h.diverged, h.stopped_early, h.stopped_by_callback) == (ref.diverged, ref.stopped_early, ref.stopped_by_callback)
        # and running it once more does not train any further
        net2, h2 = run(ckpt)
        assert len(h2) == len(ref) and same_params(net2, ref_net)


def test_callback_stop_is_final_on_resume(tmp_path):
    """The issue's minimal case: a run stopped by its callback is not continued by a second call."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 5, dtype=D), torch.randint(0, 3, (64,))
    lens = []
    for _ in range(2):
        net = make_net()
        h = train(net, (x, y), "none", epochs=10, checkpoint_dir=tmp_path, callback=lambda r, m: r["epoch"] >= 3, progress=False)
        lens.append(len(h))
    assert lens == [3, 3] and h.stopped_by_callback
