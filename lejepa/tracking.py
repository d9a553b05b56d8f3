"""MLflow tracking as a trainer callback.

Each training run is one MLflow run: the flattened config as params (once), per-step and
per-epoch metrics sent in batches (``log_batch``), final probe/kNN metrics, the config file and
the final checkpoint as artifacts, tags for architecture, family and dataset, and the run's
health verdict (``lejepa.health``). A resumed run
continues the same MLflow run (its id is kept in ``<run_dir>/mlflow_run.json``) and skips every
metric at a step the run already holds for that key, so a run restarted from an older checkpoint
(or from scratch) leaves no duplicate step. Metrics are delivered by a background thread: a
server that is down or slow never stalls training; its metrics stay queued and are retried, and
are kept on disk during an outage. The end of a run waits a bounded time; what MLflow has not
taken by then is kept in the run folder until ``lejepa sync`` or the next start delivers it.

Everything goes through :class:`mlflow.MlflowClient` with an explicit, absolute tracking URI (the
sender's batches to an HTTP server: one REST request each, :func:`log_batch_once`): no global
active run, so nothing leaks between runs or threads.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from lejepa import spool
from lejepa.callbacks import Callback, RunInfo
from lejepa.config import TrackingConfig
from lejepa.errors import TrainingCollapsed, TrainingDiverged, first_line
from lejepa.record import (
    ARCH_TAG,
    ARTIFACTS_DIR,
    CHECKPOINT_ARTIFACT,
    CHECKPOINT_TAG,
    COLLAPSED,
    COLLAPSED_AT_EPOCH_TAG,
    CONFIG_FILE,
    DATASET_TAG,
    DIVERGED,
    DIVERGED_STEP_TAG,
    EPOCH,
    ERROR_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    FAMILY_TAG,
    HEALTH_TAG,
    KIND_SWEEP,
    KIND_TAG,
    NUM_PARAMS_PARAM,
    OUTCOME_TAGS,
    PARENT_TAG,
    PREVIOUS_ERROR_TAG,
    RESUMED_FROM_EPOCH_TAG,
    RUN_DIR_TAG,
    RUN_FILE,
    RUNNING,
    STATUS_COLLAPSED,
    STATUS_DIVERGED,
    STATUS_FAILED,
    STATUS_FINISHED,
    STATUS_INTERRUPTED,
    STATUS_TAG,
    SWEEP_TAG,
    VERDICT,
    VERDICTS,
    hparam_metrics,
    run_status,
    shared_view_tag,
    sqlite_path,
)


def artifact_root(tracking_uri: str) -> str | None:
    """For a SQLite store, the artifact folder beside the database; servers choose their own."""
    db = sqlite_path(tracking_uri)
    return (Path(db).parent / ARTIFACTS_DIR).as_uri() if db is not None else None


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created (with artifacts beside a SQLite store) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_root(tracking_uri), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def runs_view_url(client: MlflowClient, base: str) -> str:
    """The MLflow UI at ``base``, opened on the runs table of the experiment holding the newest
    sweep (else the newest run), in the sweep's own view when it has one (its trials, their
    searched params and accuracies: :func:`sweeps.mlflow_runs.trials_view`). MLflow 3 otherwise
    lands on its GenAI overview."""
    experiments = [e.experiment_id for e in client.search_experiments()]

    def newest(filter_string: str) -> list:
        return client.search_runs(
            experiments, filter_string=filter_string, order_by=["attributes.start_time DESC"], max_results=1
        )

    runs = newest(f"tags.`{KIND_TAG}` = '{KIND_SWEEP}'") or newest("")
    if not runs:
        return base
    run = runs[0]
    url = f"{base}/#/experiments/{run.info.experiment_id}/runs?workflowType=machine_learning"
    sweep = run.data.tags.get(SWEEP_TAG)
    if sweep and shared_view_tag(sweep) in client.get_experiment(run.info.experiment_id).tags:
        url += f"&viewStateShareKey={urllib.parse.quote(sweep)}"
    return url


def arch_family(arch: str) -> str:
    """The catalog family of ``arch``, or the leading alphabetic part of its name."""
    try:
        from lejepa.catalog import get_arch

        return get_arch(arch).family
    except Exception:  # architectures outside the catalog are allowed
        head = arch.split("_")[0]
        return "".join(ch for ch in head if ch.isalpha()) or arch


FINAL_WAIT_S = TrackingConfig().final_wait_s
"""How long the end of training waits for queued metrics by default (``tracking.final_wait_s``).
What is left after the wait is not lost: it is kept in the run folder (:mod:`lejepa.spool`)."""

LOG_BATCH_ENDPOINT = "/api/2.0/mlflow/runs/log-batch"


def log_batch_once(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    """``client.log_batch(run_id, metrics=metrics)``; to an HTTP(S) tracking server as one request,
    without MLflow's own retries. Those (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``: 7, backoff factor 2)
    sleep 2, 4, 8, 16, 32 … s inside the call, blind to the server's return: after a 30 s outage the
    metrics arrived 30 s late. :class:`MetricSender` retries instead, every 1 s doubling to 10 s."""
    uri = str(client.tracking_uri)
    if urllib.parse.urlparse(uri).scheme not in ("http", "https"):
        client.log_batch(run_id, metrics=metrics)
        return
    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.proto_json_utils import message_to_json
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    body = json.loads(message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in metrics])))
    creds = get_default_host_creds(uri)
    response = http_request(creds, LOG_BATCH_ENDPOINT, "POST", max_retries=0, backoff_factor=0, json=body)
    verify_rest_response(response, LOG_BATCH_ENDPOINT)


STALL_S = 30.0
"""A ``log_batch`` in flight this long (a server that takes the connection and does not answer, until
``MLFLOW_HTTP_REQUEST_TIMEOUT``, 120 s) counts as an outage."""
KEEP_EVERY_S = 10.0
"""During an outage the queue is written to the run folder's spool at most this often."""


