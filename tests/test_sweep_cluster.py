"""The cluster topology: a real MLflow server on 127.0.0.1 (HTTP tracking and proxied artifacts) and a
2-node Ray cluster on this machine; the CLI joins it with ``--address`` and the trials, one per
node, log to the server. The server is a plain ``mlflow server`` on SQLite, and the team server
``lejepa server`` on a real PostgreSQL; a fault test stops PostgreSQL for 30 s mid-sweep."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import LEJEPA, REPO, spec_body, write_spec

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("store", ["mlflow_server", "team_server"], ids=["sqlite", "postgresql"])
def test_trials_on_both_nodes_log_to_the_mlflow_server(tmp_path, store, two_node_cluster, request):
    mlflow_server = request.getfixturevalue(store)
    spec = write_spec(tmp_path, spec_body(space={"loss.lam": [0.05, 0.2]}, max_concurrent_trials=2))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        LEJEPA
        + [
            "sweep",
            str(spec),
            "--name",
            "c",
            "--address",
            two_node_cluster.address,
            "--tracking-uri",
            mlflow_server.url,
            "--storage",
            str(tmp_path / "sweeps"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trials (2 finished)" in proc.stdout and f"browse: {mlflow_server.url}" in proc.stdout
    assert "cannot see the sweep storage" not in proc.stderr  # every node sees it: same machine
    assert not list(tmp_path.rglob("mlflow.db"))  # nothing fell back to a local store

    client = MlflowClient(mlflow_server.url)
    (parent,) = client.search_runs([client.get_experiment_by_name("lejepa-sweeps").experiment_id], "tags.`lejepa.kind` = 'sweep'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    nodes = {two_node_cluster.head_node.node_id, *(n.node_id for n in two_node_cluster.worker_nodes)}
    assert {c.data.tags["lejepa.ray_node"] for c in children} == nodes  # one trial on each node
    for child in children:
        assert child.info.artifact_uri.startswith("mlflow-artifacts:")
        assert {"config.yaml", "checkpoint"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) >= 2
    artifacts = tmp_path / ("server-artifacts" if store == "mlflow_server" else "team-artifacts")
    assert list(artifacts.rglob("state.pt"))  # uploaded through the server
    if store == "team_server":  # the runs live in PostgreSQL: one parent, two children
        assert _count_runs(mlflow_server.database_uri) == 3


def _count_runs(database_uri: str) -> int:
    import sqlalchemy

    with sqlalchemy.create_engine(database_uri).connect() as db:
        return int(db.execute(sqlalchemy.text("SELECT count(*) FROM runs")).scalar_one())


def test_postgresql_down_for_30_s_mid_sweep_loses_no_metric_and_duplicates_no_run(tmp_path, postgres, team_server):
    """The team server's database stops for 30 s while two trials train: the server answers errors,
    the trials keep training and retry; after the restart every logged step is recorded once, and
    the database holds one parent and one run per trial."""
    import json
    import threading
    import time

    epochs = 12
    body = spec_body(epochs, space={"loss.lam": [0.05, 0.2]}, max_concurrent_trials=2)
    body["base"]["tracking"] = {"flush_every": 1}
    spec = write_spec(tmp_path, body)
    client = MlflowClient(team_server.url)
    outage: dict[str, float] = {}

    def stop_for_30_s() -> None:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            try:
                exp = client.get_experiment_by_name("lejepa-sweeps")
                runs = client.search_runs([exp.experiment_id], "tags.`lejepa.kind` = 'trial'") if exp else []
            except Exception:
                runs = []
            if any(r.data.metrics.get("epoch", 0) >= 1 for r in runs):
                break
            time.sleep(0.2)
        outage["down"] = time.time()
        postgres.stop()
        time.sleep(30)
        postgres.start()
        outage["up"] = time.time()

    watcher = threading.Thread(target=stop_for_30_s, daemon=True)
    watcher.start()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    storage = tmp_path / "sweeps"
    command = ["sweep", str(spec), "--name", "pg", "--tracking-uri", team_server.url, "--storage", str(storage)]
    proc = subprocess.run(LEJEPA + command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    watcher.join(timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trials (2 finished)" in proc.stdout and "up" in outage

    assert _count_runs(team_server.database_uri) == 3  # no duplicate run
    exp = client.get_experiment_by_name("lejepa-sweeps")
    children = client.search_runs([exp.experiment_id], "tags.`lejepa.kind` = 'trial'")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    during = 0
    for child in children:
        run_dir = Path(child.data.tags["lejepa.run_dir"])
        final = sorted((run_dir / "checkpoints").glob("epoch_*"))[-1]
        steps = json.loads((final / "meta.json").read_text())["step"]
        logged = sorted(m.step for m in client.get_metric_history(child.info.run_id, "train/loss"))
        assert logged == list(range(2, steps + 1, 2))  # every logged step once, none missing
        ends = client.get_metric_history(child.info.run_id, "epoch")
        assert sorted(int(m.value) for m in ends) == list(range(1, epochs + 1))
        during += sum(outage["down"] * 1000 < m.timestamp < outage["up"] * 1000 for m in ends)
        print(f"trial {child.data.tags['lejepa.trial_id']}: {steps} steps trained, {len(logged)} logged steps recorded")
    assert during >= 1  # epochs ended while the database was down, and their metrics arrived after
    print(f"PostgreSQL down {outage['up'] - outage['down']:.0f} s; {during} epoch ends fell inside the outage")
