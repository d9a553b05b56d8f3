"""`lejepa ui` serves the local MLflow store on 127.0.0.1 (a real mlflow server process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow import MlflowClient

from helpers import REPO, free_port, run_cli


@pytest.mark.slow
def test_ui_serves_the_store_on_loopback(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    client.create_experiment("visible-experiment")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lejepa", "ui", "--out-dir", str(out), "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                assert time.monotonic() < deadline, "mlflow ui did not come up"
                time.sleep(1)
        remote = MlflowClient(f"http://127.0.0.1:{port}")
        assert remote.get_experiment_by_name("visible-experiment") is not None
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        local_addresses = [line.split()[3] for line in listening.splitlines() if line.strip()]
        assert local_addresses and all(a.startswith("127.0.0.1:") for a in local_addresses), listening
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_ui_without_a_store_is_one_line(tmp_path):
    proc = run_cli(["ui", "--out-dir", str(tmp_path / "nothing")], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no MLflow store at") and len(proc.stderr.strip().splitlines()) == 1


def test_ui_on_a_taken_port_is_one_line_and_exit_2(tmp_path):
    import socket

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mlflow.db").write_bytes(b"")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = run_cli(["ui", "--out-dir", str(tmp_path / "runs"), "--port", str(port)], tmp_path, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: port {port} on 127.0.0.1 is taken")
