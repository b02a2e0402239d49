"""README: the Quickstart is two commands, the test command is exactly CI's, and the tour runs."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_quickstart_is_two_commands_and_ci_runs_the_second():
    quick = _section((ROOT / "README.md").read_text(), "Quickstart")
    commands = re.findall(r"```bash\n(.*?)\n```", quick, flags=re.S)
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    install, tests = commands
    assert install.startswith("python -m pip install -c constraints.txt -e .") and install.endswith("dropgeom reproduce --quick")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci[-1] == tests  # the last step is exactly the README's test command
    assert all("apt-get install" in line for line in ci[:-1])  # before it, only system packages the tests read


def test_readme_tour_runs():
    tour = _section((ROOT / "README.md").read_text(), "A short tour")
    code = re.findall(r"```python\n(.*?)```", tour, flags=re.S)
    assert len(code) == 1
    exec(compile(code[0], "README.md", "exec"), {})
