"""Faults injected into real processes: a local Ray (2 CPUs), SQLite stores and a real ``mlflow server``.

Each test is one row of the README's fault table: what is injected, and what must hold after it
(steps trained against steps recorded in MLflow, runs expected against runs found).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from analysis.loader import load_sweep
from lejepa.checkpoint import load_checkpoint
from sweeps.runner import SWEEP_FILE, run_sweep
from sweeps.spec import load_spec

from helpers import SweepCLI, child_runs, descendants, spec_body, trial_states, write_spec

pytestmark = pytest.mark.slow

LOG_EVERY = 2  # train.log_every of the tiny test config


def _spec(tmp_path: Path, epochs: int, flush_every: int = 1, **fields):
    body = spec_body(epochs, **fields)
    body["base"]["tracking"] = {"flush_every": flush_every}
    return load_spec(write_spec(tmp_path, body))


def _trial_pids() -> list[int]:
    """Pids of Tune trial actors among this process's descendants (the local Ray started here)."""
    return [pid for pid, cmdline in descendants(os.getpid()).items() if cmdline.startswith(b"ray::ImplicitFunc")]


def _steps_trained(trial_dir: Path, epoch: int) -> int:
    _, meta = load_checkpoint(trial_dir / "checkpoints" / f"epoch_{epoch:04d}")
    return meta["step"]


def assert_complete_history(client: MlflowClient, run_id: str, steps_trained: int, epochs: int) -> None:
    """Every logged step exactly once, none missing: per-step ``train/loss`` and per-epoch ``epoch``."""
    logged = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(logged) == list(range(LOG_EVERY, steps_trained + 1, LOG_EVERY))
    per_epoch = steps_trained // epochs
    epoch_end = sorted((m.value, m.step) for m in client.get_metric_history(run_id, "epoch"))
    assert epoch_end == [(float(e), e * per_epoch) for e in range(1, epochs + 1)]


