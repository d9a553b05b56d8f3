"""MLflowCallback against a real SQLite store: continuing a run never duplicates a step; the
background sender keeps metrics across a store that cannot be written and delivers them later."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from lejepa import record
from lejepa.callbacks import RunInfo
from lejepa.config import build_config
from lejepa.tracking import MetricSender, MLflowCallback, log_batch_once


def _info(run_dir, start_epoch: int = 0, start_step: int = 0) -> RunInfo:
    return RunInfo(build_config({}), run_dir, start_epoch, start_step, 10, 30, "cpu", 1, 123)


def _train(callback: MLflowCallback, info: RunInfo, first_step: int, last_step: int, steps_per_epoch: int = 10) -> None:
    callback.on_train_start(info)
    for step in range(first_step, last_step + 1):
        callback.on_step_end(step, {record.TRAIN_LOSS: 1.0 / step})
        if step % steps_per_epoch == 0:
            callback.on_epoch_end(step // steps_per_epoch, step, {record.EPOCH_LOSS: 1.0 / step})


def test_continued_run_skips_the_steps_it_already_holds(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MLflowCallback(uri, flush_every=1)
    _train(first, _info(tmp_path / "run"), 1, 14)  # killed in epoch 2, after step 14 was sent
    assert first.flush(retry_for=30)
    first.on_failure(RuntimeError("worker died"))

    # the retry resumes from epoch 1's checkpoint (step 10), finds the run through mlflow_run.json
    second = MLflowCallback(uri, flush_every=1)
    _train(second, _info(tmp_path / "run", start_epoch=1, start_step=10), 11, 30)
    second.on_train_end({record.LINEAR_PROBE_ACC: 0.5}, None)

    assert second.run_id == first.run_id
    client = MlflowClient(uri)
    steps = [m.step for m in client.get_metric_history(first.run_id, record.TRAIN_LOSS)]
    assert sorted(steps) == list(range(1, 31))
    assert sorted(m.step for m in client.get_metric_history(first.run_id, record.EPOCH)) == [10, 20, 30]
    run = client.get_run(first.run_id)
    assert run.info.status == record.FINISHED and run.data.tags[record.RESUMED_FROM_EPOCH_TAG] == "1"
    assert record.ERROR_TAG not in run.data.tags
    assert run.data.tags[record.PREVIOUS_ERROR_TAG] == "RuntimeError: worker died"
    assert run.data.metrics[record.LINEAR_PROBE_ACC] == 0.5


def test_sender_keeps_metrics_while_the_store_fails_and_delivers_them_in_order(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    broken = MlflowClient(f"sqlite:///{tmp_path / 'missing-folder' / 'mlflow.db'}")  # cannot be opened
    kept: list[int] = []  # the length of each queue handed to disk
    sender = MetricSender(broken, run_id, interval=0.1, keep=lambda metrics: kept.append(len(metrics)))
    now = int(time.time() * 1000)
    sender.add([Metric("m", float(i), now, i) for i in range(50)], wake=True)
    assert not sender.drain(timeout=1.5)  # nothing delivered, nothing dropped
    assert len(sender.pending) == 50 and sender.sent == 0
    assert kept and set(kept) == {50}  # during the outage the whole queue is kept on disk
    sender.client = client  # the store is back
    assert sender.close(timeout=30) == []
    assert [m.step for m in client.get_metric_history(run_id, "m")] == list(range(50))
    assert kept[-1] == 0  # the outage is over: the kept queue is cleared


def test_a_send_stuck_on_a_silent_server_is_kept_on_disk_by_the_watcher_not_by_the_thread_that_adds():
    """A tracking server that takes the connection and never answers holds ``log_batch`` inside
    MLflow's HTTP retries; after ``stall_s`` the queue is kept, from the sender's watcher thread."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes the handshakes; nothing ever reads or answers
    try:
        keepers: list[tuple[str, int]] = []
        client = MlflowClient(f"http://127.0.0.1:{silent.getsockname()[1]}")
        sender = MetricSender(
            client,
            "0" * 32,
            interval=0.05,
            stall_s=0.5,
            keep_every_s=0.3,
            keep=lambda metrics: keepers.append((threading.current_thread().name, len(metrics))),
        )
        now = int(time.time() * 1000)
        sender.add([Metric("m", 0.0, now, 0)], wake=True)
        deadline = time.monotonic() + 20
        while len(keepers) < 2 and time.monotonic() < deadline:
            sender.add([Metric("m", 1.0, now, len(keepers) + 1)])
            time.sleep(0.05)
        assert sender.sending_since is not None and sender.sent == 0  # still stuck in the first send
        assert len(keepers) >= 2, keepers  # kept, and kept again as the queue grew
        assert {name for name, _ in keepers} == {"mlflow-metrics-keeper"}
        assert keepers[-1][1] > keepers[0][1]
        assert len(sender.close(timeout=0)) >= keepers[-1][1]  # nothing delivered, nothing dropped
    finally:
        silent.close()


def test_a_send_to_a_server_that_is_down_fails_at_once_and_is_delivered_soon_after_it_is_back(mlflow_server):
    """log_batch_once makes one request, without MLflow's own retries (which sleep 2, 4, 8 … s inside
    the call, about two minutes in all): the sender's backoff (at most 10 s) finds the server back."""
    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    now = int(time.time() * 1000)
    mlflow_server.stop()
    started = time.monotonic()
    with pytest.raises(MlflowException):
        log_batch_once(client, run_id, [Metric("m", 0.0, now, 0)])
    assert time.monotonic() - started < 5
    sender = MetricSender(client, run_id, interval=0.1)
    sender.add([Metric("m", float(i), now, i) for i in range(5)], wake=True)
    assert not sender.drain(timeout=3)
    mlflow_server.start()
    back = time.monotonic()
    assert sender.close(timeout=30) == []
    assert time.monotonic() - back < 12  # the next try within the 10 s backoff cap
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "m")] == [(i, float(i)) for i in range(5)]


def test_logged_steps_are_the_highest_step_per_key_whatever_the_logging_order(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("a", 0.0, now, s) for s in (1, 2, 3, 4)])
    client.log_batch(run_id, metrics=[Metric("a", 9.0, now + 1000, 2), Metric("b", 1.0, now, 7)])  # a rerun of step 2
    run = client.get_run(run_id)
    assert MLflowCallback(uri).logged_steps(run_id, run.data.metrics) == {"a": 4, "b": 7}
