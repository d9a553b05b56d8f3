"""The Tune function trainable: one sweep trial is one LeJEPA :class:`~lejepa.trainer.Trainer` run.

:func:`run_trial` builds the trial's config (the spec's base plus the sampled dotted params),
trains in the absolute run folder ``<trials_dir>/<trial_id>`` with torch threads equal to the
trial's CPUs and no console output, and plugs two callbacks into the trainer:

- :class:`TrialTracking`: the trial's child MLflow run (nested under the sweep's parent run,
  tagged ``lejepa.kind=trial``, ``lejepa.sweep``, ``lejepa.trial_id``), with the label-free
  ``train/score`` added to every epoch. A retried or restored trial continues its run, found by
  its trial-id tag (else through the run folder's ``mlflow_run.json``): never a duplicate.
- :class:`TuneReport`: per epoch ``tune.report(metrics, checkpoint=<the epoch's checkpoint>)``,
  with ``epoch`` and ``train/score``; the last epoch's report is sent after the final evaluation
  and carries the probe and kNN accuracies too.

A trial whose loss becomes NaN or infinite (:class:`~lejepa.trainer.TrainingDiverged`) is not an
error to retry: its MLflow run is tagged ``lejepa.status=diverged`` with the step, and it ends with
a report holding ``diverged=1`` and the search/scheduler metrics at their worst value. A trial
stopped by label-free pruning (:class:`~lejepa.trainer.TrainingCollapsed`, ``train.collapse_patience``)
ends the same way with ``collapsed=1``, its run tagged ``lejepa.status=collapsed``.

A retried or restored trial resumes from the newer of ``tune.get_checkpoint()`` and the newest
valid checkpoint in its own run folder: a worker killed after writing a checkpoint but before
Tune registered it does not retrain that epoch. With ``workers_per_trial > 1``
the trial function is only a driver: it runs a Ray Train ``TorchTrainer`` (DDP, gloo on CPU, nccl
on GPU) whose rank 0 sends every report through a Ray queue, and reports it to Tune itself.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from lejepa.callbacks import Callback, RunInfo
from lejepa.config import Config, build_config
from lejepa.errors import TrainingCollapsed, TrainingDiverged
from lejepa.record import (
    CHECKPOINTS_DIR,
    COLLAPSE_RATIO,
    COLLAPSED_FLAG,
    DIVERGED_FLAG,
    DIVERGED_STEP,
    EPOCH,
    EPOCH_LOSS,
    KIND_TAG,
    KIND_TRIAL,
    RAY_NODE_TAG,
    STATUS_INTERRUPTED,
    SWEEP_TAG,
    TRAIN_SCORE,
    TRIAL_ID_TAG,
    label_free_score,
    run_status,
)
from lejepa.tracking import MLflowCallback, get_or_create_experiment
from sweeps.resources import TrialResources
from sweeps.space import trial_tree

Send = Callable[[dict[str, float], "str | None"], None]
"""Delivers one report: metrics and the checkpoint folder to attach (or None)."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares (sent once through ``tune.with_parameters``)."""

    sweep: str
    base: dict[str, Any]
    trials_dir: str  # absolute: <storage>/<sweep>/trials
    train_storage: str  # absolute: Ray Train's run state for multi-worker trials
    tracking_uri: str  # absolute
    experiment: str
    parent_run_id: str
    score_alpha: float
    arch_resources: dict[str, TrialResources]
    arch_params: dict[str, dict[str, Any]]  # per architecture, the base values its arch_overrides rule sets
    worst: dict[str, float]  # search/scheduler metrics at their worst value (reported by a diverged trial)


