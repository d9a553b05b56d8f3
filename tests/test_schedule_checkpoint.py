"""LR schedule against its closed form; atomic, checksummed checkpoints."""

import math

import pytest
import torch

from lejepa.checkpoint import latest_valid_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from lejepa.errors import CheckpointError
from lejepa.schedule import warmup_cosine


def test_warmup_then_cosine_to_final_ratio():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=14, final_ratio=1e-3)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    for step in range(4, 14):
        progress = (step - 4) / 10
        expected = 2.0 * (1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert lrs[step] == pytest.approx(expected)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 1e-3)


def test_save_keep_and_load(tmp_path):
    folder = tmp_path / "ckpt"
    for epoch in range(1, 5):
        save_checkpoint(folder, epoch, {"w": torch.full((3,), float(epoch)), "epoch": epoch}, {"arch": "x"}, keep=2)
    names = [p.name for p in list_checkpoints(folder)]
    assert names == ["epoch_0003", "epoch_0004"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    state, meta = load_checkpoint(folder / "epoch_0004")
    assert torch.equal(state["w"], torch.full((3,), 4.0)) and meta["epoch"] == 4 and meta["arch"] == "x"


def test_corrupt_checkpoint_detected_and_skipped(tmp_path):
    folder = tmp_path / "ckpt"
    for epoch in (1, 2):
        save_checkpoint(folder, epoch, {"w": torch.randn(100)}, {}, keep=3)
    newest = folder / "epoch_0002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:50])  # truncated
    with pytest.raises(CheckpointError, match="corrupt: checksum mismatch"):
        load_checkpoint(folder / "epoch_0002")
    warnings = []
    assert latest_valid_checkpoint(folder, warn=warnings.append) == folder / "epoch_0001"
    assert "epoch_0002" in warnings[0]


def test_refuses_pickled_code(tmp_path):
    import hashlib
    import json

    folder = tmp_path / "evil"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, folder / "state.pt")
    digest = hashlib.sha256((folder / "state.pt").read_bytes()).hexdigest()
    (folder / "meta.json").write_text(json.dumps({"sha256": digest}))
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(folder)


class _InterruptWhilePickled:
    """Pickling it raises KeyboardInterrupt: Ctrl-C (or SIGTERM, re-raised as SIGINT) mid-``torch.save``."""

    def __reduce__(self):
        raise KeyboardInterrupt


def test_an_interrupt_during_a_checkpoint_write_leaves_the_previous_one_latest_and_nothing_else(tmp_path):
    folder = tmp_path / "checkpoints"
    first = save_checkpoint(folder, 1, {"w": torch.ones(1000)}, {"step": 10}, keep=3)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, 2, {"w": torch.ones(1000), "x": _InterruptWhilePickled()}, {"step": 20}, keep=3)
    assert list_checkpoints(folder) == [first] and latest_valid_checkpoint(folder) == first
    assert [p.name for p in folder.iterdir()] == ["epoch_0001"]


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_write(tmp_path):
    folder = tmp_path / "checkpoints"
    stale = folder / ".epoch_0002.tmp-99999"  # SIGKILL mid-write leaves this
    stale.mkdir(parents=True)
    (stale / "state.pt").write_bytes(b"half")
    save_checkpoint(folder, 2, {"w": torch.ones(10)}, {"step": 20}, keep=3)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_0002"]
