"""Sweep names: each is one folder under the sweep storage, so it must be a plain folder name."""

from __future__ import annotations

import re

from lejepa.config import PLAIN_NAME_RULE, is_plain_name
from lejepa.errors import ConfigError


def sanitize_name(name: str) -> str:
    """``name`` made safe as one folder name: runs of characters other than letters, digits, ``_ - .``
    (path separators included) become ``-``, leading and trailing ``-`` and ``.`` go (so no ``..``
    or hidden name is left), at most 128 characters; ``""`` when nothing usable remains."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:128].rstrip("-.")


def check_name(name: str, what: str) -> str:
    """``name`` if it already is a plain folder name (:func:`~lejepa.config.is_plain_name`); else a
    :class:`ConfigError`: a name the user typed is refused, never silently changed into another."""
    if is_plain_name(name):
        return name
    safe = sanitize_name(name)
    raise ConfigError(f"{what} {name!r} is not a plain folder name ({PLAIN_NAME_RULE})" + (f"; e.g. {safe!r}" if safe else ""))
