"""Lint, format and type check, run as part of the test suite (issue #8, item 9).

``.ci/run`` runs exactly the README's test command, so the checks a maintained
project keeps in CI live here: ``ruff check`` (the rules in ``[tool.ruff.lint]``),
``ruff format --check`` and ``mypy`` on the public API (``[tool.mypy]``). The tool
versions are pinned in ``constraints.txt`` so that a new release cannot turn CI red
on unchanged code. A test is skipped, not failed, when its tool is not installed
(a user who installed only ``dropgeom``); the ``test`` extra installs both.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
from typing import List

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHECKS = {
    "ruff check": ("ruff", ["check", "--no-cache", "src", "tests", "bench"]),
    "ruff format": ("ruff", ["format", "--check", "--no-cache", "src", "tests", "bench"]),
    "mypy (public API)": ("mypy", ["--no-incremental"]),
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_tool_is_clean(name: str) -> None:
    module, args = CHECKS[name]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -c constraints.txt -e '.[test]')")
    cmd: List[str] = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"`{' '.join(cmd[2:])}` found problems:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
