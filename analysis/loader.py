"""A finished sweep, from MLflow into pandas.

:func:`load_sweep` finds the trials of a sweep — given its name (tag ``lejepa.sweep`` on the
parent run, ``lejepa.kind=sweep``), its parent run id, or an experiment name (every non-sweep
run of that experiment) — and returns a :class:`Sweep` whose ``epochs`` table has one row per
trial × logged epoch:

- identity: ``run_id``, ``run_name``, ``trial``, ``arch``, ``family``, ``dataset``, ``run_dir``,
  ``status`` (the sweep's ``lejepa.status``: finished, pruned, collapsed);
- hyper-parameters: every MLflow param as ``params.<key>`` (strings, as logged) and the numeric
  ``lam``, ``lr``, ``weight_decay``, ``num_slices``;
- per-epoch metrics (value at the epoch's last global step): ``epoch``, ``step``, ``loss``,
  ``invariance``, ``sigreg``, ``online_acc``, ``online_train_acc``, ``images_per_sec``,
  ``train_score`` when the sweep reported one, and the health measures (``collapse_ratio``,
  ``proj_rank``, ``proj_std_spread``, ``feature_rank``, ``verdict_code``) when training logged them;
- final metrics on the run's last epoch only: ``linear_probe_acc``, ``knn_acc``,
  ``online_probe_acc``, the random-init baseline ``init_linear_probe_acc`` and ``init_knn_acc``
  (when the run had ``train.eval_at_init``) and ``wall_s`` (run start to end); ``is_final``
  marks that row;
- the checkpoint reference: ``checkpoint`` (the epoch's folder under the run folder, if it is on
  this disk) and ``checkpoint_uri`` (``runs:/<id>/checkpoint``, the final checkpoint logged as an
  artifact).

Diverged, failed, killed and unfinished trials are left out, each with a note; trials pruned by
the scheduler (``lejepa.status=pruned``) or stopped as collapsed (``lejepa.status=collapsed``)
stay in, without final metrics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from lejepa.checkpoint import checkpoint_name
from lejepa.errors import LejepaError, did_you_mean
from lejepa.record import (
    ARCH_TAG,
    CHECKPOINT_ARTIFACT,
    CHECKPOINT_TAG,
    CHECKPOINTS_DIR,
    COLLAPSE_RATIO,
    DATASET_TAG,
    DIVERGED_STEP_TAG,
    EPOCH,
    EPOCH_IMAGES_PER_SEC,
    EPOCH_INVARIANCE,
    EPOCH_LOSS,
    EPOCH_SIGREG,
    FAMILY_TAG,
    FEATURE_RANK,
    FINISHED,
    INIT_KNN_ACC,
    INIT_LINEAR_PROBE_ACC,
    KIND_SWEEP,
    KIND_TAG,
    KNN_ACC,
    LINEAR_PROBE_ACC,
    ONLINE_PROBE_ACC,
    ONLINE_TEST_ACC,
    ONLINE_TRAIN_ACC,
    PARENT_TAG,
    PROJ_RANK,
    PROJ_STD_SPREAD,
    RUN_DIR_TAG,
    STATUS_COLLAPSED,
    STATUS_DIVERGED,
    STATUS_FINISHED,
    STATUS_PRUNED,
    STATUS_TAG,
    SWEEP_TAG,
    TRAIN_SCORE,
    TRIAL_ID_TAG,
    VERDICT,
)

EPOCH_METRICS = {
    EPOCH_LOSS: "loss",
    EPOCH_INVARIANCE: "invariance",
    EPOCH_SIGREG: "sigreg",
    ONLINE_TEST_ACC: "online_acc",
    ONLINE_TRAIN_ACC: "online_train_acc",
    EPOCH_IMAGES_PER_SEC: "images_per_sec",
    TRAIN_SCORE: "train_score",
    COLLAPSE_RATIO: "collapse_ratio",
    PROJ_RANK: "proj_rank",
    PROJ_STD_SPREAD: "proj_std_spread",
    FEATURE_RANK: "feature_rank",
    VERDICT: "verdict_code",
}
"""Per-epoch metrics (:mod:`lejepa.record`) → their column in :attr:`Sweep.epochs`."""
FINAL_METRICS = {
    LINEAR_PROBE_ACC: "linear_probe_acc",
    KNN_ACC: "knn_acc",
    ONLINE_PROBE_ACC: "online_probe_acc",
    INIT_LINEAR_PROBE_ACC: "init_linear_probe_acc",
    INIT_KNN_ACC: "init_knn_acc",
}
"""Final metrics → their column (on a run's last epoch only)."""
NUMERIC_PARAMS = {"loss.lam": "lam", "optim.lr": "lr", "optim.weight_decay": "weight_decay", "loss.num_slices": "num_slices"}
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Sweep:
    """A sweep's trials as a table (see the module docstring) plus where it came from."""

    name: str
    tracking_uri: str
    parent_run_id: str | None
    epochs: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)
    """Trials left out of ``epochs``: ``run_id``, ``trial``, ``arch``, ``status`` (the sweep's
    ``lejepa.status`` tag, else why: ``diverged at step N``, ``failed``, ``killed``, ``running``,
    ``no epoch logged``)."""

    @property
    def runs(self) -> pd.DataFrame:
        """One row per trial: its last epoch (final loss and final probe metrics)."""
        return self.epochs[self.epochs["is_final"]].reset_index(drop=True)

    @property
    def checkpoints(self) -> pd.DataFrame:
        """The rows whose checkpoint can be loaded (on disk or as an MLflow artifact)."""
        has = self.epochs["checkpoint"].notna() | self.epochs["checkpoint_uri"].notna()
        return self.epochs[has].reset_index(drop=True)


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _experiment_ids(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments(max_results=50000)]


