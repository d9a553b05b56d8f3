"""The cluster topology: a real ``mlflow server`` on 127.0.0.1 (SQLite backend, HTTP tracking and
artifacts) and a 2-node Ray cluster on this machine; the CLI joins it with ``--address`` and the
trials, one per node, log to the server."""

from __future__ import annotations

import os
import subprocess

import pytest
from mlflow import MlflowClient

from helpers import LEJEPA, REPO, spec_body, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture
def two_node_cluster(monkeypatch):
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


def test_trials_on_both_nodes_log_to_the_mlflow_server(tmp_path, mlflow_server, two_node_cluster):
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
    assert list((tmp_path / "server-artifacts").rglob("state.pt"))  # uploaded through the server
