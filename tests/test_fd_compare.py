"""bench/fd_compare.py: its argument parsing, its data path (one seed, one epoch, a slice of digits) and the
one-line errors for an unknown ``--data`` and a missing Fashion-MNIST (no timing)."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest

import dropgeom.data

HERE = pathlib.Path(__file__).resolve().parent


def _load():
    spec = importlib.util.spec_from_file_location("fd_compare", HERE.parent / "bench" / "fd_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_epoch_on_a_slice_of_digits(capsys, tmp_path):
    fd = _load()
    only = ["none", "dropout", "fisher quadratic"]
    saved = str(tmp_path / "runs.json")
    res = fd.main(["--seeds", "1", "--epochs", "1", "--train-size", "40", "--only", *only, "--json", saved])
    out = capsys.readouterr().out
    assert "digits: 40 training inputs" in out and "1 epochs" in out
    assert list(res) == only and all(len(runs) == 1 for runs in res.values())
    for runs in res.values():
        r = runs[0]
        assert math.isfinite(r["nll"]) and 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["ece"] <= 1.0
        assert r["diverged"] == 0.0
    rows = fd.table(res)
    col = rows[0].index("d NLL vs none")
    d = res["dropout"][0]["nll"] - res["none"][0]["nll"]
    assert rows[2][col].startswith(f"{d:.3f}")  # the paired difference of the same seed
    # paired seeds: the same seed repeats a run exactly (split, initialisation, batch order)
    again = fd.main(["--seeds", "1", "--epochs", "1", "--train-size", "40", "--only", "none"])
    assert again["none"][0]["nll"] == res["none"][0]["nll"]
    assert fd.main(["--merge", saved]) == res  # the table of saved runs
    relu = fd.main(["--seeds", "1", "--epochs", "1", "--train-size", "40", "--only", "none", "--activation", "relu"])
    assert "C3's MLP (relu)" in capsys.readouterr().out and relu["none"][0]["nll"] != res["none"][0]["nll"]


def test_unknown_data_and_objective_are_refused(capsys):
    fd = _load()
    with pytest.raises(SystemExit) as err:
        fd.parse_args(["--data", "cifar10"])
    assert err.value.code == 2 and "invalid choice: 'cifar10'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fd.parse_args(["--only", "fisher"])
    assert "unknown objective(s) ['fisher']" in capsys.readouterr().err
    assert fd.parse_args(["--dataset", "fashion_mnist"]).data == "fashion_mnist"


def test_missing_fashion_mnist_fails_at_once_with_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(dropgeom.data, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(SystemExit) as err:
        _load().main(["--data", "fashion_mnist"])
    msg = str(err.value.code)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "\n" not in msg
