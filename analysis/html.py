"""A report's Markdown as one self-contained HTML page, which MLflow's artifact viewer renders
(it shows a ``.md`` file as text, so its image links do not load there).

:func:`markdown_to_html` converts the subset of Markdown the reports write: ``#``–``###`` headings,
``- `` lists, GitHub tables (header, ``|---|`` rule, rows), images ``![alt](file.png)`` on a line
of their own, paragraphs, and inline ``**bold**`` and ``` `code` ```. Every image is embedded as a
``data:`` URI read from ``folder``, so the page needs no other file. Text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
from pathlib import Path

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
    "tr.chosen td{background:#fff3c4;font-weight:600}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}"
)
IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")


def inline(text: str) -> str:
    """Escape ``text`` and render its ``**bold**`` and ``` `code` ``` spans."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def image(alt: str, src: str, folder: Path) -> str:
    """An ``<img>`` with ``folder / src`` embedded; a missing file stays a (broken) link, said in its alt."""
    path = folder / src
    if not path.is_file():
        return f'<p><img alt="{html.escape(alt)} (missing: {html.escape(src)})" src="{html.escape(src)}"></p>'
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:{kind};base64,{data}"></p>'


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    """A GitHub table; a row whose every cell is bold is the chosen one (class ``chosen``)."""
    head = "".join(f"<th>{inline(c)}</th>" for c in _cells(lines[0]))
    rows = []
    for line in lines[2:]:
        cells = _cells(line)
        chosen = all(c.startswith("**") and c.endswith("**") for c in cells if c)
        cls = ' class="chosen"' if chosen else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{inline(c)}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def markdown_to_html(markdown: str, folder: Path | str, title: str) -> str:
    """The page for ``markdown`` (see the module docstring), images read from ``folder``."""
    folder = Path(folder)
    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"^(#{1,3}) (.*)$", line):
            level = len(m.group(1))
            body.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
            i += 1
        elif m := IMAGE.match(line.strip()):
            body.append(image(m.group(1), m.group(2), folder))
            i += 1
        elif line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            body.append(_table(lines[i:j]))
            i = j
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            body.append(f"<ul>{''.join(items)}</ul>")
        else:
            para = [line]  # the first line always: a stray "![" or "#x" is text
            i += 1
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#{1,3} |\||- |!\[)", lines[i]):
                para.append(lines[i])
                i += 1
            body.append(f"<p>{inline(' '.join(para))}</p>")
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
