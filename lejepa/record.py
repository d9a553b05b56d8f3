"""The record: the single definition of what a run writes to MLflow and to its run folder.

Every producer (the trainer and its callbacks, :mod:`lejepa.tracking`, the sweep layer) and every
consumer (:mod:`analysis`, the benchmarks, the notebook, the tests) names metric keys, tag keys,
status values and file names through this module, so a key renamed here is renamed everywhere and
a key spelled anywhere else is a bug (``tests/test_record.py`` fails on any logged key that is not
declared here). Pure constants and functions: no third-party import.

The record of one training run (an MLflow run, nested under its sweep's parent run when it is a
trial):

- per step, every ``train.log_every`` steps: :data:`STEP_METRICS`;
- per epoch, at the epoch's last global step: :data:`EPOCH_METRICS` (a sweep trial adds
  :data:`TRAIN_SCORE`, the label-free score :func:`label_free_score`);
- at the end, at the last step: :data:`FINAL_METRICS`;
- tags: :data:`ARCH_TAG`, :data:`FAMILY_TAG`, :data:`DATASET_TAG`, :data:`RUN_DIR_TAG` at creation,
  the outcome (:data:`STATUS_TAG`, :data:`HEALTH_TAG`, ...) at the end; :data:`RUN_TAGS` lists them;
- files in the run folder: :data:`CONFIG_FILE`, :data:`RUN_FILE` and ``checkpoints/epoch_NNNN/``
  holding :data:`STATE_FILE` and :data:`META_FILE`.

A sweep's parent run carries :data:`SWEEP_TAGS` and :data:`SWEEP_METRICS`; its folder holds
:data:`SWEEP_FILE`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- files
CONFIG_FILE = "config.yaml"
"""The resolved config a run folder keeps (``lejepa train --resume`` reads it back)."""
STATE_FILE = "state.pt"
"""A checkpoint's tensors and plain values (``torch.load(weights_only=True)``)."""
META_FILE = "meta.json"
"""A checkpoint's epoch, step, arch, metrics and the SHA-256 of :data:`STATE_FILE`."""
CHECKPOINTS_DIR = "checkpoints"
"""The folder of a run's checkpoints, ``<run>/checkpoints/epoch_NNNN/``."""
RUN_FILE = "mlflow_run.json"
"""The MLflow run a run folder belongs to (run id and tracking URI): a resumed run continues it."""
SPOOL_FILE = "mlflow_undelivered.json"
"""What a run could not deliver to MLflow (metrics, tags, artifacts, final status), kept until it can
(:mod:`lejepa.spool`; ``lejepa sync`` or the run's next start delivers it)."""
RUN_LOCK = ".lock"
"""The run folder's lock file (held by the process training it; ``lejepa sync`` takes it too)."""
SWEEP_FILE = "sweep.json"
"""In a sweep's folder: its parent run id, tracking URI and experiment (what ``--resume`` reattaches)."""
CHECKPOINT_ARTIFACT = "checkpoint"
"""The artifact path of a run's final checkpoint (``runs:/<run id>/checkpoint``)."""
CRITERIA_CACHE = "criteria_cache.csv"
"""In ``lejepa select``'s report folder: each checkpoint's criteria as computed (a rerun resumes)."""

# --------------------------------------------------------------------------- tracking stores
TRACKING_DB = "mlflow.db"
"""The default embedded store, ``<train.out_dir>/mlflow.db``."""
ARTIFACTS_DIR = "mlartifacts"
"""The artifact folder beside a SQLite store."""
SQLITE_PREFIX = "sqlite:///"
"""An embedded SQLite store's URI is this prefix and the database's path."""


def sqlite_uri(path: object) -> str:
    """The tracking URI of the SQLite database at ``path`` (made absolute by the caller)."""
    return SQLITE_PREFIX + str(path)


