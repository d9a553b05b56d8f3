"""The MLflow record has one schema: every key a real run logs is declared in :mod:`lejepa.record`.

A tiny sweep trial (the real :class:`~lejepa.trainer.Trainer` and the trial's MLflow callback,
nested under a parent run, no Ray) trains one epoch into a SQLite store; a second run fails,
diverges and is continued. A metric or tag that bypasses the schema fails here.
"""

from __future__ import annotations

import math

import pytest
from mlflow import MlflowClient

from lejepa import record
from lejepa.callbacks import RunInfo
from lejepa.config import build_config, load_config
from lejepa.errors import TrainingCollapsed, TrainingDiverged
from lejepa.tracking import MLflowCallback
from lejepa.trainer import Trainer
from sweeps.trainable import TrialTracking

from helpers import TINY


def _ours(tags: dict[str, str]) -> set[str]:
    """The tag keys this project writes: ``lejepa.*`` and MLflow's nesting tag."""
    return {k for k in tags if k.startswith("lejepa.") or k == record.PARENT_TAG}


def test_every_key_a_trained_trial_logs_is_declared(tmp_path):
    uri = record.sqlite_uri(tmp_path / record.TRACKING_DB)
    client = MlflowClient(uri)
    parent = client.create_run(
        client.create_experiment("record"), run_name="sweep", tags={record.KIND_TAG: record.KIND_SWEEP, record.SWEEP_TAG: "s"}
    ).info.run_id
    cfg = load_config(None, TINY + [f"train.out_dir={tmp_path}", "train.epochs=1", "train.eval_at_init=true"])
    tracking = TrialTracking(
        uri,
        experiment="record",
        parent_run_id=parent,
        lam=cfg.loss.lam,
        alpha=record.SCORE_ALPHA,
        node_id="node",
        flush_every=1,
        tags={record.KIND_TAG: record.KIND_TRIAL, record.SWEEP_TAG: "s", record.TRIAL_ID_TAG: "t0"},
    )
    trainer = Trainer(cfg, run_dir=tmp_path / "t0")
    trainer.add_callback(tracking)
    final = trainer.fit()

    run = client.get_run(tracking.run_id)
    metrics, tags = set(run.data.metrics), run.data.tags
    assert metrics <= record.RUN_METRICS, metrics - record.RUN_METRICS
    assert _ours(tags) <= record.RUN_TAGS, _ours(tags) - record.RUN_TAGS
    assert {k for k in tags if not k.startswith("mlflow.")} - _ours(tags) <= record.RUN_TAGS  # arch, family, dataset
    # what the trainer produces is what the schema says it produces
    assert set(final) == set(record.FINAL_METRICS)
    declared = (record.STEP_METRICS, record.EPOCH_METRICS, record.FINAL_METRICS, record.HPARAM_METRICS)
    assert set().union(*declared) == metrics
    # the searched settings are numbers MLflow compares as numbers (params are strings)
    hparams = {k: run.data.metrics[k] for k in record.HPARAM_METRICS}
    assert hparams == {
        "hparam/lam": cfg.loss.lam,
        "hparam/num_slices": cfg.loss.num_slices,
        "hparam/lr": cfg.optim.lr,
        "hparam/batch_size": cfg.optim.batch_size,
        "hparam/num_params_m": pytest.approx(sum(p.numel() for p in trainer.model.backbone.parameters()) / 1e6),
    }
    below = f"metrics.`hparam/lam` < {2 * cfg.loss.lam} and metrics.`hparam/batch_size` = {cfg.optim.batch_size}"
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id], below)] == [tracking.run_id]
    assert client.search_runs([run.info.experiment_id], f"metrics.`hparam/lam` < {cfg.loss.lam / 2}") == []
    assert tags[record.PARENT_TAG] == parent and tags[record.HEALTH_TAG] in record.VERDICTS
    assert (tmp_path / "t0" / record.CONFIG_FILE).is_file() and (tmp_path / "t0" / record.RUN_FILE).is_file()
    epoch_loss = client.get_metric_history(tracking.run_id, record.EPOCH_LOSS)[0].value
    score = client.get_metric_history(tracking.run_id, record.TRAIN_SCORE)[0].value
    assert score == pytest.approx(record.label_free_score(epoch_loss, cfg.loss.lam))


