"""bench/gpu_check.py runs here on the CPU (``--device cpu``), so its logic is tested
before it meets a GPU: every kind x structure agrees with the float64 reference."""

from __future__ import annotations

import importlib.util
import pathlib

import torch

HERE = pathlib.Path(__file__).resolve().parent


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", HERE.parent / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_logic_on_cpu(capsys):
    gpu_check = _load()
    assert gpu_check.main(["--device", "cpu", "--dtype", "float64", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "FAIL" not in out
    assert out.count("True") == 2 * len(gpu_check.KINDS) * len(gpu_check.STRUCTURES) + 5  # every row on the device


def test_gpu_check_refuses_missing_cuda(capsys):
    if torch.cuda.is_available():
        return  # on a GPU machine the CUDA run is the real check
    assert _load().main(["--device", "cuda"]) == 2
