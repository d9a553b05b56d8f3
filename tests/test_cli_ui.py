"""`lejepa ui` serves the local MLflow store on 127.0.0.1 (a real mlflow server process)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from mlflow import MlflowClient

from lejepa.record import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, KIND_SWEEP, KIND_TAG
from lejepa.tracking import get_or_create_experiment

from helpers import REPO, free_port, run_cli


@pytest.mark.slow
def test_ui_serves_the_store_on_loopback_and_prints_the_runs_view_once_it_answers(tmp_path):
    """The printed URL opens the newest sweep's experiment on its runs table (MLflow 3 lands on its
    GenAI overview otherwise), and is printed only once the server answers."""
    out = tmp_path / "runs"
    out.mkdir()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("visible-experiment")
    sweeps = get_or_create_experiment(client, "sweeps", uri)
    client.create_run(sweeps, tags={KIND_TAG: KIND_SWEEP})
    assert client.get_experiment(sweeps).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lejepa", "ui", "--out-dir", str(out), "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline, seen = time.monotonic() + 180, []
        while not any(line.startswith("MLflow UI: ") for line in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)[-3000:]
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:  # answering already
            assert resp.status == 200
        (url,) = [line.split()[2] for line in seen if line.startswith("MLflow UI: ")]
        assert url == f"http://127.0.0.1:{port}/#/experiments/{sweeps}/runs?workflowType=machine_learning"
        remote = MlflowClient(f"http://127.0.0.1:{port}")
        assert remote.get_experiment_by_name("visible-experiment") is not None
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        local_addresses = [line.split()[3] for line in listening.splitlines() if line.strip()]
        assert local_addresses and all(a.startswith("127.0.0.1:") for a in local_addresses), listening
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


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
