"""The project documents the maths its docstrings cite: every ``docs/method.md §n`` in the code
names a section that exists."""

from __future__ import annotations

import re

from helpers import REPO


def test_every_cited_method_section_exists():
    sections = set(re.findall(r"^## §(\d+) ", (REPO / "docs" / "method.md").read_text(), flags=re.M))
    cited: dict[str, set[str]] = {}
    stale = []
    for folder in ("lejepa", "sweeps", "analysis", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            stale += [path] if "REFERENCE §" in text else []  # the old, out-of-project citation
            for n in re.findall(r"docs/method\.md §(\d+)", text):
                cited.setdefault(n, set()).add(str(path.relative_to(REPO)))
    assert cited, "no docstring cites docs/method.md"
    assert set(cited) <= sections, {n: files for n, files in cited.items() if n not in sections}
    assert not stale