def default_tracking_uri(out_dir: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an embedded SQLite store ``<out_dir>/mlflow.db`` (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return sqlite_uri(Path(out_dir).expanduser().resolve() / TRACKING_DB)


def sqlite_path(uri: str) -> str | None:
    """The database path of a SQLite tracking URI, else None (a server, or another scheme)."""
    return uri[len(SQLITE_PREFIX) :] if uri.startswith(SQLITE_PREFIX) else None


# --------------------------------------------------------------------------- metrics: per step
TRAIN_LOSS = "train/loss"
TRAIN_INVARIANCE = "train/invariance"
TRAIN_SIGREG = "train/sigreg"
TRAIN_PROBE_LOSS = "train/probe_loss"
TRAIN_LR = "train/lr"
STEP_METRICS = (TRAIN_LOSS, TRAIN_INVARIANCE, TRAIN_SIGREG, TRAIN_PROBE_LOSS, TRAIN_LR)
"""Logged every ``train.log_every`` steps: the objective, its two terms, the online probe's loss, the learning rate."""

# --------------------------------------------------------------------------- metrics: per epoch
EPOCH = "epoch"
"""The epoch number (1-based), logged at the epoch's last global step: it maps steps to epochs."""
EPOCH_LOSS = "epoch/loss"
EPOCH_INVARIANCE = "epoch/invariance"
EPOCH_SIGREG = "epoch/sigreg"
EPOCH_PROBE_LOSS = "epoch/probe_loss"
EPOCH_IMAGES_PER_SEC = "epoch/images_per_sec"
EPOCH_TIME_S = "epoch/time_s"
EPOCH_LR = "epoch/lr"
ONLINE_TRAIN_ACC = "probe/online_train_acc"
"""The online probe's accuracy on the epoch's training views."""
ONLINE_TEST_ACC = "probe/online_test_acc"
"""The online probe's accuracy on the test images (or ``train.online_eval_images`` of them)."""

HEALTH_PREFIX = "health/"
COLLAPSE_RATIO = "health/collapse_ratio"
PROJ_RANK = "health/proj_rank"
PROJ_STD_SPREAD = "health/proj_std_spread"
FEATURE_RANK = "health/feature_rank"
HEALTH_METRICS = (COLLAPSE_RATIO, PROJ_RANK, PROJ_STD_SPREAD, FEATURE_RANK)
"""Epoch metrics the trainer logs (:mod:`lejepa.health`): collapse ratio, projector effective rank /
min(batch, dimension), spread of the projector's per-dimension stds, backbone-feature effective
rank / min(batch, width)."""
VERDICT = "health/verdict"
"""The epoch's health verdict, as its index in :data:`VERDICTS`."""

TRAIN_SCORE = "train/score"
"""The label-free score a sweep trial adds to every epoch: :func:`label_free_score` of ``epoch/loss``."""

EPOCH_METRICS = (
    EPOCH,
    EPOCH_LOSS,
    EPOCH_INVARIANCE,
    EPOCH_SIGREG,
    EPOCH_PROBE_LOSS,
    EPOCH_IMAGES_PER_SEC,
    EPOCH_TIME_S,
    EPOCH_LR,
    ONLINE_TRAIN_ACC,
    ONLINE_TEST_ACC,
    *HEALTH_METRICS,
    VERDICT,
    TRAIN_SCORE,
)
"""Logged at each epoch's end (the health ones when ``train.health``, the score by sweep trials)."""

# --------------------------------------------------------------------------- metrics: at the end
EVAL_PREFIX = "eval/"
INIT_PREFIX = "eval/init_"
LINEAR_PROBE_ACC = "eval/linear_probe_acc"
"""The frozen-backbone linear probe's test accuracy."""
KNN_ACC = "eval/knn_acc"
"""The frozen-backbone kNN classifier's test accuracy."""
ONLINE_PROBE_ACC = "eval/online_probe_acc"
"""The online probe's accuracy on the whole test set at the end."""


def init_metric(key: str) -> str:
    """The random-init baseline of a final metric: ``eval/x`` → ``eval/init_x`` (``train.eval_at_init``)."""
    return key.replace(EVAL_PREFIX, INIT_PREFIX)


INIT_LINEAR_PROBE_ACC = init_metric(LINEAR_PROBE_ACC)
INIT_KNN_ACC = init_metric(KNN_ACC)
FINAL_METRICS = (LINEAR_PROBE_ACC, KNN_ACC, ONLINE_PROBE_ACC, INIT_LINEAR_PROBE_ACC, INIT_KNN_ACC)
"""Logged once at the end, at the last step."""


# --------------------------------------------------------------------------- Tune reports of a trial
DIVERGED_FLAG = "diverged"
"""1 in the last report of a trial whose loss became NaN or infinite."""
DIVERGED_STEP = "diverged_step"
"""The step at which it did."""
COLLAPSED_FLAG = "collapsed"
"""1 in the last report of a trial stopped by label-free pruning (``train.collapse_patience``)."""

# --------------------------------------------------------------------------- metrics of a sweep's parent run
TRIALS_PREFIX = "trials/"
BEST_SCORE = "best/train_score"
"""The lowest final ``train/score`` among healthy finished trials."""
BEST_LINEAR_PROBE_ACC = "best/linear_probe_acc"
"""The highest final linear-probe accuracy (labels: evidence, never the pick)."""


def trials_metric(status: str) -> str:
    """The parent run's count of trials that ended with ``status`` (one of :data:`STATUSES`)."""
    return TRIALS_PREFIX + status


# --------------------------------------------------------------------------- params
NUM_PARAMS_PARAM = "model.num_params"
"""The backbone's parameter count, logged beside the flattened config (every config key is a param)."""
ARCH_PARAM = "model.arch"
"""The architecture, as every run logs its config (dotted keys)."""
LAM_PARAM = "loss.lam"
"""λ, the SIGReg weight, as every run logs its config."""

# --------------------------------------------------------------------------- metrics: the run's settings
HPARAM_PREFIX = "hparam/"
HPARAM_KEYS = (LAM_PARAM, "loss.num_slices", "optim.lr", "optim.batch_size")
"""The config keys also logged as metrics ``hparam/<last part>`` (step 0), because MLflow compares
params as strings: ``metrics.`hparam/lam` < 0.1`` filters, sorts and charts where
``params.`loss.lam` < '0.1'`` cannot."""
HPARAM_NUM_PARAMS = "hparam/num_params_m"
"""The backbone's parameter count in millions, beside them."""


def hparam_metric(key: str) -> str:
    """The metric that holds config key ``key`` as a number: ``loss.lam`` → ``hparam/lam``."""
    return HPARAM_PREFIX + key.rsplit(".", 1)[-1]


def hparam_metrics(flat: dict[str, object], num_params: int) -> dict[str, float]:
    """The run's :data:`HPARAM_KEYS` (from its flattened config) and parameter count as metric values."""
    values = {hparam_metric(k): float(flat[k]) for k in HPARAM_KEYS if isinstance(flat.get(k), (int, float))}  # type: ignore[arg-type]
    return {**values, HPARAM_NUM_PARAMS: num_params / 1e6}


HPARAM_METRICS = (*(hparam_metric(k) for k in HPARAM_KEYS), HPARAM_NUM_PARAMS)
"""Logged once at the start, at step 0."""

RUN_METRICS = frozenset((*STEP_METRICS, *EPOCH_METRICS, *FINAL_METRICS, *HPARAM_METRICS))
"""Every metric key a training run (or sweep trial) logs."""

# --------------------------------------------------------------------------- tags
PARENT_TAG = "mlflow.parentRunId"
"""MLflow's nesting tag: a trial's run points at its sweep's parent run."""
NOTE_TAG = "mlflow.note.content"
"""MLflow's run description (a sweep's ``description``)."""
ARCH_TAG = "arch"
FAMILY_TAG = "family"
DATASET_TAG = "dataset"
RUN_DIR_TAG = "lejepa.run_dir"
"""The run's folder (absolute): its config and checkpoints."""
CHECKPOINT_TAG = "lejepa.checkpoint"
"""The final checkpoint's folder; set when it was logged as the artifact :data:`CHECKPOINT_ARTIFACT`."""
HEALTH_TAG = "lejepa.health"
"""The run's health verdict (one of :data:`VERDICTS`): its last epoch's, or diverged / collapsed."""
STATUS_TAG = "lejepa.status"
"""How a run ended when it did not simply finish: one of :data:`STATUSES` (absent = finished)."""
ERROR_TAG = "lejepa.error"
"""``<exception type>: <message>`` of a failed run."""
PREVIOUS_ERROR_TAG = "lejepa.previous_error"
"""A continued run's error of the attempt before."""
UNDELIVERED_TAG = "lejepa.undelivered"
"""The artifacts a finished run could not write to its artifact store, and why (kept in its
:data:`SPOOL_FILE`; removed once ``lejepa sync`` delivers them)."""
RESUMED_FROM_EPOCH_TAG = "lejepa.resumed_from_epoch"
DIVERGED_STEP_TAG = "lejepa.diverged_step"
COLLAPSED_AT_EPOCH_TAG = "lejepa.collapsed_at_epoch"
PRUNED_AT_EPOCH_TAG = "lejepa.pruned_at_epoch"
OUTCOME_TAGS = (ERROR_TAG, STATUS_TAG, DIVERGED_STEP_TAG, COLLAPSED_AT_EPOCH_TAG, HEALTH_TAG)
"""The tags of an attempt's outcome, cleared when the run is continued (its error kept as
:data:`PREVIOUS_ERROR_TAG`)."""

KIND_TAG = "lejepa.kind"
"""``sweep`` on a sweep's parent run, ``trial`` on its trials' runs."""
KIND_SWEEP = "sweep"
KIND_TRIAL = "trial"
SWEEP_TAG = "lejepa.sweep"
"""The sweep's name, on its parent run and on every trial run."""
TRIAL_ID_TAG = "lejepa.trial_id"
"""Ray Tune's trial id: a retried or restored trial finds its run by it."""
RAY_NODE_TAG = "lejepa.ray_node"
"""The Ray node of a trial's current attempt."""
STORAGE_TAG = "lejepa.storage"
"""A sweep's folder."""
SPEC_TAG = "lejepa.spec"
"""A sweep's spec file."""
RESUMED_AT_TAG = "lejepa.resumed_at"
RESTARTED_AT_TAG = "lejepa.restarted_at"
"""When a sweep was resumed, or started over in place (stopped before its first trial was recorded)."""


def best_trial_tag(metric: str) -> str:
    """The parent-run tag naming the trial of a best-of metric (``best/x`` → ``lejepa.best_x_trial``)."""
    return f"lejepa.{metric.replace('/', '_')}_trial"


def best_run_tag(metric: str) -> str:
    """The parent-run tag holding the run id of a best-of metric's trial."""
    return f"lejepa.{metric.replace('/', '_')}_run"


def best_checkpoint_tag(metric: str) -> str:
    """The parent-run tag holding the final checkpoint folder of a best-of metric's trial."""
    return f"lejepa.{metric.replace('/', '_')}_checkpoint"


OVERVIEW_ARTIFACT = "overview"
"""The parent run's artifact folder of the sweep's overview: ``trials.csv`` and its figures."""

# Tags ``lejepa select`` sets on a sweep's parent run (beside its report, the artifact folder ``selection/``)
SELECTION_ARTIFACT = "selection"
SELECTED_SCORE_TAG = "lejepa.selected.score"
SELECTED_RUN_ID_TAG = "lejepa.selected.run_id"
SELECTED_EPOCH_TAG = "lejepa.selected.epoch"
SELECTED_CHECKPOINT_TAG = "lejepa.selected.checkpoint"

RUN_TAGS = frozenset(
    (
        PARENT_TAG,
        ARCH_TAG,
        FAMILY_TAG,
        DATASET_TAG,
        RUN_DIR_TAG,
        CHECKPOINT_TAG,
        HEALTH_TAG,
        STATUS_TAG,
        ERROR_TAG,
        PREVIOUS_ERROR_TAG,
        UNDELIVERED_TAG,
        RESUMED_FROM_EPOCH_TAG,
        DIVERGED_STEP_TAG,
        COLLAPSED_AT_EPOCH_TAG,
        PRUNED_AT_EPOCH_TAG,
        KIND_TAG,
        SWEEP_TAG,
        TRIAL_ID_TAG,
        RAY_NODE_TAG,
    )
)
"""Every tag a training run (or sweep trial) may carry, besides MLflow's own ``mlflow.*`` tags."""
SWEEP_TAGS = frozenset(
    (
        KIND_TAG,
        SWEEP_TAG,
        STORAGE_TAG,
        SPEC_TAG,
        NOTE_TAG,
        RESUMED_AT_TAG,
        RESTARTED_AT_TAG,
        SELECTED_SCORE_TAG,
        SELECTED_RUN_ID_TAG,
        SELECTED_EPOCH_TAG,
        SELECTED_CHECKPOINT_TAG,
        *(f(m) for m in (BEST_SCORE, BEST_LINEAR_PROBE_ACC) for f in (best_trial_tag, best_run_tag)),
        best_checkpoint_tag(BEST_SCORE),
    )
)
"""Every tag a sweep's parent run may carry."""

# Tags of a model version registered by ``lejepa select --register``
MODEL_SCORE_TAG = "lejepa.score"
"""The score that chose the checkpoint."""
MODEL_EPOCH_TAG = "lejepa.epoch"
"""The checkpoint's epoch."""
MODEL_LAM_TAG = "loss.lam"
"""The checkpoint's λ."""

# Tags of an experiment
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""MLflow's experiment kind, set when this project creates an experiment."""
EXPERIMENT_KIND = "custom_model_development"
"""Model training: MLflow's UI opens such an experiment on its runs table, not the GenAI overview."""
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
"""An experiment tag ``<prefix><key>`` holds a runs-table view (JSON: filter, sort, columns) that
MLflow's UI opens at ``...#/experiments/<id>/runs?viewStateShareKey=<key>``."""


def shared_view_tag(sweep: str) -> str:
    """The experiment tag holding sweep ``sweep``'s runs-table view (the key is the sweep's name)."""
    return SHARED_VIEW_PREFIX + sweep


# --------------------------------------------------------------------------- run statuses
RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
"""MLflow run statuses."""

STATUS_FINISHED, STATUS_PRUNED, STATUS_COLLAPSED, STATUS_DIVERGED = "finished", "pruned", "collapsed", "diverged"
STATUS_FAILED, STATUS_INTERRUPTED, STATUS_PENDING = "failed", "interrupted", "pending"
STATUSES = (STATUS_FINISHED, STATUS_PRUNED, STATUS_COLLAPSED, STATUS_DIVERGED, STATUS_FAILED, STATUS_INTERRUPTED, STATUS_PENDING)
"""How a run or trial ended (:data:`STATUS_TAG`; a sweep's summary); :func:`run_status` maps each
to the MLflow status the run ends with."""

_RUN_STATUS = {
    STATUS_FINISHED: FINISHED,
    STATUS_PRUNED: FINISHED,
    STATUS_COLLAPSED: FINISHED,
    STATUS_FAILED: FAILED,
    STATUS_DIVERGED: FAILED,
}


def run_status(status: str) -> str:
    """The MLflow status a run ends with when it (a training run, a trial or a sweep) ended as
    ``status``, the one rule for all of them: FINISHED for finished, pruned and collapsed (results:
    pruning is an outcome), FAILED for failed and diverged, KILLED for interrupted and pending
    (``--resume`` continues them)."""
    return _RUN_STATUS.get(status, KILLED)


# --------------------------------------------------------------------------- health verdicts
HEALTHY, DIMENSIONAL, COLLAPSED, DIVERGED = "healthy", "dimensional collapse", "collapsed", "diverged"
VERDICTS = (HEALTHY, DIMENSIONAL, COLLAPSED, DIVERGED)
"""Verdict names (:mod:`lejepa.health`); a verdict is logged as the metric ``health/verdict`` = its
index here, and as the tag :data:`HEALTH_TAG` = its name."""

# --------------------------------------------------------------------------- the label-free score
SCORE_ALPHA = 0.4
"""The paper's fixed α of the label-free score ``loss / λ^α`` (a sweep's default ``score_alpha``;
:mod:`analysis.correlation`'s ``loss_lam``)."""


def label_free_score(loss: Any, lam: Any, alpha: Any = SCORE_ALPHA) -> Any:
    """``loss / λ^α`` (docs/method.md §3): ranks runs across λ without labels (lower is better).
    Floats, or numpy arrays element-wise; λ must be positive (:func:`analysis.correlation.lambda_scaled`
    masks λ ≤ 0)."""
    return loss / lam**alpha
