"""Shared fixtures: small, fast training configs and a helper to run the real CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LEJEPA = [sys.executable, "-m", "lejepa"]

# A config small enough to train an epoch in about a second on 2 CPU cores.
TINY = [
    "data.name=digits-shifted", "data.resolution=16", "data.placements=1",
    "model.arch=test_resnet", "model.proj_hidden=32", "model.proj_dim=16",
    "views.global_views=2", "views.local_views=2",
    "loss.num_slices=32", "optim.batch_size=64", "optim.warmup_epochs=0.5",
    "train.log_every=2", "train.eval_probe_epochs=5", "train.threads=1",
]


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m lejepa ARGS`` in ``cwd`` with the repo importable; capture output."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update({"PYTHONPATH": str(REPO), **(env or {})})
    return subprocess.run(LEJEPA + args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """One intra-op thread: multi-threaded ops stall badly when other jobs share a small CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    return TINY + [f"train.out_dir={tmp_path / 'runs'}"]
