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


class MlflowServer:
    """A real ``mlflow server`` process on 127.0.0.1 (SQLite backend, proxied artifacts) in ``folder``.

    :meth:`stop` and :meth:`start` may be called again: the port and the store stay the same.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        import time
        import urllib.request

        log = (self.folder / "mlflow-server.log").open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "server-artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, (self.folder / "mlflow-server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None


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
