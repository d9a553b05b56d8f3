"""User-facing errors.

Every error a user can cause by bad input (config, data, architecture names, checkpoints,
sweep specs) is a :class:`LejepaError`. Its message is one line that names the problem and
what is allowed; the CLI prints it as ``error: <message>`` and exits with ``exit_code``
(2 for bad input) without a traceback.
"""

from __future__ import annotations

import difflib
import re
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


class DiskFullError(LejepaError):
    """A run's folder has no room for the next checkpoint or file (checked before writing, or
    ENOSPC while writing); the last complete checkpoint stays the latest."""


class TrainingDiverged(LejepaError):
    """The loss became NaN or infinite."""

    exit_code = 3

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"training diverged at step {step}: loss is {value}")
        self.step = step
        self.value = value


class TrainingCollapsed(LejepaError):
    """The run stayed collapsed for ``train.collapse_patience`` epochs (label-free pruning)."""

    exit_code = 4

    def __init__(self, epoch: int, ratio: float, patience: int) -> None:
        super().__init__(
            f"training stopped at epoch {epoch}: collapsed for {patience} epoch(s) in a row "
            f"(collapse ratio {ratio:.2f}; raise loss.lam or optim.batch_size)"
        )
        self.epoch = epoch
        self.ratio = ratio


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of ``exc``'s message (stripped); for an empty message ``default``, or the
    exception's type name when ``default`` is None."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if default is None else default


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


_ALLOCATOR_MESSAGES = ("can't allocate memory", "CUDA out of memory", "out of memory")


def out_of_memory(exc: BaseException) -> str | None:
    """One line for an allocator failure (a CPU ``MemoryError`` or allocator ``RuntimeError``, or
    CUDA's ``OutOfMemoryError``) naming the size asked for and what to lower; None for any other error."""
    text = str(exc).strip()
    if not (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or (isinstance(exc, RuntimeError) and any(m in text for m in _ALLOCATOR_MESSAGES))
    ):
        return None
    size = ""
    if found := re.search(r"allocate (\d+) bytes", text):
        n, unit = float(found.group(1)), "B"
        for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):  # noqa: B007 - the unit reached is read after the loop
            if n < 1024:
                break
            n /= 1024
        size = f" (an allocation of {n:.1f} {unit})"
    elif found := re.search(r"[Tt]ried to allocate ([\d.]+ [KMGTP]i?B)", text):
        size = f" (an allocation of {found.group(1)})"
    return (
        f"out of memory{size}: the model, batch and views do not fit; lower optim.batch_size, data.resolution, "
        f"views.local_views or model.proj_hidden / model.proj_dim, or choose a smaller model.arch"
    )
