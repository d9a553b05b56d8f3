"""Atomic, verified training checkpoints.

A checkpoint is a directory ``<run>/checkpoints/epoch_NNNN/`` holding ``state.pt`` (a dict of
tensors and plain values, loadable with ``torch.load(weights_only=True)``) and ``meta.json``
(epoch, step, arch, and the SHA-256 of ``state.pt``). It is written into a hidden temporary
directory and renamed into place, so a crash never leaves a half-written checkpoint under its
final name; loading verifies the checksum, so a truncated or corrupted file is detected.

Before writing, the free space under the folder must exceed the checkpoint's estimated size (the
last checkpoint's ``state.pt``, or the bytes of the state's tensors, whichever is larger) plus
:data:`SPACE_MARGIN`; a disk that fills up anyway (ENOSPC, or ``torch.save``'s failed write) is a
one-line :class:`DiskFullError` with the temporary directory removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lejepa.errors import CheckpointError, DiskFullError, first_line
from lejepa.record import META_FILE, STATE_FILE

SPACE_MARGIN = 16 * 2**20
"""Bytes that must stay free beyond a checkpoint's estimated size."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def save_checkpoint(folder: Path, epoch: int, state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as checkpoint ``epoch`` under ``folder`` atomically; keep the newest ``keep``.
    Raises :class:`DiskFullError` (nothing left behind) when it does not fit; an interrupt during the
    write leaves nothing behind either, and a temporary folder a killed writer left is removed."""
    final = folder / checkpoint_name(epoch)
    tmp = folder / f".{checkpoint_name(epoch)}.tmp-{os.getpid()}"
    need = checkpoint_bytes(folder, tensor_bytes(state))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".epoch_*.tmp-*"):  # a killed writer's (the run folder has one live writer)
            shutil.rmtree(stale, ignore_errors=True)
        check_free_space(folder, need, f"checkpoint {final.name}")
        tmp.mkdir()
        torch.save(state, tmp / STATE_FILE)
        meta = {**meta, "epoch": epoch, "sha256": _sha256(tmp / STATE_FILE)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        for f in (tmp / STATE_FILE, tmp / META_FILE):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException as exc:  # an error, or an interrupt (Ctrl-C, SIGTERM) mid-write: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError)) and is_disk_full(exc, folder, need):
            raise disk_full(folder, need, f"checkpoint {final.name}") from None
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def tensor_bytes(tree: Any) -> int:
    """Bytes of every tensor in a nested dict / list / tuple."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def checkpoint_bytes(folder: Path, state_bytes: int) -> int:
    """Estimated size of the next checkpoint under ``folder``: the last one's ``state.pt`` or
    ``state_bytes``, whichever is larger, plus :data:`SPACE_MARGIN`."""
    previous = list_checkpoints(folder)
    last = previous[-1] / STATE_FILE if previous else None
    return max(last.stat().st_size if last is not None and last.is_file() else 0, state_bytes) + SPACE_MARGIN


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Raise :class:`DiskFullError` unless ``need`` bytes are free on ``folder``'s file system
    (its nearest existing ancestor when it does not exist yet)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if shutil.disk_usage(probe).free < need:
        raise disk_full(folder, need, what)


def is_disk_full(exc: BaseException, folder: Path, need: int) -> bool:
    """Whether a failed write ran out of space: ENOSPC / EDQUOT, or a write error (``torch.save``
    raises RuntimeError) while less than ``need`` bytes are free."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        return shutil.disk_usage(folder).free < need
    except OSError:
        return False


def disk_full(folder: Path, need: int, what: str) -> DiskFullError:
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        free = 0
    return DiskFullError(
        f"no room for {what} in {folder}: {_mib(free)} free, about {_mib(need)} needed; free some "
        f"space (or train elsewhere: train.out_dir), then --resume continues from the last checkpoint"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint directories under ``folder``, oldest first (temporary ones excluded)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("epoch_"))


def read_meta(path: Path) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint directory."""
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has no readable {META_FILE}: {exc}") from None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of the checkpoint directory ``path``, checksum-verified, ``weights_only=True``."""
    path = Path(path)
    if path.is_file() and path.name == STATE_FILE:
        path = path.parent
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected {path / STATE_FILE})")
    meta = read_meta(path)
    if meta.get("sha256") != _sha256(path / STATE_FILE):
        raise CheckpointError(f"checkpoint {path} is corrupt: checksum mismatch")
    try:
        state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:  # any unpickling failure is a corrupt checkpoint
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {first_line(exc)}") from None
    return state, meta


def is_valid_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a ``state.pt`` whose SHA-256 matches its ``meta.json``."""
    try:
        return read_meta(path).get("sha256") == _sha256(path / STATE_FILE)
    except (CheckpointError, OSError):
        return False


def latest_valid_checkpoint(folder: Path, warn=print) -> Path | None:
    """The newest checkpoint under ``folder`` whose checksum verifies; corrupt ones are skipped with a warning."""
    for path in reversed(list_checkpoints(folder)):
        if is_valid_checkpoint(path):
            return path
        warn(f"warning: skipping corrupt checkpoint {path}")
    return None
