"""A full disk: a real tmpfs mounted for the test (skipped where mounting is not allowed), filled
to the brim. Checkpoints and the run's config are refused in one line before writing, a write that
fills the disk anyway leaves no temporary folder, and the last complete checkpoint stays the latest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lejepa.checkpoint import SPACE_MARGIN, latest_valid_checkpoint, list_checkpoints, save_checkpoint
from lejepa.errors import DiskFullError

from helpers import TINY, fill_fs, run_cli

MiB = 2**20


def hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] if folder.is_dir() else []


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(small_fs):
    folder = small_fs / "run" / "checkpoints"
    state = {"weights": torch.zeros(2 * MiB, dtype=torch.uint8)}
    first = save_checkpoint(folder, 1, state, {}, keep=2)
    fill_fs(small_fs, SPACE_MARGIN)  # less than the checkpoint plus the margin
    with pytest.raises(DiskFullError, match=r"no room for checkpoint epoch_0002 in .*MiB free, about 18.0 MiB needed"):
        save_checkpoint(folder, 2, state, {}, keep=2)
    assert list_checkpoints(folder) == [first] and latest_valid_checkpoint(folder) == first
    assert hidden(folder) == []


def test_a_write_that_fills_the_disk_anyway_leaves_nothing_half_written(small_fs):
    folder = small_fs / "run" / "checkpoints"
    first = save_checkpoint(folder, 1, {"step": 1}, {}, keep=2)
    fill_fs(small_fs, SPACE_MARGIN + 4 * MiB)
    # no tensors: the estimate is the margin alone, so the pre-check passes and torch.save runs out of space
    with pytest.raises(DiskFullError, match="no room for checkpoint epoch_0002"):
        save_checkpoint(folder, 2, {"blob": b"\x01" * (24 * MiB)}, {}, keep=2)
    assert list_checkpoints(folder) == [first] and latest_valid_checkpoint(folder) == first
    assert hidden(folder) == []


def test_training_into_a_full_disk_is_one_line_and_writes_nothing(small_fs, tmp_path):
    fill_fs(small_fs, 4 * MiB)
    out = small_fs / "runs"
    proc = run_cli(["train", *TINY, "train.epochs=1", f"train.out_dir={out}", "train.run_name=r", "--no-tracking"], tmp_path)
    lines = proc.stderr.splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: no room for this run's checkpoints in "), lines
    left = sorted(p.name for p in (out / "r").iterdir()) if (out / "r").exists() else []
    assert "config.yaml" not in left and "checkpoints" not in left and not any(n.endswith(".tmp") for n in left), left