def _sweep_parents(client: MlflowClient, name: str | None = None) -> list[Run]:
    where = f"tags.`{KIND_TAG}` = '{KIND_SWEEP}'" + (f" and tags.`{SWEEP_TAG}` = '{name}'" if name else "")
    return _search(client, _experiment_ids(client), where)


def _children(client: MlflowClient, parent_id: str) -> list[Run]:
    return _search(client, _experiment_ids(client), f"tags.{PARENT_TAG} = '{parent_id}'")


def resolve(client: MlflowClient, ref: str) -> tuple[str, str | None, list[Run], list[str]]:
    """(sweep name, parent run id or None, candidate trial runs, notes) for ``ref``, tried as a
    parent run id, a sweep name, an experiment name, then a sweep-name prefix (newest match:
    the sweep layer gives every sweep a unique name such as ``quickstart-<timestamp>``)."""
    if "'" in ref or not ref.strip():
        raise LejepaError(f"invalid sweep reference {ref!r}")
    if RUN_ID.match(ref):
        try:
            parent = client.get_run(ref)
        except MlflowException:
            parent = None
        if parent is not None:
            return parent.data.tags.get(SWEEP_TAG, parent.info.run_name), ref, _children(client, ref), []
    parents = _sweep_parents(client, ref)
    notes = [f"{len(parents)} sweep runs are named {ref!r}: using the newest"] if len(parents) > 1 else []
    every: list[Run] = []
    if not parents:
        experiment = client.get_experiment_by_name(ref)
        if experiment is not None:
            runs = _search(client, [experiment.experiment_id])
            return ref, None, [r for r in runs if r.data.tags.get(KIND_TAG) != KIND_SWEEP], []
        every = _sweep_parents(client)
        parents = [r for r in every if r.data.tags.get(SWEEP_TAG, "").startswith(ref)]
        if parents:
            notes.append(f"no sweep is named {ref!r}: using the newest of the {len(parents)} whose name starts so")
    if parents:
        parent = max(parents, key=lambda r: r.info.start_time)
        return parent.data.tags[SWEEP_TAG], parent.info.run_id, _children(client, parent.info.run_id), notes
    known = sorted({r.data.tags.get(SWEEP_TAG, "") for r in every} - {""})
    hint = did_you_mean(ref, known) or (f"; known sweeps: {', '.join(known[:10])}" if known else "; no sweeps logged")
    raise LejepaError(f"no sweep, parent run or experiment named {ref!r} in {client.tracking_uri}{hint}")


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """step → value of a metric; a step logged twice (a resumed epoch) keeps the latest value."""
    values: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in values or m.timestamp >= values[m.step][0]:
            values[m.step] = (m.timestamp, m.value)
    return {step: v for step, (_, v) in values.items()}