class MetricSender:
    """Delivers metrics to one MLflow run from a background thread, in order, never blocking training.

    :meth:`add` queues metrics; :meth:`wake` asks for a send now (else every ``interval`` s). A
    failed :func:`log_batch_once` (server down, store locked) keeps the metrics queued and is retried
    with backoff (1 s doubling to 10 s); one warning is printed per outage. During an outage ``keep`` is
    called with everything still queued after each failed send (and with ``[]`` once the outage is
    over), so the queue survives the process on disk (:mod:`lejepa.spool`); a send stuck for
    ``stall_s`` s (a server that does not answer) counts as an outage
    too, and a watcher thread keeps the queue every ``keep_every_s`` s meanwhile, never the thread
    that adds. :meth:`drain` waits, up to a deadline, until the queue is empty.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        interval: float = 5.0,
        keep: Callable[[list[Metric]], None] | None = None,
        stall_s: float = STALL_S,
        keep_every_s: float = KEEP_EVERY_S,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.interval = interval
        self.keep = keep
        self.stall_s, self.keep_every_s = stall_s, keep_every_s
        self.pending: list[Metric] = []
        self.cond = threading.Condition()
        self.urgent = False
        self.closed = False
        self.sent = 0
        self.sending_since: float | None = None  # monotonic start of the log_batch in flight
        self.kept, self.kept_at = False, 0.0  # whether the spool holds metrics of this queue, and when written
        self.thread = threading.Thread(target=self._loop, name="mlflow-metrics", daemon=True)
        self.thread.start()
        if keep is not None:
            threading.Thread(target=self._watch_stalls, name="mlflow-metrics-keeper", daemon=True).start()

    def add(self, metrics: list[Metric], wake: bool = False) -> None:
        with self.cond:
            self.pending += metrics
        if wake:
            self.wake()

    def wake(self) -> None:
        with self.cond:
            self.urgent = True
            self.cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued is delivered (True) or ``timeout`` s pass (False)."""
        deadline = time.monotonic() + timeout
        self.wake()
        with self.cond:
            while self.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.2))
        return True

    def close(self, timeout: float) -> list[Metric]:
        """:meth:`drain`, then stop the thread; returns the metrics left undelivered (none when all arrived)."""
        self.drain(timeout)
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            return list(self.pending)

    def _loop(self) -> None:
        backoff, warned = 1.0, False
        while True:
            with self.cond:
                if not self.urgent and not self.closed:
                    self.cond.wait(self.interval)
                self.urgent = False
                if self.closed:
                    return
                batch = self.pending[:1000]
            if not batch:
                continue
            try:
                self.sending_since = time.monotonic()
                log_batch_once(self.client, self.run_id, batch)
            except Exception as exc:  # tracking must never kill training
                self.sending_since = None
                if not warned:
                    print(f"warning: MLflow unreachable ({first_line(exc)[:120]}); metrics are kept and retried", file=sys.stderr)
                    warned = True
                with self.cond:
                    if self.keep is not None and not self.closed:
                        self._keep(list(self.pending))
                    self.cond.wait_for(lambda: self.closed, timeout=backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            self.sending_since = None
            if warned:
                print("MLflow reachable again: buffered metrics delivered", file=sys.stderr)
            backoff, warned = 1.0, False
            with self.cond:
                del self.pending[: len(batch)]
                self.sent += len(batch)
                self.urgent = self.urgent or bool(self.pending)
                if self.keep is not None and not self.closed and self.kept:
                    self._keep(list(self.pending))
                self.cond.notify_all()

    def _watch_stalls(self) -> None:
        """While a send is stuck in MLflow's own retries, keep the queue on disk every ``keep_every_s`` s."""
        with self.cond:
            while not self.closed:
                self.cond.wait(min(self.stall_s, self.keep_every_s) / 2)
                now = time.monotonic()
                stalled = self.sending_since is not None and now - self.sending_since > self.stall_s
                if stalled and not self.closed and self.pending and now - self.kept_at > self.keep_every_s:
                    self._keep(list(self.pending))

    def _keep(self, metrics: list[Metric]) -> None:
        """Hand the queue to ``keep`` (called with the lock held); a failure to keep is not fatal."""
        assert self.keep is not None
        try:
            self.keep(metrics)
            self.kept, self.kept_at = bool(metrics), time.monotonic()
        except Exception as exc:
            print(f"warning: could not keep undelivered metrics on disk ({first_line(exc)[:120]})", file=sys.stderr)


class MLflowCallback(Callback):
    """Logs a training run to MLflow.

    ``parent_run_id`` nests the run under a sweep run; ``run_id`` continues an existing run;
    ``tags`` are added at creation (e.g. a sweep's trial id). Metrics go through a
    :class:`MetricSender`, woken every ``flush_every`` step events and at every epoch end; the
    end of training waits up to ``final_wait`` s for them to be delivered. Whatever MLflow does not
    take (metrics after that wait or kept during an outage, the final tags, artifacts and status) is
    kept in the run folder's spool (:mod:`lejepa.spool`), delivered by ``lejepa sync`` or by the
    run's next start, which delivers it before anything else.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str = "lejepa",
        run_name: str | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        flush_every: int = 10,
        log_checkpoint: bool = True,
        final_wait: float = FINAL_WAIT_S,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.run_id = run_id
        self.tags = dict(tags or {})
        self.flush_every = flush_every
        self.log_checkpoint = log_checkpoint
        self.final_wait = final_wait
        self.sender: MetricSender | None = None
        self._events = 0
        self._last_step = 0
        self._logged: dict[str, int] = {}  # key -> highest step the continued run already holds
        self._verdict: str | None = None
        self.run_dir: Path | None = None

    # ---------------------------------------------------------------- helpers
    def _metrics(self, values: dict[str, float], step: int) -> list[Metric]:
        now = int(time.time() * 1000)
        return [Metric(key, float(v), now, step) for key, v in values.items() if step > self._logged.get(key, -1)]

    def flush(self, retry_for: float = 0.0) -> bool:
        """Wait up to ``retry_for`` s for every queued metric to reach MLflow; True when none is left."""
        return self.sender is None or self.sender.drain(retry_for)

    def close(self, timeout: float) -> list[Metric]:
        """Deliver the queued metrics (waiting up to ``timeout`` s) and stop the sender thread; returns
        those left undelivered. The run stays as it is (the hooks end it). Safe to call twice."""
        left: list[Metric] = []
        if self.sender is not None:
            left = self.sender.close(timeout)
            self.sender = None
        return left

    def _keep(self, metrics: list[Metric]) -> None:
        """The sender's queue during an outage, kept in the run folder's spool (its other records kept)."""
        assert self.run_dir is not None and self.run_id is not None
        kept = spool.read(self.run_dir) or spool.Spool(self.run_id, self.tracking_uri)
        kept.metrics = spool.as_rows(metrics)
        spool.write(self.run_dir, kept)

    def _finish(self, left: list[Metric], tags: dict[str, str], artifacts: list[tuple[str, str | None]], status: str) -> None:
        """End the run: deliver the last metrics, tags, artifacts and status, or keep in the run folder's
        spool whatever MLflow did not take (one warning says what, and how it gets delivered)."""
        assert self.run_id is not None
        todo = spool.Spool(self.run_id, self.tracking_uri, spool.as_rows(left), tags, artifacts, status)
        reason = None
        if left:  # the server did not answer within the wait: do not queue behind its retries
            reason = "did not answer"
        else:
            try:
                todo = spool.deliver(self.client, todo)
            except Exception as exc:
                reason = f"failed ({first_line(exc)[:160]})"
            else:
                if todo:
                    reason = "could not store the artifacts"
        if todo and self.run_dir is not None:
            earlier = spool.read(self.run_dir)
            if earlier is not None and earlier.run_id == self.run_id:  # records of an earlier attempt: keep them too
                todo.artifacts = list(dict.fromkeys([*earlier.artifacts, *todo.artifacts]))
            spool.write(self.run_dir, todo)
            print(
                f"warning: MLflow at {self.tracking_uri} {reason}: {todo.summary()} of run {self.run_id} are kept in "
                f"{spool.spool_path(self.run_dir)}; `lejepa sync {self.run_dir}` delivers them (so does --resume)",
                file=sys.stderr,
            )
        elif self.run_dir is not None:
            spool.write(self.run_dir, todo)  # empty: removes a spool the outage left

    def _continue(self, info: RunInfo, run_id: str) -> None:
        """Reopen the run: RUNNING again, the outcome tags of the failed attempt cleared (its error kept
        as ``lejepa.previous_error``), the resume epoch tagged, and the steps it holds remembered."""
        run = self.client.get_run(run_id)
        self.client.update_run(run_id, status=RUNNING)
        tags = run.data.tags
        if ERROR_TAG in tags:
            self.client.set_tag(run_id, PREVIOUS_ERROR_TAG, tags[ERROR_TAG])
        for key in OUTCOME_TAGS:
            if key in tags:
                self.client.delete_tag(run_id, key)
        self.client.set_tag(run_id, RESUMED_FROM_EPOCH_TAG, str(info.start_epoch))
        self._logged = self.logged_steps(run_id, run.data.metrics)

    def logged_steps(self, run_id: str, keys: Iterable[str]) -> dict[str, int]:
        """The highest step run ``run_id`` holds for each metric of ``keys`` (the keys it has logged)."""
        return {key: max((int(m.step) for m in self.client.get_metric_history(run_id, key)), default=-1) for key in keys}

    def _start(self, info: RunInfo) -> str:
        """Open the run (a new one, or the one this callback or the run folder names); returns its id."""
        cfg = info.config
        run_file = info.run_dir / RUN_FILE
        if self.run_id is None and run_file.is_file():
            saved = json.loads(run_file.read_text())
            if saved.get("tracking_uri") == self.tracking_uri:
                self.run_id = saved["run_id"]
        if self.run_id is not None:
            earlier = spool.read(info.run_dir)
            if earlier is not None and earlier.run_id == self.run_id:  # left by an earlier attempt: deliver first
                spool.write(info.run_dir, spool.deliver(self.client, earlier))
                print(f"lejepa: delivered to MLflow what run {self.run_id} had kept: {earlier.summary()}", file=sys.stderr)
            self._continue(info, self.run_id)
            return self.run_id
        exp_id = get_or_create_experiment(self.client, self.experiment, self.tracking_uri)
        tags = {
            ARCH_TAG: cfg.model.arch,
            FAMILY_TAG: arch_family(cfg.model.arch),
            DATASET_TAG: cfg.data.name,
            RUN_DIR_TAG: str(info.run_dir),
            **self.tags,
        }
        if self.parent_run_id:
            tags[PARENT_TAG] = self.parent_run_id
        run = self.client.create_run(
            exp_id, run_name=self.run_name or info.run_dir.name, tags={k: str(v) for k, v in tags.items()}
        )
        self.run_id = run.info.run_id
        params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in cfg.flat().items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_batch(self.run_id, params=[Param(NUM_PARAMS_PARAM, str(info.num_params))])
        self.client.log_batch(self.run_id, metrics=self._metrics(hparam_metrics(cfg.flat(), info.num_params), step=0))
        info.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri}))
        tmp.replace(run_file)
        return self.run_id

    # ---------------------------------------------------------------- hooks
    def on_train_start(self, info: RunInfo) -> None:
        self.run_dir = info.run_dir
        self.sender = MetricSender(self.client, self._start(info), keep=self._keep)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self._last_step = step
        self._events += 1
        assert self.sender is not None  # made by on_train_start
        self.sender.add(self._metrics(metrics, step), wake=self._events % self.flush_every == 0)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self._last_step = step
        assert self.sender is not None  # made by on_train_start
        self.sender.add(self._metrics({**metrics, EPOCH: epoch}, step), wake=True)
        if VERDICT in metrics:  # tagged at the end: a slow server must not stall an epoch
            self._verdict = VERDICTS[int(metrics[VERDICT])]

    def on_train_end(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        assert self.sender is not None and self.run_id is not None  # made by on_train_start
        self.sender.add(self._metrics(metrics, self._last_step))
        left = self.close(timeout=self.final_wait)
        tags: dict[str, str] = {}
        artifacts: list[tuple[str, str | None]] = []
        if self.run_dir is not None and (self.run_dir / CONFIG_FILE).is_file():
            artifacts.append((str(self.run_dir / CONFIG_FILE), None))
        if self.log_checkpoint and checkpoint is not None:
            artifacts.append((str(checkpoint), CHECKPOINT_ARTIFACT))
            tags[CHECKPOINT_TAG] = str(checkpoint)
        if self._verdict is not None:
            tags[HEALTH_TAG] = self._verdict
        self._finish(left, tags, artifacts, run_status(STATUS_FINISHED))

    def on_failure(self, error: BaseException) -> None:
        if self.run_id is None:
            return
        try:
            left = self.close(timeout=10.0)
            tags: dict[str, Any] = {ERROR_TAG: f"{type(error).__name__}: {error}"[:5000]}
            status = STATUS_INTERRUPTED if isinstance(error, KeyboardInterrupt) else STATUS_FAILED
            if isinstance(error, TrainingDiverged):
                status = STATUS_DIVERGED
                tags.update({STATUS_TAG: status, DIVERGED_STEP_TAG: error.step, HEALTH_TAG: DIVERGED})
            elif isinstance(error, TrainingCollapsed):  # label-free pruning: an outcome, not an error
                status = STATUS_COLLAPSED
                tags = {STATUS_TAG: status, COLLAPSED_AT_EPOCH_TAG: error.epoch, HEALTH_TAG: COLLAPSED}
            self._finish(left, {k: str(v) for k, v in tags.items()}, [], run_status(status))
        except Exception:  # never mask the original error
            pass