def test_failure_and_continuation_tags_are_declared(tmp_path):
    uri = record.sqlite_uri(tmp_path / record.TRACKING_DB)
    info = RunInfo(build_config({}), tmp_path / "run", 0, 0, 10, 30, "cpu", 1, 123)
    first = MLflowCallback(uri, flush_every=1)
    first.on_train_start(info)
    first.on_step_end(1, {record.TRAIN_LOSS: 1.0})
    first.on_failure(TrainingDiverged(1, math.nan))
    second = MLflowCallback(uri, flush_every=1)  # continued through the run folder's mlflow_run.json
    second.on_train_start(RunInfo(build_config({}), tmp_path / "run", 1, 10, 10, 30, "cpu", 1, 123))
    second.on_failure(RuntimeError("stopped"))

    tags = MlflowClient(uri).get_run(first.run_id).data.tags
    assert second.run_id == first.run_id
    assert _ours(tags) <= record.RUN_TAGS, _ours(tags) - record.RUN_TAGS
    assert {record.PREVIOUS_ERROR_TAG, record.RESUMED_FROM_EPOCH_TAG, record.ERROR_TAG} <= set(tags)


def test_schema_helpers_spell_the_keys_they_stand_for():
    assert record.init_metric(record.LINEAR_PROBE_ACC) == record.INIT_LINEAR_PROBE_ACC == "eval/init_linear_probe_acc"
    assert record.best_trial_tag(record.BEST_SCORE) == "lejepa.best_train_score_trial"
    assert record.best_run_tag(record.BEST_LINEAR_PROBE_ACC) == "lejepa.best_linear_probe_acc_run"
    assert record.trials_metric(record.STATUS_PRUNED) == "trials/pruned"
    assert record.sqlite_path(record.sqlite_uri("/a/b.db")) == "/a/b.db" and record.sqlite_path("http://h:1") is None
    assert record.label_free_score(2.0, 0.25, 0.5) == 4.0 and record.label_free_score(2.0, 0.25, 0.0) == 2.0
    assert len(set(record.STATUSES)) == len(record.STATUSES) and record.STATUS_DIVERGED == record.DIVERGED


@pytest.mark.parametrize(
    "error, status",
    [
        (KeyboardInterrupt(), record.STATUS_INTERRUPTED),
        (RuntimeError("boom"), record.STATUS_FAILED),
        (TrainingDiverged(3, math.nan), record.STATUS_DIVERGED),
        (TrainingCollapsed(2, 0.01, 1), record.STATUS_COLLAPSED),
    ],
)
def test_a_plain_run_ends_by_the_same_status_rule_as_a_sweep_trial(tmp_path, error, status):
    """One rule (:func:`lejepa.record.run_status`) for a plain run and a trial: the MLflow status of
    a run that ended as ``status`` (a trial's is set by the sweep from the same function)."""
    uri = record.sqlite_uri(tmp_path / record.TRACKING_DB)
    callback = MLflowCallback(uri, flush_every=1)
    callback.on_train_start(RunInfo(build_config({}), tmp_path / "run", 0, 0, 10, 30, "cpu", 1, 123))
    callback.on_failure(error)
    expected = {
        record.STATUS_INTERRUPTED: "KILLED",
        record.STATUS_FAILED: "FAILED",
        record.STATUS_DIVERGED: "FAILED",
        record.STATUS_COLLAPSED: "FINISHED",
    }[status]
    assert record.run_status(status) == expected
    assert MlflowClient(uri).get_run(callback.run_id).info.status == expected
