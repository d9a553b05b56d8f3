"""Shared fixtures: a real ``mlflow server``, a local Ray, a small real file system, one intra-op
thread, the tiny config's overrides. What tests import (paths, configs, helpers) lives in helpers.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import LONGEST_FIRST, TINY, MlflowServer, Postgres, TeamServer, postgres_bin


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


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


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A real 2-node Ray cluster on this machine (1 CPU each), for processes given its address."""
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Cluster() records its address in /tmp/ray/ray_current_cluster, which a plain ray.init() on this
    # machine would then join; keep this test's cluster to the processes that are given its address.
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL (Debian's) on 127.0.0.1 in a temporary data directory, for the module."""
    import os
    import pwd

    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("needs Debian's postgresql (make test installs it where apt-get and root are)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("PostgreSQL refuses to run as root and there is no postgres user to run it as")
    server = Postgres(bin_dir)
    server.start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def team_server(postgres, tmp_path: Path):
    """``lejepa server`` on a fresh PostgreSQL database, artifacts in ``tmp_path/team-artifacts``; its URL."""
    import uuid

    server = TeamServer(postgres.create_database(f"mlflow_{uuid.uuid4().hex[:8]}"), tmp_path / "team-artifacts")
    server.start()
    try:
        yield server
    finally:
        server.stop()
