"""Plain-text tables and cells: the sweep's dry-run, progress and summary tables, `lejepa archs` and `lejepa runs`."""

from __future__ import annotations

from typing import Any

import yaml


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned plain-text columns (None as "-", floats as %.4g, other values as one-line YAML)."""
    cells = [[_cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def short(value: Any) -> str:
    """``value`` on one line as YAML (a float as %g), at most 80 characters: for messages and sampled values."""
    if isinstance(value, float):
        return f"{value:g}"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


def fmt(value: Any) -> str:
    """A value in a progress or summary line: a float as %.4g, anything else as ``str``."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else short(value)
