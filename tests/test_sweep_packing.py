"""Packing small trials on one GPU: a fractional ``gpus_per_trial`` lets Ray run several trials on
one device at once. The scheduling is tested here on CPU, with a real local Ray that declares one
logical GPU (the trials themselves train on the CPU); the speed-up on a real GPU is measured by
``benchmarks/gpu_check.py`` (section ``packing``)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from sweeps.runner import run_sweep
from sweeps.spec import load_spec

from helpers import tiny_base, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_with_one_gpu():
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.parametrize("gpus, at_once", [(0.25, 4)])
def test_fractional_gpus_run_that_many_trials_at_once(tmp_path, ray_with_one_gpu, gpus, at_once):
    base = tiny_base()
    base["train"]["epochs"] = 1
    spec = load_spec(
        write_spec(
            tmp_path,
            {
                "name": "packed",
                "base": base,
                "space": {"loss.lam": [0.02, 0.05, 0.1, 0.2]},
                "resources": {"cpus_per_trial": 1, "gpus_per_trial": gpus},
                "max_concurrent_trials": 4,
            },
        )
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(spec, storage=tmp_path / "sweeps", tracking_uri=uri)
    assert [t.status for t in outcome.trials] == ["finished"] * 4

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(outcome.sweep.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{outcome.sweep.parent_run_id}'")
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert len(spans) == 4
    # the most trials alive at one moment: count starts minus ends in time order
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda ev: (ev[0], ev[1]))
    alive = peak = 0
    for _, delta in events:
        alive += delta
        peak = max(peak, alive)
    assert peak == at_once


def test_trials_the_cluster_can_never_grant_are_refused_before_anything_starts(tmp_path, ray_with_one_gpu):
    from lejepa.errors import ConfigError

    base = tiny_base()
    spec = load_spec(write_spec(tmp_path, {"name": "big", "base": base, "resources": {"gpus_per_trial": 2}}))
    with pytest.raises(ConfigError, match="a test_resnet trial needs 2 GPUs but this machine has 1"):
        run_sweep(spec, storage=tmp_path / "sweeps", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "sweeps").exists() or not any((tmp_path / "sweeps").iterdir())
