"""Atomic, verified training checkpoints.

A checkpoint is a directory ``<run>/checkpoints/epoch_NNNN/`` holding ``state.pt`` (a dict of
tensors and plain values, loadable with ``torch.load(weights_only=True)``) and ``meta.json``
(epoch, step, arch, and the SHA-256 of ``state.pt``). It is written into a hidden temporary
directory and renamed into place, so a crash never leaves a half-written checkpoint under its
final name; loading verifies the checksum, so a truncated or corrupted file is detected.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lejepa.errors import CheckpointError

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def save_checkpoint(folder: Path, epoch: int, state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as checkpoint ``epoch`` under ``folder`` atomically; keep the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(epoch)
    tmp = folder / f".{checkpoint_name(epoch)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE_FILE)
    meta = {**meta, "epoch": epoch, "sha256": _sha256(tmp / STATE_FILE)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    for f in (tmp / STATE_FILE, tmp / META_FILE):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt checkpoint
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {str(exc).splitlines()[0]}") from None
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
