"""Shared fixtures: a real ``mlflow server``, a local Ray, a small real file system, one intra-op
thread, the tiny config's overrides. What tests import (paths, configs, helpers) lives in helpers.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import TINY, MlflowServer


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A running :class:`MlflowServer`, stopped after the test."""
    server = MlflowServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ray_address():
    """A real local Ray with 2 CPUs for the module; yields its GCS address (for ``--address``)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


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


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs at ``tmp_path/fs``, unmounted afterwards (skipped where mounting is not allowed)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
