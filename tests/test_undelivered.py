"""What MLflow cannot take is kept beside the run and delivered later (lejepa/spool.py, ``lejepa sync``).

Against real stores: a SQLite store, a real ``mlflow server`` stopped for good mid-run and
restarted after training ended, and a real tmpfs as a full artifact store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from lejepa import spool
from lejepa.errors import ConfigError
from lejepa.record import (
    CHECKPOINT_ARTIFACT,
    CHECKPOINT_TAG,
    EPOCH,
    LINEAR_PROBE_ACC,
    META_FILE,
    RUN_FILE,
    SPOOL_FILE,
    TRAIN_LOSS,
    UNDELIVERED_TAG,
    sqlite_uri,
)

from helpers import REPO, TINY, fill_fs, run_cli

MiB = 2**20
LOG_EVERY = 2  # train.log_every of the tiny config


def _store(tmp_path: Path) -> tuple[str, MlflowClient, str]:
    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    exp = client.create_experiment("spool", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, client.create_run(exp).info.run_id


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run_id, key))


def test_delivery_sends_only_the_steps_the_run_lacks_then_tags_artifacts_and_status(tmp_path):
    uri, client, run_id = _store(tmp_path)
    client.log_batch(run_id, metrics=[Metric("loss", 1.0, 0, s) for s in (2, 4)])  # reached MLflow before the outage
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.pt").write_bytes(b"x" * 1000)
    (tmp_path / "config.yaml").write_text("loss: {lam: 0.1}\n")
    kept = spool.Spool(
        run_id,
        uri,
        metrics=[("loss", 1.0, 0, s) for s in (2, 4, 6, 8)] + [("epoch", 1.0, 0, 8)],
        tags={"lejepa.health": "healthy"},
        artifacts=[(str(tmp_path / "config.yaml"), None), (str(tmp_path / "ckpt"), "checkpoint")],
        status="FINISHED",
    )
    assert kept.summary() == "5 metrics, 1 tag, 2 artifacts and the final status FINISHED"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spool.write(run_dir, kept)
    again = spool.read(run_dir)
    assert again == kept
    assert not spool.deliver(client, again)  # nothing left
    assert not spool.deliver(client, again)  # delivering twice adds nothing
    run = client.get_run(run_id)
    assert _steps(client, run_id, "loss") == [2, 4, 6, 8] and _steps(client, run_id, "epoch") == [8]
    assert run.info.status == "FINISHED" and run.data.tags["lejepa.health"] == "healthy"
    names = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "checkpoint")}
    assert {"config.yaml", "checkpoint/state.pt"} <= names
    spool.write(run_dir, spool.Spool(run_id, uri))  # empty: the file goes
    assert not (run_dir / SPOOL_FILE).exists() and list(run_dir.iterdir()) == []


def test_a_spool_that_is_not_one_is_one_config_error(tmp_path):
    (tmp_path / SPOOL_FILE).write_text('{"run_id": "x"')
    with pytest.raises(ConfigError, match="is not a readable record of undelivered MLflow data"):
        spool.read(tmp_path)


def test_a_full_artifact_store_finishes_the_run_and_keeps_the_artifacts_for_sync(tmp_path, small_fs):
    """The run trained: its status is set and its metrics delivered; the artifacts that do not fit
    stay in the spool, named on the run, and ``lejepa sync`` writes them once there is room."""
    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    exp = client.create_experiment("full", artifact_location=(small_fs / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    run_dir = tmp_path / "run"
    (run_dir / "ckpt").mkdir(parents=True)
    (run_dir / "ckpt" / "state.pt").write_bytes(os.urandom(4 * MiB))
    fill_fs(small_fs, 12 * MiB)  # less than the 4 MiB checkpoint + the 16 MiB margin
    todo = spool.Spool(
        run_id, uri, metrics=[("loss", 0.5, 0, 2)], artifacts=[(str(run_dir / "ckpt"), "checkpoint")], status="FINISHED"
    )
    left = spool.deliver(client, todo)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and _steps(client, run_id, "loss") == [2]
    assert left.artifacts == todo.artifacts and not left.metrics and not left.status
    assert "no room for the artifact ckpt" in run.data.tags[UNDELIVERED_TAG]
    assert not (small_fs / "artifacts").exists() or not any((small_fs / "artifacts").rglob("state.pt"))  # nothing half-written
    spool.write(run_dir, left)

    (small_fs / "ballast").unlink()  # room again
    proc = run_cli(["sync", str(tmp_path)], tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"lejepa: {run_dir}: delivered 1 artifact to run {run_id}" in proc.stdout, proc.stdout
    assert not (run_dir / SPOOL_FILE).exists()
    run = client.get_run(run_id)
    assert UNDELIVERED_TAG not in run.data.tags
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/state.pt"]


def test_sync_with_nothing_kept_and_with_a_missing_folder(tmp_path):
    proc = run_cli(["sync", str(tmp_path)], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("lejepa: nothing to deliver under "), proc.stdout + proc.stderr
    proc = run_cli(["sync", str(tmp_path / "nope")], tmp_path)
    assert proc.returncode != 0 and proc.stderr.splitlines() == [
        f"error: {tmp_path / 'nope'}: no such folder (give run folders, or a folder holding them)"
    ]


@pytest.mark.slow
def test_mlflow_down_for_good_mid_run_then_back_after_training_every_step_recorded(tmp_path, mlflow_server):
    """The server stops for good after epoch 2; training goes on, waits ``tracking.final_wait_s``
    at the end, keeps what MLflow did not take in the run folder and says so in one warning (exit
    0: the run trained). The server comes back; ``lejepa sync`` delivers: every logged step once,
    the final metrics, the checkpoint artifact and the FINISHED status."""
    epochs = 10
    run_dir = tmp_path / "runs" / "r"
    args = [*TINY, f"train.epochs={epochs}", f"train.out_dir={tmp_path / 'runs'}", "train.run_name=r"]
    args += ["tracking.flush_every=1", "tracking.final_wait_s=5", "--tracking-uri", mlflow_server.url]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lejepa", "train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "epoch_0002").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    mlflow_server.stop()  # for good, while epoch 3 trains
    stopped = time.monotonic()
    out, err = proc.communicate(timeout=600)
    ended = time.monotonic() - stopped
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    warning = [line for line in err.splitlines() if "are kept in" in line]
    assert len(warning) == 1 and f"`lejepa sync {run_dir}` delivers them" in warning[0], err[-2000:]
    assert "artifacts and the final status FINISHED" in warning[0]
    kept = json.loads((run_dir / SPOOL_FILE).read_text())
    assert kept["status"] == "FINISHED" and kept["metrics"], kept.keys()
    assert ended < 240, ended  # bounded: the final wait, not MLflow's minutes of retries per call

    mlflow_server.start()
    done = run_cli(["sync", str(tmp_path / "runs")], tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.startswith(f"lejepa: {run_dir}: delivered "), done.stdout
    assert not (run_dir / SPOOL_FILE).exists()

    run_id = json.loads((run_dir / RUN_FILE).read_text())["run_id"]
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    final = sorted(p for p in (run_dir / "checkpoints").iterdir())[-1]
    steps = int(json.loads((final / META_FILE).read_text())["step"])
    assert _steps(client, run_id, TRAIN_LOSS) == list(range(LOG_EVERY, steps + 1, LOG_EVERY))  # none missing, none twice
    assert _steps(client, run_id, EPOCH) == [e * steps // epochs for e in range(1, epochs + 1)]
    assert run.data.tags[CHECKPOINT_TAG] == str(final)
    assert any(a.path.endswith("state.pt") for a in client.list_artifacts(run_id, CHECKPOINT_ARTIFACT))
    assert LINEAR_PROBE_ACC in run.data.metrics  # the final evaluation, logged after the outage


def test_resume_delivers_what_the_run_kept_before_it_goes_on(tmp_path):
    """A run folder's spool (left by an attempt that ended while MLflow was unreachable) is delivered
    when the run starts again, before anything else: nothing is lost, nothing doubled."""
    out = tmp_path / "runs"
    args = [*TINY, "train.epochs=1", f"train.out_dir={out}", "train.run_name=r"]
    first = run_cli(["train", *args], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = out / "r"
    run_id = json.loads((run_dir / RUN_FILE).read_text())["run_id"]
    uri = sqlite_uri(out / "mlflow.db")
    kept = spool.Spool(run_id, uri, metrics=[("kept/metric", float(s), 0, s) for s in (1, 2, 3)], tags={"kept": "yes"})
    spool.write(run_dir, kept)
    again = run_cli(["train", "--resume", str(run_dir), "train.epochs=2"], tmp_path)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert f"delivered to MLflow what run {run_id} had kept: 3 metrics and 1 tag" in again.stderr
    client = MlflowClient(uri)
    assert _steps(client, run_id, "kept/metric") == [1, 2, 3] and client.get_run(run_id).data.tags["kept"] == "yes"
    assert not (run_dir / SPOOL_FILE).exists() and client.get_run(run_id).info.status == "FINISHED"
