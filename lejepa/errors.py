"""User-facing errors.

Every error a user can cause by bad input (config, data, architecture names, checkpoints,
sweep specs) is a :class:`LejepaError`. Its message is one line that names the problem and
what is allowed; the CLI prints it as ``error: <message>`` and exits with ``exit_code``
(2 for bad input) without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LejepaError(Exception):
    """Base class for errors caused by the user's input or environment."""

    exit_code = 2

    def one_line(self) -> str:
        """The message as one line. Raised in a DataLoader worker, PyTorch re-raises the error in
        the main process with the worker's traceback as its message; its last line is ours."""
        text = str(self).strip()
        if "Original Traceback" in text:
            last = text.splitlines()[-1]
            prefix = f"{type(self).__module__}.{type(self).__name__}: "
            return last.removeprefix(prefix).removeprefix(f"{type(self).__name__}: ")
        return " ".join(text.splitlines())


class ConfigError(LejepaError):
    """A config file, override or sweep spec is malformed or has a bad value."""


class DataError(LejepaError):
    """A dataset is unknown, missing on disk, or malformed."""


class ArchitectureError(LejepaError):
    """An architecture name is unknown or cannot run at the requested resolution."""


class CheckpointError(LejepaError):
    """A checkpoint is missing, corrupt, or does not match the model."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The up to ``n`` candidates closest to ``name`` (difflib ratio), best first."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not found:
        lowered = name.lower()
        found = [c for c in candidates if lowered in c.lower()][:n]
    return found


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A suffix like ``" (did you mean 'x' or 'y'?)"``, or ``""`` when nothing is close."""
    found = closest(name, candidates, n)
    if not found:
        return ""
    return " (did you mean " + " or ".join(repr(f) for f in found) + "?)"