def _number(value: str | None) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except ValueError:
        return float("nan")


def _wall_s(run: Run) -> float:
    """Seconds from the run's start to its end (NaN while it runs)."""
    end = run.info.end_time
    return (end - run.info.start_time) / 1000.0 if end and run.info.start_time else float("nan")


def _exclusion(run: Run) -> str | None:
    tags = run.data.tags
    if tags.get(STATUS_TAG) == STATUS_DIVERGED:
        return f"diverged at step {tags.get(DIVERGED_STEP_TAG, '?')}"
    if run.info.status != FINISHED:
        return run.info.status.lower()
    return None


def _rows(client: MlflowClient, run: Run) -> list[dict]:
    tags, params, run_id = run.data.tags, run.data.params, run.info.run_id
    epochs = _history(client, run_id, EPOCH)
    histories = {col: _history(client, run_id, key) for key, col in EPOCH_METRICS.items()}
    run_dir = tags.get(RUN_DIR_TAG)
    last = max(epochs, default=None)
    base = {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "trial": tags.get(TRIAL_ID_TAG, run.info.run_name),
        "arch": tags.get(ARCH_TAG, params.get("model.arch")),
        "family": tags.get(FAMILY_TAG),
        "dataset": tags.get(DATASET_TAG, params.get("data.name")),
        "run_dir": run_dir,
        "status": tags.get(STATUS_TAG, STATUS_FINISHED),
        **{col: _number(params.get(key)) for key, col in NUMERIC_PARAMS.items()},
        **{f"params.{k}": v for k, v in params.items()},
    }
    rows = []
    for step, epoch in sorted(epochs.items()):
        epoch = int(epoch)
        is_final = step == last
        folder = Path(run_dir) / CHECKPOINTS_DIR / checkpoint_name(epoch) if run_dir else None
        row = {
            **base,
            "epoch": epoch,
            "step": step,
            "is_final": is_final,
            **{col: hist.get(step, np.nan) for col, hist in histories.items()},
            **{col: run.data.metrics.get(key, np.nan) if is_final else np.nan for key, col in FINAL_METRICS.items()},
            "wall_s": _wall_s(run) if is_final else np.nan,
            "checkpoint": str(folder) if folder is not None and folder.is_dir() else None,
            "checkpoint_uri": (f"runs:/{run_id}/{CHECKPOINT_ARTIFACT}" if is_final and CHECKPOINT_TAG in tags else None),
        }
        rows.append(row)
    return rows


def load_sweep(ref: str, tracking_uri: str) -> Sweep:
    """The sweep ``ref`` (sweep name, parent run id or experiment name) in the store at ``tracking_uri``."""
    client = MlflowClient(tracking_uri)
    name, parent_id, runs, notes = resolve(client, ref)
    rows: list[dict] = []
    excluded: list[dict] = []
    for run in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id)):
        reason = _exclusion(run)
        label = run.data.tags.get(TRIAL_ID_TAG, run.info.run_name)
        found = _rows(client, run) if reason is None else []
        if reason is None and not found:
            reason = "no epoch logged"
        if reason is not None:
            notes.append(f"excluded {label} ({run.info.run_id[:8]}): {reason}")
            excluded.append(
                {
                    "run_id": run.info.run_id,
                    "trial": label,
                    "arch": run.data.tags.get(ARCH_TAG, run.data.params.get("model.arch")),
                    "status": run.data.tags.get(STATUS_TAG) or reason,
                }
            )
            continue
        elif run.data.tags.get(STATUS_TAG) in (STATUS_PRUNED, STATUS_COLLAPSED):
            why = "pruned" if run.data.tags[STATUS_TAG] == STATUS_PRUNED else "stopped as collapsed"
            notes.append(f"{label} was {why} at epoch {found[-1]['epoch']}: kept as a candidate, no final probe")
        rows += found
    if not rows:
        raise LejepaError(
            f"sweep {name!r} has no finished trial with logged epochs" + (f" ({'; '.join(notes)})" if notes else "")
        )
    epochs = pd.DataFrame(rows)
    return Sweep(name, tracking_uri, parent_id, epochs, notes, excluded)
