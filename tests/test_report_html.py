"""The selection report as a page MLflow renders (analysis/html.py) and the pick it marks.

The page is parsed back with the standard library's ``html.parser`` (an independent reader) and
its embedded figures decoded and compared byte for byte with the PNG files.
"""

from __future__ import annotations

import base64
from html.parser import HTMLParser

from analysis.html import markdown_to_html
from analysis.report import REPORT_HTML, analyse, terminal_table, write_report

from helpers import hand_made_sweep

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


class Page(HTMLParser):
    """Headings, table rows (class and cell texts), list items and image sources of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.rows: list[tuple[str | None, list[str]]] = []
        self.items: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.strong: list[str] = []
        self._text: list[str] | None = None
        self._tag: str | None = None
        self._strong_from = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("h1", "h2", "h3", "li", "td", "th"):
            self._tag, self._text = tag, []
        if tag == "strong":
            self._strong_from = len(self._text) if self._text is not None else 0
        if tag == "tr":
            self.rows.append((dict(attrs).get("class"), []))
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if self._text is None or tag not in ("h1", "h2", "h3", "li", "td", "th", "strong"):
            return
        text = "".join(self._text)
        if tag in ("h1", "h2", "h3"):
            self.headings.append(text)
        elif tag == "li":
            self.items.append(text)
        elif tag in ("td", "th"):
            self.rows[-1][1].append(text)
        elif tag == "strong":
            self.strong.append("".join(self._text[self._strong_from :]))
            return  # inside a cell or item: keep collecting it
        self._text = None


def _page(markdown: str, folder) -> Page:
    page = Page()
    page.feed(markdown_to_html(markdown, folder, "t"))
    return page


def test_every_construct_the_reports_write(tmp_path):
    (tmp_path / "fig.png").write_bytes(PNG)
    md = "\n".join(
        [
            "# Title with `code` & <b>",
            "",
            "- one **bold** item",
            "- two",
            "",
            "## Table",
            "",
            "| score | acc % |",
            "|---|---|",
            "| loss | 61.0 |",
            "| **loss/λ^0.4** | **72.5** |",
            "",
            "A paragraph",
            "over two lines.",
            "",
            "![a figure](fig.png)",
            "![gone](missing.png)",
        ]
    )
    page = _page(md, tmp_path)
    assert page.headings == ["Title with code & <b>", "Table"]
    assert page.items == ["one bold item", "two"] and "bold" in page.strong
    assert page.rows == [(None, ["score", "acc %"]), (None, ["loss", "61.0"]), ("chosen", ["loss/λ^0.4", "72.5"])]
    embedded, missing = page.images
    assert embedded["alt"] == "a figure" and embedded["src"].startswith("data:image/png;base64,")
    assert base64.b64decode(embedded["src"].split(",", 1)[1]) == PNG
    assert missing["src"] == "missing.png" and "missing" in missing["alt"]
    assert "<p>A paragraph over two lines.</p>" in markdown_to_html(md, tmp_path, "t")


def test_a_stray_image_marker_or_hash_is_text_not_a_hang(tmp_path):
    page = markdown_to_html("![not closed\n#nospace\n", tmp_path, "t")
    assert "<p>![not closed #nospace</p>" in page


def test_the_report_names_its_accuracy_and_marks_the_score_that_picked(tmp_path):
    a = analyse(hand_made_sweep(), n_boot=50)
    a.pick_score = "safe_loss"
    text = terminal_table(a)
    header = text.splitlines()[1]
    assert "acc % (frozen probe)" in header or "acc % (online probe)" in header
    chosen = [line for line in text.splitlines() if "◀ chosen" in line]
    assert len(chosen) == 1 and chosen[0].lstrip().startswith("training loss, healthy only")

    report = write_report(a, tmp_path)
    md = report.read_text()
    assert "**The pick was made by training loss, healthy only** (row marked ◀ chosen)." in md
    page = Page()
    page.feed((tmp_path / REPORT_HTML).read_text())
    chosen_rows = [cells for cls, cells in page.rows if cls == "chosen"]
    assert len(chosen_rows) == 1 and chosen_rows[0][0] == "training loss, healthy only" and chosen_rows[0][-1] == "◀ chosen"
    figures = [i for i in page.images if i["src"].startswith("data:image/png;base64,")]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(figures) == len(pngs) == md.count("![") > 0  # every figure of report.md, embedded
    assert {base64.b64decode(i["src"].split(",", 1)[1]) for i in figures} == {(tmp_path / p).read_bytes() for p in pngs}
