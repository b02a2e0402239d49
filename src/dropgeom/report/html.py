r"""A self-contained ``report.html`` from ``report.md``: figures embedded as base64 PNG, formulas as MathML.

Markdown is rendered by ``markdown-it-py`` (CommonMark with GitHub tables);
``$...$`` and ``$$...$$`` become MathML through ``mdit-py-plugins``'
dollarmath and ``latex2mathml`` (a ``$`` followed by a digit or a space is
left alone, so prices and shell prompts stay text), so the page needs no
script and opens offline in any current browser. Images under ``base`` are
inlined as ``data:`` URIs and shown as figures with their alt text as the
caption.

Example:
    >>> html = markdown_to_html("# Title\n\n| a | b |\n|---|---|\n| 1 | $\\gamma^2$ |\n", base=None)
    >>> "<h1>Title</h1>" in html and "<td>1</td>" in html and "<math" in html
    True
"""

from __future__ import annotations

import base64
import html as _html
import mimetypes
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

__all__ = ["markdown_to_html", "latex_to_mathml"]

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #333; max-width: 900px; }
code { background: #f3f3f3; }
.math.block { margin: 0.8em 0; }
"""


def latex_to_mathml(tex: str, display: bool = False) -> str:
    """MathML for a LaTeX formula (``latex2mathml``); a formula it cannot parse is shown as code.

    Example:
        >>> latex_to_mathml("x^2").startswith("<math")
        True
    """
    from latex2mathml.converter import convert

    try:
        return convert(tex, display="block" if display else "inline")
    except Exception:  # noqa: BLE001 - an unsupported macro: keep the source visible rather than fail the report
        return f"<code>{_html.escape(tex)}</code>"


def _renderer() -> Any:
    from markdown_it import MarkdownIt
    from mdit_py_plugins.dollarmath import dollarmath_plugin

    md = MarkdownIt("commonmark", {"html": False, "typographer": False}).enable("table")
    dollarmath_plugin(
        md,
        allow_space=False,
        allow_digits=False,
        double_inline=True,
        renderer=lambda content, opts: latex_to_mathml(content, bool(opts.get("display_mode"))),
    )
    return md


def _embed(src: str, base: Optional[Path]) -> str:
    if base is not None and "://" not in src and not src.startswith("data:") and (base / src).is_file():
        mime = mimetypes.guess_type(src)[0] or "image/png"
        return f"data:{mime};base64," + base64.b64encode((base / src).read_bytes()).decode("ascii")
    return src


def markdown_to_html(text: str, base: Optional[Path], title: str = "dropgeom report") -> str:
    """Convert the report's markdown to a standalone HTML page; images under ``base`` are embedded.

    Raises:
        ImportError: ``markdown-it-py``, ``mdit-py-plugins`` or ``latex2mathml`` is not installed
            (they are dependencies of dropgeom).
    """
    md = _renderer()

    def image(renderer: Any, tokens: Sequence[Any], idx: int, options: Dict[str, Any], env: Any) -> str:
        tok = tokens[idx]
        alt = "".join(child.content for child in (tok.children or []))
        src = _embed(str(tok.attrGet("src") or ""), base)
        caption = f"<figcaption>{_html.escape(alt)}</figcaption>" if alt else ""
        return f'<figure><img alt="{_html.escape(alt)}" src="{_html.escape(src)}">{caption}</figure>'

    md.add_render_rule("image", image)
    body = md.render(text)
    # a paragraph holding only a figure: drop the <p> around it (a <figure> may not sit inside a <p>)
    body = body.replace("<p><figure>", "<figure>").replace("</figure></p>", "</figure>")
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>'
        + _html.escape(title)
        + "</title><style>"
        + _STYLE
        + "</style></head><body>\n"
        + body
        + "\n</body></html>\n"
    )