def _kill_when(condition, before_kill=lambda: None, timeout: float = 400, after_kill=lambda: None) -> list[int]:
    """Start a thread that SIGKILLs the trial actors once ``condition()`` holds; returns the killed pids (filled later)."""
    killed: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                before_kill()
                for pid in _trial_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                after_kill()
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_worker_killed_mid_epoch_retries_into_the_same_run_without_gap_or_duplicate(tmp_path, ray_address):
    spec = _spec(tmp_path, epochs=3, max_failures=1)  # flush_every=1: epoch 2's first steps reach MLflow
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "sweeps"
    # once epoch 1's checkpoint is written the worker trains epoch 2 (1-3 s, by the machine's load): kill it 0.3 s in
    checkpoints = storage / "killed" / "trials"
    at_kill: list[int] = []  # complete checkpoints when the worker died: the retry resumes from the newest
    killed = _kill_when(
        lambda: bool(list(checkpoints.glob("*/checkpoints/epoch_0001/meta.json"))),
        before_kill=lambda: time.sleep(0.3),
        after_kill=lambda: at_kill.append(len(list(checkpoints.glob("*/checkpoints/epoch_*/meta.json")))),
    )
    outcome = run_sweep(spec, storage=storage, name="killed", tracking_uri=uri)

    assert len(killed) == 1 and 1 <= at_kill[0] < 3  # killed mid-run, after epoch 1
    (trial,) = outcome.trials
    assert trial.status == "finished" and trial.epoch == 3
    (state,) = trial_states(storage / "killed").values()
    assert state.num_failures == 1 and state.status == "TERMINATED"
    (run,) = child_runs(uri, outcome.sweep.parent_run_id)
    assert run.info.status == "FINISHED" and run.info.run_id == trial.run_id
    assert run.data.tags["lejepa.resumed_from_epoch"] == str(at_kill[0])
    steps = _steps_trained(storage / "killed" / "trials" / state.trial_id, 3)
    assert_complete_history(MlflowClient(uri), run.info.run_id, steps, 3)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, ray_address):
    spec = _spec(tmp_path, epochs=3, max_failures=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "sweeps"
    corrupted: list[Path] = []

    def second_checkpoint_everywhere() -> bool:
        # the run folder's epoch_0002 and Tune's copy of it (its second reported checkpoint)
        own = list((storage / "corrupt" / "trials").glob("*/checkpoints/epoch_0002/meta.json"))
        tune = list((storage / "corrupt").glob("run_trial_*/checkpoint_000001/meta.json"))
        return bool(own and tune)

    def corrupt() -> None:
        for meta in [
            *(storage / "corrupt" / "trials").glob("*/checkpoints/epoch_0002/meta.json"),
            *(storage / "corrupt").glob("run_trial_*/checkpoint_000001/meta.json"),
        ]:
            state = meta.parent / "state.pt"
            data = bytearray(state.read_bytes())
            data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # same size, different bytes
            state.write_bytes(bytes(data))
            corrupted.append(state)
        assert not list((storage / "corrupt" / "trials").glob("*/checkpoints/epoch_0003"))  # still in epoch 3

    killed = _kill_when(second_checkpoint_everywhere, before_kill=corrupt)
    outcome = run_sweep(spec, storage=storage, name="corrupt", tracking_uri=uri)

    assert len(killed) == 1 and len(corrupted) == 2
    (trial,) = outcome.trials
    assert trial.status == "finished" and trial.epoch == 3
    (state,) = trial_states(storage / "corrupt").values()
    assert state.num_failures == 1
    (run,) = child_runs(uri, outcome.sweep.parent_run_id)
    # both copies of epoch 2 failed their checksum: the retry resumed from epoch 1 and trained 2 and 3 again
    assert run.data.tags["lejepa.resumed_from_epoch"] == "1"
    steps = _steps_trained(storage / "corrupt" / "trials" / state.trial_id, 3)
    assert_complete_history(MlflowClient(uri), run.info.run_id, steps, 3)


def test_mlflow_server_down_for_30_s_loses_no_metric(tmp_path, ray_address, mlflow_server):
    epochs = 16  # about 50 s of training: the outage falls inside it
    spec = _spec(tmp_path, epochs=epochs)
    storage = tmp_path / "sweeps"
    client = MlflowClient(mlflow_server.url)
    outage: dict[str, float] = {}

    def stop_for_30_s() -> None:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            exp = client.get_experiment_by_name("lejepa-sweeps")
            runs = client.search_runs([exp.experiment_id], "tags.`lejepa.kind` = 'trial'") if exp else []
            if runs and runs[0].data.metrics.get("epoch", 0) >= 1:
                break
            time.sleep(0.2)
        outage["down"] = time.time()
        mlflow_server.stop()
        time.sleep(30)
        outage["up"] = time.time()
        mlflow_server.start()

    watcher = threading.Thread(target=stop_for_30_s, daemon=True)
    watcher.start()
    outcome = run_sweep(spec, storage=storage, name="outage", tracking_uri=mlflow_server.url)
    watcher.join()

    (trial,) = outcome.trials
    assert trial.status == "finished" and trial.epoch == epochs
    run = client.get_run(trial.run_id)
    assert run.info.status == "FINISHED"
    steps = _steps_trained(storage / "outage" / "trials" / trial.trial_id, epochs)
    assert_complete_history(client, run.info.run_id, steps, epochs)
    # training went on during the outage: epochs ended (metric timestamps are taken in the trial)
    # while the server was down, and their metrics arrived after it came back
    during = [
        m
        for m in client.get_metric_history(run.info.run_id, "epoch")
        if outage["down"] * 1000 < m.timestamp < outage["up"] * 1000
    ]
    assert len(during) >= 3
    assert "eval/linear_probe_acc" in run.data.metrics


def test_eight_trials_log_concurrently_into_sqlite(tmp_path, ray_address):
    import ray

    lams = [0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.2, 0.3]
    spec = _spec(tmp_path, epochs=1, space={"loss.lam": lams}, resources={"cpus_per_trial": 0.25}, max_concurrent_trials=8)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "sweeps"
    outcome = run_sweep(spec, storage=storage, name="eight", tracking_uri=uri)

    assert [t.status for t in outcome.trials] == ["finished"] * 8
    states = trial_states(storage / "eight")
    assert all(s.num_failures == 0 for s in states.values())
    client = MlflowClient(uri)
    runs = child_runs(uri, outcome.sweep.parent_run_id)
    assert len(runs) == 8 and sorted(r.data.tags["lejepa.trial_id"] for r in runs) == sorted(states)
    for run in runs:
        assert run.info.status == "FINISHED" and "lejepa.error" not in run.data.tags
        steps = _steps_trained(storage / "eight" / "trials" / run.data.tags["lejepa.trial_id"], 1)
        assert_complete_history(client, run.info.run_id, steps, 1)
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    assert not [p for p in logs.glob("worker-*") if "database is locked" in p.read_text(errors="replace")]


def test_diverging_trial_is_marked_and_left_out_while_the_sweep_goes_on(tmp_path, ray_address):
    # lr × weight decay = 200: AdamW multiplies every weight matrix by -199 each step until it overflows
    spec = _spec(tmp_path, epochs=2, flush_every=10, space={"optim.weight_decay": [5e-4, 1e5]}, max_failures=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(spec, storage=tmp_path / "sweeps", name="div", tracking_uri=uri)

    by_wd = {t.params["optim.weight_decay"]: t for t in outcome.trials}
    assert by_wd[5e-4].status == "finished" and by_wd[1e5].status == "diverged"
    assert all(s.num_failures == 0 for s in trial_states(tmp_path / "sweeps" / "div").values())  # never retried
    assert "1 finished, 1 diverged" in outcome.render()
    client = MlflowClient(uri)
    bad = client.get_run(by_wd[1e5].run_id)
    assert bad.info.status == "FAILED" and bad.data.tags["lejepa.status"] == "diverged"
    step = int(bad.data.tags["lejepa.diverged_step"])
    assert 1 <= step <= 40 and re.search(r"diverged at step \d+: loss is (nan|inf)", bad.data.tags["lejepa.error"])
    parent = client.get_run(outcome.sweep.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/diverged"] == 1
    assert parent.data.tags["lejepa.best_train_score_run"] == by_wd[5e-4].run_id

    sweep = load_sweep("div", uri)  # the analysis keeps the healthy trial and says why the other is out
    assert sweep.runs["run_id"].tolist() == [by_wd[5e-4].run_id]
    assert any(f"diverged at step {step}" in note for note in sweep.notes)


def test_driver_killed_then_resumed_gives_one_parent_and_one_child_per_trial(tmp_path, ray_address):
    spec_path = write_spec(tmp_path, {**spec_body(2, space={"loss.lam": [0.02, 0.1, 0.3]}, max_concurrent_trials=2), "name": "k"})
    cli = SweepCLI(tmp_path, ray_address)
    uri, storage = cli.uri, cli.storage
    driver = cli.start(spec_path, "k", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and driver.poll() is None:
            # kill once some trial has a checkpoint of its first epoch and none has finished all of them
            if list((storage / "k" / "trials").glob("*/checkpoints/epoch_0001/meta.json")):
                break
            time.sleep(0.1)
        time.sleep(2.0)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == -signal.SIGKILL
    client = MlflowClient(uri)
    parents = client.search_runs([client.get_experiment_by_name("lejepa-sweeps").experiment_id], "tags.`lejepa.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "RUNNING"  # nobody closed it: the driver died

    resumed = cli.resume("k")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "3 trials (3 finished)" in resumed.stdout

    parents = client.search_runs([parents[0].info.experiment_id], "tags.`lejepa.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = child_runs(uri, parents[0].info.run_id)
    trials = trial_states(storage / "k")
    assert len(children) == 3 and sorted(c.data.tags["lejepa.trial_id"] for c in children) == sorted(trials)
    for child in children:
        assert child.info.status == "FINISHED"
        steps = _steps_trained(storage / "k" / "trials" / child.data.tags["lejepa.trial_id"], 2)
        assert_complete_history(client, child.info.run_id, steps, 2)
    assert (storage / "k" / SWEEP_FILE).is_file()


def test_local_ray_keeps_token_authentication_on(ray_address):
    """Ray >= 2.59 turns token authentication on for local clusters; nothing here turns it off."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert os.environ.get("RAY_AUTH_MODE", "token") != "disabled"
    assert is_token_auth_enabled()
