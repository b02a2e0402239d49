"""A self-contained ``report.html`` from ``report.md``: figures embedded as base64 PNG.

Hand-written, deliberately tiny converter for the markdown subset the report
uses (headings, paragraphs, bullet lists, pipe tables, fenced code, images), so
the report needs no markdown package and opens offline in any browser.

Example:
    >>> html = markdown_to_html("# Title\\n\\n| a | b |\\n|---|---|\\n| 1 | 2 |\\n", base=None)
    >>> "<h1>Title</h1>" in html and "<td>1</td>" in html
    True
"""

from __future__ import annotations

import base64
import html as _html
import re
from pathlib import Path
from typing import List, Optional

__all__ = ["markdown_to_html"]

_IMG = re.compile(r"^!\[([^\]]*)\]\(([^)]+)\)$")
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
img { max-width: 100%; }
code { background: #f3f3f3; }
"""


def _inline(text: str) -> str:
    out = _html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return out


def _cells(line: str) -> List[str]:
    body = line.strip().strip("|")
    parts = re.split(r"(?<!\\)\|", body)
    return [p.strip().replace("\\|", "|") for p in parts]


def _image(alt: str, src: str, base: Optional[Path]) -> str:
    if base is not None and (base / src).exists():
        data = base64.b64encode((base / src).read_bytes()).decode("ascii")
        src = f"data:image/png;base64,{data}"
    return f'<figure><img alt="{_html.escape(alt)}" src="{src}"><figcaption>{_html.escape(alt)}</figcaption></figure>'


def markdown_to_html(text: str, base: Optional[Path], title: str = "dropgeom report") -> str:
    """Convert the report's markdown to a standalone HTML page; images under ``base`` are embedded."""
    lines = text.splitlines()
    out: List[str] = []
    i = 0
    para: List[str] = []

    def flush() -> None:
        if para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre><code>" + _html.escape("\n".join(lines[i + 1 : j])) + "</code></pre>")
            i = j + 1
            continue
        m = re.match(r"^(#{1,6}) (.*)$", line)
        if m:
            flush()
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
        elif line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            head, body = _cells(rows[0]), [_cells(r) for r in rows[2:]]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body]
            out.append("</tbody></table>")
            continue
        elif line.startswith("- "):
            flush()
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif _IMG.match(line.strip()):
            flush()
            alt, src = _IMG.match(line.strip()).groups()  # type: ignore[union-attr]
            out.append(_image(alt, src, base))
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>"
        + _html.escape(title)
        + "</title><style>"
        + _STYLE
        + "</style></head><body>\n"
        + "\n".join(out)
        + "\n</body></html>\n"
    )
