"""The sweep's MLflow runs: the parent run's lifecycle (created with the spec files as artifacts,
reopened on ``--resume``, closed with the sweep's status, the best trials logged on it) and each
child run's final status (decided by :mod:`sweeps.status`)."""

from __future__ import annotations

import contextlib
import json
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from lejepa.record import (
    ARCH_PARAM,
    BEST_LINEAR_PROBE_ACC,
    BEST_SCORE,
    EPOCH_LOSS,
    HEALTH_TAG,
    KIND_SWEEP,
    KIND_TAG,
    KIND_TRIAL,
    KNN_ACC,
    LINEAR_PROBE_ACC,
    NOTE_TAG,
    PARENT_TAG,
    RESTARTED_AT_TAG,
    RESUMED_AT_TAG,
    RUNNING,
    SPEC_TAG,
    STATUS_COLLAPSED,
    STATUS_DIVERGED,
    STATUS_FAILED,
    STATUS_FINISHED,
    STATUS_PRUNED,
    STATUS_TAG,
    STORAGE_TAG,
    SWEEP_TAG,
    TRAIN_SCORE,
    TRIAL_ID_TAG,
    best_run_tag,
    best_trial_tag,
    run_status,
    shared_view_tag,
    trials_metric,
)
from lejepa.tracking import get_or_create_experiment
from sweeps.layout import RESOLVED_SPEC, Sweep
from sweeps.spec import SweepSpec
from sweeps.status import outcome_tags

if TYPE_CHECKING:
    from sweeps.outcome import SweepOutcome


def trials_view(spec: SweepSpec, name: str) -> dict[str, Any]:
    """MLflow's runs-table view of sweep ``name``: its trials only (not nested under the collapsed
    parent), best label-free score first, with the searched params, the architecture, loss, score,
    the frozen linear probe and kNN accuracies, status and health as columns."""
    params = dict.fromkeys([*spec.keys(), ARCH_PARAM])
    return {
        "searchFilter": f"tags.`{SWEEP_TAG}` = '{name}' and tags.`{KIND_TAG}` = '{KIND_TRIAL}'",
        "orderByKey": f"metrics.`{TRAIN_SCORE}`",
        "orderByAsc": True,
        "selectedColumns": [
            *(f"params.`{key}`" for key in params),
            *(f"metrics.`{key}`" for key in (TRAIN_SCORE, EPOCH_LOSS, LINEAR_PROBE_ACC, KNN_ACC)),
            *(f"tags.`{key}`" for key in (STATUS_TAG, HEALTH_TAG)),
        ],
    }


def create_parent_run(spec: SweepSpec, name: str, path: Path, uri: str) -> str:
    """Open the sweep's parent run (tags, the sweep's settings as params, the spec and resolved spec
    as artifacts); returns its id. Nothing is left behind when a step fails."""
    client = MlflowClient(uri)
    experiment_id = get_or_create_experiment(client, spec.tracking.experiment, uri)
    tags = {KIND_TAG: KIND_SWEEP, SWEEP_TAG: name, STORAGE_TAG: str(path), SPEC_TAG: str(spec.path.resolve())}
    if spec.description:
        tags[NOTE_TAG] = spec.description
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    client.set_experiment_tag(experiment_id, shared_view_tag(name), json.dumps(trials_view(spec, name)))
    params = {
        "num_trials": spec.num_trials(),
        "num_samples": spec.num_samples,
        "space": ", ".join(spec.keys()),
        "search": spec.search.algo,
        "search.metric": spec.search.metric,
        "scheduler": spec.scheduler.type,
        "max_concurrent_trials": spec.max_concurrent_trials,
        "max_failures": spec.max_failures,
        "score_alpha": spec.score_alpha,
        "epochs": spec.epochs,
    }
    try:
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        client.log_artifact(run.info.run_id, str(spec.path), artifact_path="spec")
        client.log_artifact(run.info.run_id, str(path / RESOLVED_SPEC), artifact_path="spec")
    except BaseException:  # no half-created parent run either
        with contextlib.suppress(Exception):
            client.delete_run(run.info.run_id)
        raise
    return run.info.run_id


def reopen_parent_run(sweep: Sweep, restart: bool) -> None:
    """RUNNING again for ``--resume``, tagged with when it resumed (or restarted from scratch)."""
    client = MlflowClient(sweep.tracking_uri)
    client.update_run(sweep.parent_run_id, status=RUNNING)
    client.set_tag(
        sweep.parent_run_id, RESTARTED_AT_TAG if restart else RESUMED_AT_TAG, datetime.now().isoformat(timespec="seconds")
    )


def close_parent_run(client: MlflowClient, sweep: Sweep, status: str) -> None:
    """End the parent run as the sweep ended (``status``: finished, interrupted or failed)."""
    client.set_terminated(sweep.parent_run_id, run_status(status))


def child_runs(client: MlflowClient, sweep: Sweep) -> dict[str | None, Any]:
    """The trial runs nested under the sweep's parent run, by trial id."""
    experiment_id = get_or_create_experiment(client, sweep.experiment, sweep.tracking_uri)
    return {
        r.data.tags.get(TRIAL_ID_TAG): r
        for r in client.search_runs(
            [experiment_id], filter_string=f"tags.{PARENT_TAG} = '{sweep.parent_run_id}'", max_results=10_000
        )
    }


def close_child_run(client: MlflowClient, run: Any, status: str, epoch: int | None) -> None:
    """End a trial's run as its trial ended: :func:`~lejepa.record.run_status` and
    :func:`~sweeps.status.outcome_tags` (a run already in that status is left as it is)."""
    target = run_status(status)
    tags = outcome_tags(status, epoch)
    if tags:
        client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    if run.info.status != target:
        client.set_terminated(run.info.run_id, target)


def log_best(client: MlflowClient, outcome: SweepOutcome) -> None:
    """The trial counts per status and the best trials (metric, trial id, run id) on the parent run."""
    now = int(time.time() * 1000)
    metrics = [
        Metric(trials_metric(s), float(outcome.count(s)), now, 0)
        for s in (STATUS_FINISHED, STATUS_PRUNED, STATUS_COLLAPSED, STATUS_DIVERGED, STATUS_FAILED)
    ]
    tags = []
    for attr, mode, key in (("score", "min", BEST_SCORE), ("linear_acc", "max", BEST_LINEAR_PROBE_ACC)):
        best = outcome.best(attr, mode, healthy_only=attr == "score")
        if best is not None:
            metrics.append(Metric(key, float(getattr(best, attr)), now, 0))
            tags += [RunTag(best_trial_tag(key), best.trial_id), RunTag(best_run_tag(key), best.run_id or "")]
    client.log_batch(outcome.sweep.parent_run_id, metrics=metrics, tags=tags)
