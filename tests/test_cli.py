"""The command line: --help of every command, clear errors, and values printed by fisher/curvature."""

from __future__ import annotations

import os
import json
import re

import numpy as np
import pytest
import torch

from dropgeom import ModelManifold, fisher
from dropgeom.cli import main

COMMANDS = {
    "reproduce": ["--quick", "--out", "--seeds", "resume"],
    "train": ["--objective", "fisher_dropout", "--p"],
    "fisher": ["--kinds", "--structures", "trace"],
    "curvature": ["--method", "--damping", "mask"],
    "report": ["dir", "nothing is retrained"],
}


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_command_help(cmd, capsys):
    with pytest.raises(SystemExit) as info:
        main([cmd, "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for word in COMMANDS[cmd]:
        assert word in out, (cmd, word)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reproduce", "--seeds", "0"], "positive integer"),
        (["train", "--p", "1.5"], "[0, 1)"),
        (["train", "--objective", "magic"], "invalid choice"),
        (["curvature", "--method", "exact"], "invalid choice"),
        ([], "required"),
    ],
)
def test_invalid_options(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_invalid_config_file_lists_every_problem(tmp_path, capsys):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"epochs": 0, "c3_p": 1.2, "colour": "red"}))
    assert main(["reproduce", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "epochs" in err and "c3_p" in err and "colour" in err
    assert not (tmp_path / "run").exists()


def test_unknown_dataset_is_a_clear_error(capsys):
    assert main(["train", "--data", "no_such_set", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "dropgeom train: error: --data no_such_set: no data set of that name and no such file or folder" in err
    assert "Traceback" not in err and "\n" not in err.strip()
    # the names offered are those --data takes: not the library's format names, which --data refuses
    assert "fashion_mnist" in err and "'npz'" not in err and "mnist," not in err and "a folder holding" in err


@pytest.mark.parametrize("command", ["train", "fisher"])
def test_data_file_of_an_unknown_format_is_named(command, tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("1,2,3\n")
    assert main([command, "--data", str(afile), "--epochs" if command == "train" else "--n", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dropgeom {command}: error: --data {afile} is a file of a format dropgeom does not read")
    assert "a .csv file" in err and "\n" not in err


def test_fisher_on_a_local_data_file(tmp_path, capsys):
    """``dropgeom fisher --data`` reads what ``train --data`` reads (it was digits only); the header names the data
    and says when --n asks for more inputs than there are."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "d.npz"
    np.savez(path, X=torch.randn(40, 3, generator=g).numpy(), y=(torch.arange(40) % 3).numpy())
    argv = ["fisher", "--data", str(path), "--hidden", "4", "--kinds", "exact", "--structures", "dense", "--float64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"MLP 3-4-3 (P=31) on 30 {path} inputs (mean over inputs; --n 512, but {path} has 30 training inputs)" in out
    from dropgeom.data import load_dataset

    ds = load_dataset(str(path), seed=0, dtype=torch.float64)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    ref = fisher(ModelManifold(net, ds.x_train), "exact", "dense").trace()
    assert float(re.search(r"^exact\s+dense\s+(\S+)", out, flags=re.M).group(1)) == pytest.approx(float(ref), rel=1e-3)


def test_report_of_a_missing_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def _value(out: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}\s\s+(\S+)", out, flags=re.M)
    assert m, out
    return float(m.group(1))


def test_fisher_table_trace_matches_dense_reference(capsys):
    assert main(["fisher", "--n", "24", "--hidden", "4", "--kinds", "exact", "--structures", "dense", "diag", "--float64"]) == 0
    out = capsys.readouterr().out
    traces = [float(x) for x in re.findall(r"^exact\s+\w+\s+(\S+)", out, flags=re.M)]
    assert len(traces) == 2
    # reference: the same network (seeded) and a dense Jacobian, F = (1/n) sum_i J_i^T Sigma_i J_i
    from dropgeom.data import load_dataset

    torch.manual_seed(0)
    ds = load_dataset("digits", seed=0, dtype=torch.float64)
    net = torch.nn.Sequential(torch.nn.Linear(64, 4), torch.nn.Tanh(), torch.nn.Linear(4, 10)).double()
    x = ds.x_train[:24]
    J = torch.autograd.functional.jacobian(
        lambda *ps: torch.func.functional_call(net, dict(zip(dict(net.named_parameters()), ps)), (x,)), tuple(net.parameters())
    )
    J = torch.cat([j.reshape(24, 10, -1) for j in J], dim=-1)
    p = torch.softmax(net(x), -1).detach()
    sigma = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ref = torch.einsum("nkp,nkl,nlp->", J, sigma, J).detach() / 24
    for t in traces:
        assert t == pytest.approx(float(ref), rel=1e-3)


def test_curvature_command_matches_library(capsys):
    argv = ["curvature", "--epochs", "0", "--inputs", "30", "--input-dim", "4", "--width", "3", "--method", "dense"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    from dropgeom.config import RunConfig
    from dropgeom.curvature import embedding_curvature
    from dropgeom.experiments.common import build_mlp, curvature_params, prepare_data

    cfg = RunConfig.from_preset("quick", width=3, curvature_inputs=30, input_dim=4)
    data = prepare_data(cfg, 0)
    net = build_mlp(4, 10, 3, 2, "tanh", 0.0, 0)
    m = ModelManifold(net, data.x_curv, "categorical", param_names=curvature_params(net))
    from dropgeom.experiments.common import quantity_name

    assert _value(out, quantity_name("gamma2")) == pytest.approx(float(embedding_curvature(m).gamma2), rel=1e-3)
    damped = _value(out, quantity_name("gamma2_damped"))
    assert damped == pytest.approx(float(embedding_curvature(m, damping=1e-3).gamma2), rel=1e-3)
    assert _value(out, quantity_name("num_params")) == m.num_params
    # quantities in words, no internal keys, no time in the table
    assert "gamma2_damped" not in out and "normal_dim" not in out and "curvature along the mask directions" in out
    assert not re.search(r"^seconds", out, flags=re.M)


def test_reproduce_data_fashion_mnist_missing_is_one_line(tmp_path, monkeypatch, capsys):
    import dropgeom.data as data_mod

    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    assert main(["reproduce", "--preset", "test", "--data", "fashion_mnist", "--only", "C1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "apt-get install -y dataset-fashion-mnist" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_every_command_applies_the_allocator_setting(monkeypatch, capsys):
    """``DROPGEOM_MALLOC`` is read by every command (not only ``reproduce``): a bad value is one line, exit 2,
    before the command runs; ``system`` runs it."""
    monkeypatch.setenv("DROPGEOM_MALLOC", "jemalloc")
    assert main(["report", "/nonexistent-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "DROPGEOM_MALLOC='jemalloc'" in err, err
    monkeypatch.setenv("DROPGEOM_MALLOC", "system")
    assert main(["report", "/nonexistent-run"]) == 2  # now the command itself runs and names the missing folder
    err = capsys.readouterr().err
    assert "DROPGEOM_MALLOC" not in err and "nonexistent-run" in err, err


def test_curvature_depth_1_is_honoured(capsys):
    """--depth 1 measures a one-hidden-layer MLP (it used to run depth 2 silently): P counts both of its layers
    (4x3+3 and 3x10+10), and its mask feeds the linear output layer, so the mask curvature is 0 (theory.md 4.2)."""
    argv = ["curvature", "--epochs", "0", "--inputs", "30", "--input-dim", "4", "--width", "3", "--method", "dense"]
    assert main(argv + ["--depth", "1"]) == 0
    from dropgeom.experiments.common import quantity_name

    out = capsys.readouterr().out
    assert _value(out, quantity_name("num_params")) == 4 * 3 + 3 + 3 * 10 + 10
    assert _value(out, quantity_name("mask_normal_curvature")) == 0.0
    with pytest.raises(SystemExit):
        main(["curvature", "--depth", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["curvature", "--help"])
    assert "number of hidden layers, 1 or more (default 2)" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------- Ctrl-C
def _interrupt_at_epoch(monkeypatch, at: int) -> None:
    """Make ``train`` raise KeyboardInterrupt (a simulated Ctrl-C) when epoch ``at`` starts."""
    import dropgeom.train.loop as loop

    real = loop._train_epoch

    def epoch(run, plan, n):
        if n == at:
            raise KeyboardInterrupt
        return real(run, plan, n)

    monkeypatch.setattr(loop, "_train_epoch", epoch)


def test_train_interrupted_with_out_prints_the_kept_epochs_and_how_to_resume(tmp_path, monkeypatch, capsys):
    argv = ["train", "--data", "iris", "--epochs", "5", "--no-progress", "--out", str(tmp_path / "ck")]
    _interrupt_at_epoch(monkeypatch, 3)
    assert main(argv) == 130
    out, err = capsys.readouterr()
    assert re.findall(r"^([12]) ", out, re.M) == ["1", "2"] and "test_nll" in out  # the table of the finished epochs
    assert f"2 finished epoch(s) are kept in {tmp_path / 'ck' / 'checkpoint.pt'}" in err
    assert "run the same command again to resume" in err
    monkeypatch.undo()
    assert main(argv) == 0  # resumes
    assert re.findall(r"^(\d) ", capsys.readouterr().out, re.M) == ["1", "2", "3", "4", "5"]


def test_train_interrupted_without_out_says_nothing_was_saved(monkeypatch, capsys):
    _interrupt_at_epoch(monkeypatch, 2)
    assert main(["train", "--data", "iris", "--epochs", "5", "--no-progress"]) == 130
    out, err = capsys.readouterr()
    assert re.findall(r"^(\d) ", out, re.M) == ["1"]
    assert "after 1 finished epoch(s); nothing was saved" in err and "--out DIR" in err


def test_fisher_interrupted_prints_the_finished_rows(monkeypatch, capsys):
    import dropgeom

    real, calls = dropgeom.fisher, []

    def fisher(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dropgeom, "fisher", fisher)
    argv = ["fisher", "--hidden", "4", "--n", "16", "--kinds", "empirical", "--structures", "diag", "layer"]
    assert main(argv) == 130
    out, err = capsys.readouterr()
    assert re.search(r"^empirical\s+diag\s+\d", out, re.M) and "layer" not in out
    assert "interrupted after 1 of 2 rows" in err


# --------------------------------------------------------------------------- train options
def _train_options(monkeypatch, argv):
    """The objective and options ``dropgeom train argv`` passes to ``train`` (which is not run)."""
    import dropgeom.train as training

    seen = {}

    def fake_train(model, data, objective, *, objective_options, **kwargs):
        seen.update(objective=objective, options=dict(objective_options))
        return training.History()

    monkeypatch.setattr(training, "train", fake_train)
    assert main(["train", "--data", "iris", "--no-progress", *argv]) == 0
    return seen["objective"], seen["options"]


def test_train_reaches_the_fisher_dropout_options(monkeypatch):
    from dropgeom.train import make_objective

    argv = ["--objective", "fisher_dropout", "--form", "divergence", "--estimator", "unit", "--curvature", "--p", "0.2"]
    name, options = _train_options(monkeypatch, argv)
    assert options == {"p": 0.2, "form": "divergence", "estimator": "unit", "curvature": True}
    obj = make_objective(name, **options)
    assert (str(obj.form), str(obj.estimator), obj.curvature, obj.p) == ("divergence", "unit", True, 0.2)
    assert _train_options(monkeypatch, ["--objective", "fisher_dropout"])[1] == {
        "p": 0.3,
        "form": "quadratic",
        "estimator": "exact",
        "curvature": False,
    }
    assert _train_options(monkeypatch, ["--objective", "l2"])[1] == {"weight": 1e-3}
    assert _train_options(monkeypatch, ["--objective", "none"])[1] == {}


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--objective", "none", "--p", "0.2"],
            "--p does not apply to --objective none (only to dropout, gaussian_dropout, fisher_dropout)",
        ),
        (["--objective", "l2", "--p", "0.2"], "--p does not apply to --objective l2"),
        (["--objective", "l2", "--p", "0"], "--p does not apply to --objective l2"),  # 0.0 == False: still given
        (["--objective", "dropout", "--weight", "0.1"], "--weight does not apply to --objective dropout (only to l2)"),
        (["--objective", "fisher_dropout", "--weight", "0.1"], "--weight does not apply to --objective fisher_dropout"),
        (
            ["--objective", "dropout", "--form", "divergence"],
            "--form does not apply to --objective dropout (only to fisher_dropout)",
        ),
        (["--objective", "gaussian_dropout", "--estimator", "mc"], "--estimator does not apply to --objective gaussian_dropout"),
        (["--objective", "l2", "--curvature"], "--curvature does not apply to --objective l2"),
    ],
)
def test_train_options_of_another_objective_are_errors(argv, message, capsys):
    assert main(["train", "--data", "iris", "--epochs", "1", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dropgeom train: error: {message}" or (err.startswith(f"dropgeom train: error: {message}") and "\n" not in err)


def test_train_prints_train_accuracy_and_calibration(capsys):
    assert main(["train", "--data", "iris", "--epochs", "1", "--no-progress"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[:3] == ["epoch", "objective_loss", "train_nll"]
    for column in ("train_accuracy", "train_ece", "test_nll", "test_accuracy", "test_ece"):
        assert column in header


# --------------------------------------------------------------------------- train: lock, finished target, divergence, log
def test_train_out_is_locked_against_a_second_process(tmp_path, capsys):
    from dropgeom.rundir import RunDir

    out = tmp_path / "ck"
    with RunDir(out).lock():
        code = main(["train", "--data", "iris", "--epochs", "1", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"{out} is in use by another dropgeom process (pid {os.getpid()})" in err
    assert not (out / "checkpoint.pt").exists()
    assert main(["train", "--data", "iris", "--epochs", "1", "--no-progress", "--out", str(out)]) == 0  # released


def test_train_says_when_the_checkpoint_already_reached_the_epochs(tmp_path, capsys):
    argv = ["train", "--data", "iris", "--no-progress", "--out", str(tmp_path / "ck"), "--epochs"]
    assert main(argv + ["3"]) == 0
    assert "nothing to train" not in capsys.readouterr().err
    assert main(argv + ["2"]) == 0
    out, err = capsys.readouterr()
    assert re.findall(r"^(\d) ", out, re.M) == ["1", "2", "3"]
    assert "nothing to train" in err and "already holds 3 epoch(s), at least --epochs 2" in err


def test_train_diverging_in_its_first_epoch_says_so(capsys):
    assert main(["train", "--data", "digits", "--epochs", "2", "--lr", "1e6", "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == ""  # no empty table
    assert err.startswith("training diverged before its first epoch finished: loss") and "--lr" in err


def test_train_writes_no_progress_bar_into_a_log(capsys):
    assert main(["train", "--data", "iris", "--epochs", "2"]) == 0  # standard error is captured: not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err and "train dropout" not in err


# --------------------------------------------------------------------------- help and error wording
def _help(cmd: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_states_defaults_and_what_options_change(capsys):
    fisher = _help("fisher", capsys)
    assert "Fisher kinds (default: all, exact mc empirical)" in fisher
    assert "(default: all, dense diag layer kfac implicit;" in fisher and "(default float32)" in fisher
    train = _help("train", capsys)
    assert "default digits" in train and "a 'label' column" in train and "arrays X and y" in train
    reproduce = _help("reproduce", capsys)
    assert "data set of C1, and of C2 where the config sets no c2_datasets" in reproduce
    assert "whatever --data says" in reproduce


@pytest.mark.parametrize("name", ["csv", "npz", "idx", "mnist"])
def test_train_data_format_names_say_to_give_the_file(name, capsys):
    assert main(["train", "--data", name, "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dropgeom train: error: --data {name} is a file format, not a data set: give the file itself")
    assert "path=" not in err and "\n" not in err


def test_report_of_a_file_says_it_is_not_a_run_folder(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["report", str(afile)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dropgeom report: error: {afile} is a file, not a run directory (a folder `dropgeom reproduce --out` wrote)"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["report", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "a folder dropgeom did not write" in err and "reproduce --out" not in err


def test_a_warning_is_one_line_naming_the_command(monkeypatch, capsys):
    """Warnings raised while a command runs print as ``dropgeom COMMAND: warning: ...`` on one line, like errors
    (Python's format names a source line of dropgeom and repeats it); ``--debug`` keeps Python's format."""
    import warnings

    from dropgeom import cli

    def warn(args, debug):
        warnings.warn("the projection\n  did not converge", RuntimeWarning, stacklevel=2)
        return 0

    monkeypatch.setattr(cli, "_dispatch", warn)
    assert cli.main(["report", "somewhere"]) == 0
    err = capsys.readouterr().err
    assert err == "dropgeom report: warning: the projection did not converge\n"
    with pytest.warns(RuntimeWarning, match="did not converge"):  # --debug: Python's warning machinery
        assert cli.main(["report", "somewhere", "--debug"]) == 0
    assert warnings.showwarning is not None and getattr(warnings.showwarning, "func", None) is not cli._show_warning
