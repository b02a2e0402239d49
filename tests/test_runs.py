"""Runs that survive their users: Ctrl-C, kill -9, locks, owned folders, incomplete runs, one-line CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dropgeom
from dropgeom.cli import main
from dropgeom.config import RunConfig
from dropgeom.experiments import EXPERIMENTS
from dropgeom.pipeline import render_run, reproduce
from dropgeom.rundir import MARKER, RunDir, RunDirError, atomic_write_text

LINUX = sys.platform.startswith("linux")
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
SRC = str(Path(dropgeom.__file__).resolve().parents[1])


# --------------------------------------------------------------------------- helpers
def _children(pid: int) -> list:
    """Pids whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie has stopped running


def _start_sweep(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [
        sys.executable,
        "-m",
        "dropgeom",
        "reproduce",
        "--preset",
        "test",
        "--out",
        str(out),
        "--workers",
        "2",
        "--no-progress",
    ]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()  # not multiprocessing's resource tracker
    except OSError:
        return False


def _wait_for_workers(proc: subprocess.Popen, n: int = 2, timeout: float = 120.0) -> list:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        kids = [pid for pid in _children(proc.pid) if _is_worker(pid)]
        if len(kids) >= n:
            return kids
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("the workers did not start")


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _wait_until_busy(pids: list, cpu: float = 2.5, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and min(_cpu_seconds(p) for p in pids) < cpu:
        time.sleep(0.1)


# --------------------------------------------------------------------------- 1. interrupts
@pytest.mark.skipif(not LINUX, reason="reads /proc")
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_workers_fast_with_one_line(tmp_path, presses):
    proc = _start_sweep(tmp_path / "run")
    workers = _wait_for_workers(proc)
    _wait_until_busy(workers)  # past importing torch: computing their first units
    t0 = time.monotonic()
    for _ in range(presses):
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole process group
        time.sleep(0.05)
    _, err = proc.communicate(timeout=30)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 130, err
    assert elapsed < 10, elapsed
    lines = [line for line in err.splitlines() if line.strip()]
    # one line per Ctrl-C at most (the second one says it exits at once), never a traceback
    assert 1 <= len(lines) <= presses and all("interrupted" in line for line in lines) and "Traceback" not in err, err
    time.sleep(0.5)
    assert all(_gone(pid) for pid in workers), "a worker outlived the interrupted sweep"
    if presses == 1:
        sessions = json.loads((tmp_path / "run" / "timings.json").read_text())["sessions"]
        assert [s["status"] for s in sessions] == ["interrupted"]


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_workers_die_with_their_parent_on_kill_9(tmp_path):
    proc = _start_sweep(tmp_path / "run")
    workers = _wait_for_workers(proc)
    time.sleep(0.5)
    proc.kill()  # SIGKILL: no cleanup code runs in the parent
    proc.communicate(timeout=30)
    t0 = time.monotonic()
    while not all(_gone(pid) for pid in workers) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in workers), "workers survived kill -9 of their parent"
    # the killed invocation is in timings.json, and the lock it held is taken over
    sessions = json.loads((tmp_path / "run" / "timings.json").read_text())["sessions"]
    assert [s["status"] for s in sessions] == ["running"]
    with RunDir(tmp_path / "run").lock():
        pass


# --------------------------------------------------------------------------- 3. owned, locked run directories
def test_a_second_process_on_the_same_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    with RunDir.claim(out).lock():
        code = main(["reproduce", "--preset", "test", "--out", str(out), "--no-progress", "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and f"in use by another dropgeom process (pid {os.getpid()})" in err
    assert not (out / "config.json").exists()


def test_a_stale_lock_is_taken_over(tmp_path):
    rd = RunDir.claim(tmp_path / "run")
    (rd.root / ".lock").write_text("999999999\n")  # left by a process that no longer exists
    with rd.lock():
        assert (rd.root / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
            with RunDir(rd.root).lock():
                pass


def test_a_foreign_folder_is_never_written(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "figures").mkdir(parents=True)
    (mine / "report.md").write_text("my own notes")
    (mine / "figures" / "a.png").write_bytes(b"mine")
    code = main(["reproduce", "--preset", "test", "--out", str(mine), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "did not create" in err
    assert (mine / "report.md").read_text() == "my own notes" and (mine / "figures" / "a.png").read_bytes() == b"mine"
    assert sorted(p.name for p in mine.iterdir()) == ["figures", "report.md"]
    # an empty folder is fine, and becomes a marked run directory
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (RunDir.claim(empty).root / MARKER).exists()
    # a training checkpoint folder holding anything but checkpoint.pt is refused too
    code = main(["train", "--data", "iris", "--epochs", "1", "--out", str(mine), "--no-progress"])
    assert code == 2 and "did not create" in capsys.readouterr().err


def test_claims_run_one_at_a_time_into_one_folder_add_up(tmp_path, capsys):
    """--only is not part of a run's identity: --only C3, then --only C1 into the same folder reuses C3's units,
    adds C1's, and the report shows both claims; another option still refuses the folder, in words of a folder."""
    out = tmp_path / "run"
    base = ["reproduce", "--preset", "test", "--out", str(out), "--no-progress", "--workers", "1"]
    assert main(base + ["--only", "C3"]) == 0
    rd = RunDir(out)
    c3 = {p.name: p.stat().st_mtime_ns for p in (out / "units" / "C3").iterdir()}
    assert c3 and rd.load_config().experiments == ("C3",)
    capsys.readouterr()
    assert main(base + ["--only", "C1"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "units" / "C3").iterdir()} == c3  # not redone
    assert rd.load_config().experiments == ("C1", "C3")
    assert rd.records("C1")
    report = (out / "report.md").read_text()
    assert "C1" in report and "C3a" in report
    sessions = json.loads((out / "timings.json").read_text())["sessions"]
    assert list(sessions[-1]["experiments"]) == ["C1"]
    capsys.readouterr()
    assert main(base + ["--only", "C1", "--seeds", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "already holds a run of another config (it differs in seeds)" in err
    assert "invalid configuration" not in err


# --------------------------------------------------------------------------- 4. incomplete runs
def test_incomplete_run_gives_provisional_verdicts_and_no_verdict_without_data(tmp_path):
    cfg = RunConfig.from_preset("test", experiments=["C3", "C1"], c3_objectives=["none", "dropout"], epochs=2)
    n_c3, n_c1 = len(EXPERIMENTS["C3"].units(cfg)), len(EXPERIMENTS["C1"].units(cfg))
    seen = []

    def stop_after_two(key):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(key)

    with pytest.raises(KeyboardInterrupt):
        reproduce(cfg, tmp_path, progress=False, on_compute=stop_after_two)
    report = render_run(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("verdict", "verdict_b"):
        assert summary["C3"][key]["verdict"].startswith(f"provisional (2 of {n_c3} units): ")
    assert summary["C3"]["units_finished"] == 2 and summary["C3"]["units_expected"] == n_c3
    assert summary["C1"]["verdict"]["verdict"] == f"no data (0 of {n_c1} units)"
    text = report.read_text()
    assert "This run is incomplete" in text and f"**Incomplete: 2 of {n_c3} units finished.**" in text
    assert "every run finished" not in text and "have not run yet" in text
    assert json.loads((tmp_path / "timings.json").read_text())["sessions"][0]["status"] == "interrupted"


# --------------------------------------------------------------------------- 5. one-line errors
def _npz(tmp_path: Path, kind: str) -> Path:
    rng = np.random.default_rng(0)
    good = tmp_path / "good.npz"
    np.savez(good, X=rng.normal(size=(40, 3)), y=rng.integers(0, 2, 40))
    raw = good.read_bytes()
    path = tmp_path / f"{kind}.npz"
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "flipped":
        flipped = bytearray(raw)
        flipped[200] ^= 0xFF
        path.write_bytes(bytes(flipped))
    else:
        path.write_bytes(rng.bytes(200))
    return path


def _case(name: str, tmp_path: Path) -> list:
    """The argv of one broken invocation (files prepared under ``tmp_path``)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    quick = ["--preset", "test", "--no-progress", "--workers", "1"]
    if name == "out_is_file":
        return ["reproduce", *quick, "--out", str(afile)]
    if name == "out_under_file":
        return ["reproduce", *quick, "--out", str(afile / "sub")]
    if name == "train_out_is_file":
        return ["train", "--data", "iris", "--epochs", "1", "--no-progress", "--out", str(afile)]
    if name == "train_out_under_file":
        return ["train", "--data", "iris", "--epochs", "1", "--no-progress", "--out", str(afile / "sub")]
    if name.startswith("config_"):
        text = {"config_null": "null", "config_list": "[1, 2]", "config_str": '"abc"', "config_binary": None}[name]
        cfg = tmp_path / "cfg.json"
        if text is None:
            cfg.write_bytes(b"\xff\xfe\x00garbage")
        else:
            cfg.write_text(text)
        return ["reproduce", *quick, "--config", str(cfg), "--out", str(tmp_path / "run")]
    if name.startswith("npz_"):
        return ["train", "--data", str(_npz(tmp_path, name[4:])), "--epochs", "1", "--no-progress"]
    if name == "corrupt_checkpoint":
        ck = tmp_path / "ck"
        ck.mkdir()
        (ck / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
        return ["train", "--data", "iris", "--epochs", "1", "--no-progress", "--out", str(ck)]
    if name == "checkpoint_of_another_training":
        ck = tmp_path / "ck"
        assert main(["train", "--data", "iris", "--epochs", "1", "--no-progress", "--out", str(ck)]) == 0
        return ["train", "--data", "iris", "--epochs", "1", "--no-progress", "--out", str(ck), "--seed", "1"]
    if name == "report_of_a_foreign_folder":
        return ["report", str(tmp_path)]
    raise KeyError(name)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("out_is_file", "is a file"),
        ("out_under_file", "lies under a file"),
        ("train_out_is_file", "is a file"),
        ("train_out_under_file", "lies under a file"),
        ("config_null", "must hold a JSON object"),
        ("config_list", "must hold a JSON object"),
        ("config_str", "must hold a JSON object"),
        ("config_binary", "cannot read --config"),
        ("npz_truncated", "truncated or corrupt"),
        ("npz_flipped", "truncated or corrupt"),
        ("npz_random", "not an npz file"),
        ("corrupt_checkpoint", "unreadable (truncated or corrupt"),
        ("checkpoint_of_another_training", "belongs to a different training"),
        ("report_of_a_foreign_folder", "not a run directory"),
    ],
)
def test_cli_errors_are_one_line(name, expected, tmp_path, capsys):
    argv = _case(name, tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err and expected in err, err
    assert err.startswith(f"dropgeom {argv[0]}: error: ")
    assert "allow_pickle" not in err and "resume=False" not in err
    with pytest.raises(Exception):  # noqa: B017  --debug shows the real exception (and its traceback)
        main(["--debug", *argv])


@pytest.mark.skipif(ROOT, reason="root may write into read-only folders")
@pytest.mark.parametrize("cmd", ["reproduce", "train", "report"])
def test_read_only_folders_are_one_line_errors(cmd, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    if cmd == "report":  # a finished-looking run that cannot be written
        RunDir.claim(ro).init(RunConfig.from_preset("test", experiments=["C3"]))
    ro.chmod(0o555)
    try:
        argv = {
            "reproduce": ["reproduce", "--preset", "test", "--no-progress", "--out", str(ro / "new")],
            "train": ["train", "--data", "iris", "--epochs", "1", "--no-progress", "--out", str(ro / "new")],
            "report": ["report", str(ro)],
        }[cmd]
        code = main(argv)
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "value, expected", [("-1", "argument --seed"), (str(2**70), "argument --seed"), ("x", "argument --seed")]
)
def test_seed_errors_name_the_argument(value, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--seed", value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and expected in err and "Overflow" not in err and "Traceback" not in err


# --------------------------------------------------------------------------- 2. bitwise resume of a sweep
def _untimed(obj):
    """A record without its wall-clock fields ("seconds", at any depth): everything else must match bitwise."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _records(out: Path) -> list:
    return [_untimed(r) for r in RunDir(out).records("C1")]


@pytest.mark.parametrize("kill_at", ["dropout_training", "after_matched_fit"])
def test_killed_and_resumed_sweep_gives_the_same_records(tmp_path, monkeypatch, kill_at):
    """C1's unit trains with dropout, then plain training stopped by a callback at the same train NLL
    (the case that used to train one epoch more after a resume); killed inside either, the resumed
    sweep stores bitwise the record of an uninterrupted one."""
    import dropgeom.train.loop as loop

    cfg = RunConfig.from_preset(
        "test", experiments=["C1"], seeds=1, c1_p_grid=[0.5], width=4, input_dim=4, curvature_inputs=10, epochs=8, lr=0.05
    )
    real_save, count = loop.save_checkpoint, [0]

    def counting_save(path, state):
        real_save(path, state)
        count[0] += 1

    monkeypatch.setattr(loop, "save_checkpoint", counting_save)
    reproduce(cfg, tmp_path / "ref", progress=False, render=False)
    ref = _records(tmp_path / "ref")
    assert ref[0]["matched"]["epochs_run"] < cfg.epochs  # the matched fit is stopped by its callback
    # the last save is the matched fit's final checkpoint: a kill then falls in its curvature measurement
    kill_after_save = {"dropout_training": 2, "after_matched_fit": count[0]}[kill_at]
    count[0] = 0

    def killing_save(path, state):
        real_save(path, state)
        count[0] += 1
        if count[0] == kill_after_save:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(loop, "save_checkpoint", killing_save)
    with pytest.raises(KeyboardInterrupt):
        reproduce(cfg, tmp_path / "run", progress=False, render=False)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert _records(tmp_path / "run") == []
    reproduce(cfg, tmp_path / "run", progress=False, render=False)
    assert _records(tmp_path / "run") == ref
    sessions = json.loads((tmp_path / "run" / "timings.json").read_text())["sessions"]
    assert [s["status"] for s in sessions] == ["interrupted", "finished"]


def test_read_only_paths_as_any_user_are_one_line_errors(tmp_path, monkeypatch, capsys):
    """The same failures simulated (root may write anywhere): a folder reported not writable, a write refused."""
    import dropgeom.rundir as rundir

    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)
    code = main(["reproduce", "--preset", "test", "--no-progress", "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "not writable (read-only)" in err
    monkeypatch.undo()

    run = tmp_path / "run"
    RunDir.claim(run).init(RunConfig.from_preset("test", experiments=["C3"]))

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(rundir, "atomic_write_bytes", refuse)
    code = main(["report", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("dropgeom report: error: Permission denied: ")


def test_progress_line_names_the_claim_units_and_eta(tmp_path):
    from dropgeom.experiments.sweep import ProgressLine

    rd = RunDir.claim(tmp_path)
    rd.save_unit("C1", "a", {"status": "ok", "seconds": 10.0})
    plan = [("C1", [{"key": "a"}, {"key": "b"}]), ("C3", [{"key": "c"}, {"key": "d"}, {"key": "e"}])]
    line = ProgressLine(rd, plan, workers=2, enabled=False)
    assert line.text().startswith("C1 (claim 1 of 2) | 1/5 units | elapsed 0 s | ETA 20 s")  # 4 units x 10 s / 2 workers
    line.start("b")
    assert line.text().endswith("running b")
    line.done("b", {"status": "ok", "seconds": 30.0})  # C1 now averages 20 s a unit
    line.set_claim("C3")
    assert line.text().startswith("C3 (claim 2 of 2) | 2/5 units") and "ETA 30 s" in line.text()  # 3 units x 20 s / 2


def test_progress_eta_times_each_unit_kind_apart(tmp_path):
    """C3's cheap and dear units: the ETA uses the mean of the unit's own kind (its key without ``seed=N``) and says
    for how many units of kinds not timed yet it guessed."""
    from dropgeom.experiments.sweep import ProgressLine

    assert ProgressLine.kind("grad/digits-mlp-n300-adam/seed=3") == "grad/digits-mlp-n300-adam"
    assert ProgressLine.kind("p=0.1/seed=12") == "p=0.1" and ProgressLine.kind("seed=1") == ""
    rd = RunDir.claim(tmp_path)
    rd.save_unit("C3", "cheap/seed=0", {"status": "ok", "seconds": 2.0, "key": "cheap/seed=0"})
    rd.save_unit("C3", "dear/seed=0", {"status": "ok", "seconds": 200.0, "key": "dear/seed=0"})
    plan = [("C3", [{"key": f"{k}/seed={s}"} for k in ("cheap", "dear") for s in range(3)])]
    line = ProgressLine(rd, plan, workers=1, enabled=False)
    assert line.eta() == pytest.approx(2 * 2.0 + 2 * 200.0, abs=1.0)  # not 4 x the claim's mean of 101 s
    assert "guessed" not in line.text()
    plan.append(("C3", [{"key": "new/seed=0"}]))
    line = ProgressLine(rd, [("C3", plan[0][1] + plan[1][1])], workers=1, enabled=False)
    assert line.eta() == pytest.approx(404.0 + 101.0, abs=1.0) and "(1 units of kinds not timed yet guessed)" in line.text()
    line.done("dear/seed=1", {"status": "ok", "seconds": 100.0})
    assert line.eta() == pytest.approx(2.0 + 150.0 + 2.0 + (2.0 + 150.0) / 2, abs=1.0)


def test_progress_writes_plain_lines_when_not_a_terminal(tmp_path):
    """A log file or a cluster job's output gets one line per claim and per finished unit, no carriage returns;
    a terminal gets the refreshed single line (tqdm)."""
    import io

    from dropgeom.experiments.sweep import ProgressLine

    rd = RunDir.claim(tmp_path)
    plan = [("C1", [{"key": "a"}, {"key": "b"}]), ("C2", [{"key": "c"}])]
    out = io.StringIO()
    line = ProgressLine(rd, plan, workers=1, stream=out)
    line.start("a")
    line.done("a", {"status": "ok", "seconds": 4.0})
    line.set_claim("C2")
    line.set_claim("C2")  # no change: no new line
    line.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 3, text
    assert lines[0].startswith("C1 (claim 1 of 2) | 0/3 units")
    assert lines[1].startswith("C1 (claim 1 of 2) | 1/3 units") and lines[1].endswith("| finished a (ok)")
    assert lines[2].startswith("C2 (claim 2 of 2) | 1/3 units") and "ETA 8 s" in lines[2]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    bar = ProgressLine(rd, plan, workers=1, stream=term)
    assert bar.bar is not None and bar.log is None
    bar.close()


def test_atomic_write_text_refuses_bytes(tmp_path):
    with pytest.raises(TypeError, match="text must be a str, got bytes"):  # an AttributeError (no .encode) before
        atomic_write_text(tmp_path / "a.txt", b"hi")
    assert not (tmp_path / "a.txt").exists()
