"""docs/theory.md: every "theory.md section N" / "theory.md N.M" cited in the code names a real section."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
THEORY = ROOT / "docs" / "theory.md"
CITING = ["src", "tests", "bench", "docs", "README.md", "DEVELOPERS.md"]

# "theory.md section 4.2", "theory.md sections 4 and 4.4", "theory.md 3", "theory.md sections 1-2"
_CITE = re.compile(r"theory\.md(?:'s)?,?\s+(?:sections?\s+)?(\d+(?:\.\d+)?(?:\s*(?:-|and|,)\s*\d+(?:\.\d+)?)*)")


def _sections() -> set:
    heads = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", THEORY.read_text(), flags=re.M)
    return set(heads)


def _citations():
    files = []
    for entry in CITING:
        path = ROOT / entry
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".py", ".md"))
    for path in files:
        if path == THEORY or path == pathlib.Path(__file__).resolve():
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for match in _CITE.finditer(line):
                for number in re.findall(r"\d+(?:\.\d+)?", match.group(1)):
                    yield f"{path.relative_to(ROOT)}:{lineno}", number


def test_theory_doc_has_numbered_sections():
    assert {"1", "2", "3", "4", "4.1", "4.2", "4.3", "4.4"} <= _sections()


def test_every_cited_section_exists():
    sections = _sections()
    cites = list(_citations())
    assert len(cites) > 40  # the code does cite it
    missing = [f"{where}: theory.md {number}" for where, number in cites if number not in sections]
    assert not missing, "citations of sections docs/theory.md does not have:\n" + "\n".join(missing)


def test_named_paragraphs_cited_by_docstrings_exist():
    text = THEORY.read_text()
    # curvature/embedding.py cites "theory.md practical note", experiments/common.py "Link to section 3"
    for name in ("**Practical note.**", "**Link to section 3.**", "**Enough inputs.**"):
        assert name in text
