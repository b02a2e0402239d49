"""dropgeom.allocator: freed memory kept in the heap (glibc) when asked for, values unchanged, bad settings named.

The effect is checked by counting the process's minor page faults (a count, not a time) in each of the same
float64 CNN steps in fresh interpreters, with and without the setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dropgeom import allocator
from dropgeom.allocator import ENV_VAR, is_glibc, keep_freed_memory
from dropgeom.experiments import sweep

glibc_only = pytest.mark.skipif(not is_glibc(), reason="mallopt settings exist on Linux with glibc only")

_STEPS = r"""
import hashlib, json, resource, sys
import torch
from dropgeom.allocator import keep_freed_memory
torch.set_num_threads(1)
applied = keep_freed_memory() if sys.argv[1] == "call" else False
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                          torch.nn.Linear(8 * 28 * 28, 10)).double()
x = torch.randn(1000, 1, 28, 28, dtype=torch.float64)  # activations of 48 MiB: above glibc's largest mmap threshold
for _ in range(2):                                      # warm-up: the heap grows to its peak
    net.zero_grad()
    net(x).logsumexp(1).sum().backward()
faults = []                                             # per step: the fewest says what every step costs
for _ in range(8):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net.zero_grad()
    net(x).logsumexp(1).sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
faults = min(faults)
digest = hashlib.sha256(b"".join(p.grad.numpy().tobytes() for p in net.parameters())).hexdigest()
print(json.dumps({"applied": applied, "faults": faults, "digest": digest}))
"""


def _steps(call: bool, env_value: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    if env_value is not None:
        env[ENV_VAR] = env_value
    out = subprocess.run(
        [sys.executable, "-c", _STEPS, "call" if call else "none"], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_keeping_freed_memory_removes_the_page_faults_of_large_tensors_and_changes_no_value():
    base, kept = _steps(call=False), _steps(call=True, env_value="heap")
    assert kept["applied"] is True and base["applied"] is False
    # every step maps its ~48 MiB activations afresh without it (thousands of 4 KiB pages); with it they are
    # reused (a fragmented heap may still grow now and then, hence the fewest faults of any step)
    assert base["faults"] > 2000, base
    assert kept["faults"] < 100, (base, kept)
    assert kept["digest"] == base["digest"]  # bitwise the same gradients


@glibc_only
@pytest.mark.parametrize("env_value", [None, "system", ""])
def test_by_default_and_with_system_glibc_is_left_as_it_is(env_value):
    out = _steps(call=True, env_value=env_value)
    assert out["applied"] is False
    assert out["faults"] > 2000


def test_bad_settings_are_named(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "jemalloc")
    with pytest.raises(ValueError, match="DROPGEOM_MALLOC='jemalloc'.*heap.*system"):
        keep_freed_memory()
    with pytest.raises(TypeError, match="enable must be True, False or None"):
        keep_freed_memory(enable="yes")  # type: ignore[arg-type]


def test_reproduce_applies_it_in_the_main_process_and_in_every_worker(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda enable=None: calls.append(enable) or True)
    from dropgeom.config import RunConfig

    sweep._check_before_writing(RunConfig.from_preset("quick"), "process", None, None)
    assert calls == [None]
    monkeypatch.setattr(sweep, "_run_unit", lambda mod, config, checkpoints, unit: {"key": unit["key"]})
    config = RunConfig.from_preset("quick").to_dict()
    assert sweep._run_unit_in_worker("C1", config, str(tmp_path), None, {"key": "k"}) == {"key": "k"}
    assert calls == [None, None]


def test_a_bad_environment_value_fails_reproduce_before_anything_is_written(monkeypatch, tmp_path):
    from dropgeom.config import RunConfig

    monkeypatch.setenv(ENV_VAR, "tcmalloc")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="DROPGEOM_MALLOC"):
        sweep.run_experiments(RunConfig.from_preset("quick"), out, progress=False)
    assert not out.exists()