class TrialTracking(MLflowCallback):
    """The trial's child run: :class:`~lejepa.tracking.MLflowCallback` plus ``train/score`` per epoch
    and the Ray node of the current attempt (tag ``lejepa.ray_node``).

    A trial stopped by Tune (scheduler, interrupted sweep) exits with ``SystemExit``: its run is
    closed as interrupted (KILLED, :func:`~lejepa.record.run_status`) without an error tag; the sweep
    driver settles its final status.
    """

    def __init__(self, *args: Any, lam: float, alpha: float, node_id: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lam = lam
        self.alpha = alpha
        self.node_id = node_id
        self.finished = False

    def on_train_start(self, info: RunInfo) -> None:
        super().on_train_start(info)
        assert self.run_id is not None  # opened by on_train_start
        self.client.set_tag(self.run_id, RAY_NODE_TAG, self.node_id)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        score = label_free_score(metrics[EPOCH_LOSS], self.lam, self.alpha)
        super().on_epoch_end(epoch, step, {**metrics, TRAIN_SCORE: score})

    def on_train_end(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        super().on_train_end(metrics, checkpoint)
        self.finished = True

    def on_failure(self, error: BaseException) -> None:
        if not isinstance(error, SystemExit):
            super().on_failure(error)
            return
        if self.finished:  # stopped by Tune at its last report: the run is complete
            return
        with contextlib.suppress(Exception):
            self._finish(self.close(timeout=10.0), {}, [], run_status(STATUS_INTERRUPTED))


class TuneReport(Callback):
    """Sends each epoch's metrics (plus ``epoch``, ``train/score``) with its checkpoint folder.

    The last epoch's report waits for the final evaluation and carries its metrics too: a
    scheduler that stops the trial at its last report can no longer skip the evaluation.
    """

    def __init__(self, send: Send, lam: float, alpha: float, epochs: int) -> None:
        self.send = send
        self.lam = lam
        self.alpha = alpha
        self.epochs = epochs
        self.last: dict[str, float] = {}
        self.held: str | None = None

    def on_checkpoint(self, epoch: int, step: int, path: Path, metrics: dict[str, float]) -> None:
        self.last = {**metrics, EPOCH: epoch, TRAIN_SCORE: label_free_score(metrics[EPOCH_LOSS], self.lam, self.alpha)}
        if epoch < self.epochs:
            self.send(self.last, str(path))
        else:
            self.held = str(path)

    def on_train_end(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        self.send({**self.last, **metrics}, self.held)


def find_child_run(client: Any, experiment_id: str, sweep: str, trial_id: str) -> str | None:
    """The id of the MLflow run of ``trial_id`` in ``sweep``, if one was created (oldest first)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def trial_run_name(trial_id: str, cfg: Config) -> str:
    """A trial's MLflow run name, told apart from its siblings at a glance: ``a7ed2_00002 λ=0.25 resnet10t``."""
    return f"{trial_id} λ={cfg.loss.lam:g} {cfg.model.arch}"


def trial_callbacks(ctx: TrialContext, cfg: Config, trial_id: str, node_id: str, send: Send) -> list[Callback]:
    """MLflow child-run tracking (continuing the trial's run if it exists) and Tune reporting."""
    client = MlflowClient(ctx.tracking_uri)
    experiment_id = get_or_create_experiment(client, ctx.experiment, ctx.tracking_uri)
    tracking = TrialTracking(
        ctx.tracking_uri,
        experiment=ctx.experiment,
        run_name=trial_run_name(trial_id, cfg),
        parent_run_id=ctx.parent_run_id,
        run_id=find_child_run(client, experiment_id, ctx.sweep, trial_id),
        lam=cfg.loss.lam,
        alpha=ctx.score_alpha,
        node_id=node_id,
        flush_every=cfg.tracking.flush_every,
        final_wait=cfg.tracking.final_wait_s,
        tags={KIND_TAG: KIND_TRIAL, SWEEP_TAG: ctx.sweep, TRIAL_ID_TAG: trial_id},
    )
    return [tracking, TuneReport(send, cfg.loss.lam, ctx.score_alpha, cfg.train.epochs)]


def newest_checkpoint(tune_dir: str | None, run_dir: Path) -> str | None:
    """The valid checkpoint with the most steps among Tune's (``tune_dir``) and the run folder's newest.

    A corrupt checkpoint (checksum mismatch) is skipped with a warning, so the trial falls back to
    the previous valid one (the run folder keeps ``train.keep_checkpoints`` of them).
    """
    from lejepa.checkpoint import is_valid_checkpoint, latest_valid_checkpoint, read_meta

    def warn(msg: str) -> None:
        print(msg, file=sys.stderr)

    candidates = []
    if tune_dir:
        if is_valid_checkpoint(Path(tune_dir)):
            candidates.append(Path(tune_dir))
        else:
            warn(f"warning: skipping corrupt checkpoint {tune_dir} restored by Tune")
    own = latest_valid_checkpoint(run_dir / CHECKPOINTS_DIR, warn=warn)
    if own is not None:
        candidates.append(own)
    if not candidates:
        return None
    return str(max(candidates, key=lambda path: read_meta(path).get("step", -1)))


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune function trainable (see the module docstring); ``config`` maps dotted keys to sampled values."""
    import ray
    from ray import tune

    tune_ctx = tune.get_context()
    trial_id = tune_ctx.get_trial_id()
    arch = build_config(trial_tree(ctx.base, config)).model.arch
    tree = trial_tree(ctx.base, {**ctx.arch_params.get(arch, {}), **config})
    cfg = build_config(tree, source=f"trial {trial_id}")
    res = ctx.arch_resources[cfg.model.arch]
    cfg.train.threads = max(1, int(res.cpus))
    run_dir = Path(ctx.trials_dir) / trial_id
    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as tune_resume:
        if tune_resume and _is_final(Path(tune_resume), cfg.train.epochs):
            return  # Tune holds the final report (a sweep interrupted before Tune saw the trial end): done
        resume = newest_checkpoint(tune_resume, run_dir)
        if res.workers > 1:
            _run_distributed(ctx, cfg, res, trial_id, run_dir, resume)
            return
        from lejepa.trainer import Trainer

        node_id = ray.get_runtime_context().get_node_id()
        callbacks = trial_callbacks(ctx, cfg, trial_id, node_id, _report_to_tune)
        trainer = Trainer(cfg, callbacks, run_dir=run_dir, resume=resume)
    try:
        trainer.fit()
    except (TrainingDiverged, TrainingCollapsed) as exc:  # results of the hyper-parameters: never retried
        _report_to_tune(outcome_report(ctx, exc, trainer.epoch), None)


def _is_final(checkpoint: Path, epochs: int) -> bool:
    """Whether ``checkpoint`` is a trial's last one: only the final report (after the final
    evaluation) sends it to Tune, so a trial restored from it has nothing left to do."""
    from lejepa.checkpoint import is_valid_checkpoint, read_meta

    return is_valid_checkpoint(checkpoint) and read_meta(checkpoint).get("epoch", -1) >= epochs


def outcome_report(ctx: TrialContext, exc: TrainingDiverged | TrainingCollapsed, epoch: int) -> dict[str, float]:
    """The last report of a diverged (``diverged=1`` and the step) or collapsed (``collapsed=1`` and
    the collapse ratio) trial, with the optimised metrics at their worst."""
    if isinstance(exc, TrainingCollapsed):
        return {**ctx.worst, EPOCH: epoch, COLLAPSED_FLAG: 1.0, COLLAPSE_RATIO: exc.ratio}
    return {**ctx.worst, EPOCH: epoch, DIVERGED_FLAG: 1.0, DIVERGED_STEP: float(exc.step)}


def _report_to_tune(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
    from ray import tune

    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


# --------------------------------------------------------------------------- multi-worker (DDP) trials
def _run_distributed(
    ctx: TrialContext, cfg: Config, res: TrialResources, trial_id: str, run_dir: Path, resume: str | None
) -> None:
    """Run the trial on ``res.workers`` Ray Train workers; relay rank 0's reports to Tune from here."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={
            "ctx": ctx,
            "tree": cfg.model_dump(mode="json"),
            "trial_id": trial_id,
            "run_dir": str(run_dir),
            "resume": resume,
            "queue": queue,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers, use_gpu=res.gpus > 0, resources_per_worker={"CPU": res.cpus, "GPU": res.gpus}
        ),
        # Tune retries the whole trial from its own checkpoint: Ray Train neither retries nor restores
        # (a fresh run name per attempt).
        run_config=ray.train.RunConfig(
            name=f"trial-{trial_id}-{uuid.uuid4().hex[:8]}",
            storage_path=ctx.train_storage,
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    errors: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # re-raised in the trial's thread below
            errors.append(exc)

    worker = threading.Thread(target=fit, name=f"ddp-{trial_id}", daemon=True)
    worker.start()
    try:
        while worker.is_alive() or not queue.empty():
            try:
                metrics, checkpoint_dir = queue.get(timeout=1.0)
            except Empty:
                continue
            _report_to_tune(metrics, checkpoint_dir)
        worker.join()
    finally:
        queue.shutdown()
    if errors:
        raise errors[0]


def _ddp_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: the Trainer joins Ray Train's process group; rank 0 tracks and reports."""
    import ray
    import ray.train

    from lejepa.trainer import Trainer

    ctx: TrialContext = loop["ctx"]
    cfg = build_config(loop["tree"])
    callbacks: list[Callback] = []
    if ray.train.get_context().get_world_rank() == 0:
        node_id = ray.get_runtime_context().get_node_id()
        callbacks = trial_callbacks(ctx, cfg, loop["trial_id"], node_id, lambda metrics, path: loop["queue"].put((metrics, path)))
    trainer = Trainer(cfg, callbacks, run_dir=loop["run_dir"], resume=loop["resume"])
    try:
        trainer.fit()
    except (TrainingDiverged, TrainingCollapsed) as exc:  # every rank sees the same all-reduced loss
        if callbacks:
            loop["queue"].put((outcome_report(ctx, exc, trainer.epoch), None))
