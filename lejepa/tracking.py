"""MLflow tracking as a trainer callback.

Each training run is one MLflow run: the flattened config as params (once), per-step and
per-epoch metrics sent in batches (``log_batch``), final probe/kNN metrics, the config file and
the final checkpoint as artifacts, tags for architecture, family and dataset. A resumed run
continues the same MLflow run (its id is kept in ``<run_dir>/mlflow_run.json``) and skips every
metric at a step the run already holds for that key, so a run restarted from an older checkpoint
(or from scratch) leaves no duplicate step. Metrics that cannot be delivered (server down) stay
buffered and are retried at the next flush.

Everything goes through :class:`mlflow.MlflowClient` with an explicit, absolute tracking URI:
no global active run, so nothing leaks between runs or threads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from lejepa.callbacks import Callback, RunInfo

RUN_FILE = "mlflow_run.json"
PARENT_TAG = "mlflow.parentRunId"


def default_tracking_uri(out_dir: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an embedded SQLite store ``<out_dir>/mlflow.db`` (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str(Path(out_dir).expanduser().resolve() / "mlflow.db")


def artifact_root(tracking_uri: str) -> str | None:
    """For a SQLite store, the artifact folder beside the database; servers choose their own."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").as_uri()
    return None


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created (with artifacts beside a SQLite store) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(tracking_uri))
    except MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def arch_family(arch: str) -> str:
    """The catalog family of ``arch``, or the leading alphabetic part of its name."""
    try:
        from lejepa.catalog import get_arch
        return get_arch(arch).family
    except Exception:  # noqa: BLE001 - architectures outside the catalog are allowed
        head = arch.split("_")[0]
        return "".join(ch for ch in head if ch.isalpha()) or arch


class MLflowCallback(Callback):
    """Logs a training run to MLflow.

    ``parent_run_id`` nests the run under a sweep run; ``run_id`` continues an existing run;
    ``tags`` are added at creation (e.g. a sweep's trial id). Step metrics are buffered and sent
    every ``flush_every`` step events and at every epoch end.
    """

    def __init__(self, tracking_uri: str, experiment: str = "lejepa", run_name: str | None = None,
                 parent_run_id: str | None = None, run_id: str | None = None,
                 tags: dict[str, str] | None = None, flush_every: int = 10,
                 log_checkpoint: bool = True) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.run_id = run_id
        self.tags = dict(tags or {})
        self.flush_every = flush_every
        self.log_checkpoint = log_checkpoint
        self._buffer: list[Metric] = []
        self._events = 0
        self._warned = False
        self._last_step = 0
        self._logged: dict[str, int] = {}  # key -> highest step the continued run already holds
        self.run_dir: Path | None = None

    # ---------------------------------------------------------------- helpers
    def _metrics(self, values: dict[str, float], step: int) -> list[Metric]:
        now = int(time.time() * 1000)
        return [Metric(key, float(v), now, step) for key, v in values.items()
                if step > self._logged.get(key, -1)]

    def _logged_steps(self) -> dict[str, int]:
        """Per metric key, the highest step the existing run holds (MLflow keeps each key's latest by step)."""
        run = self.client.get_run(self.run_id)
        return {m.key: int(m.step) for m in getattr(run.data, "_metric_objs", [])}

    def flush(self, retry_for: float = 0.0) -> bool:
        """Send buffered metrics; keep them buffered on failure. Retries for ``retry_for`` seconds."""
        deadline = time.monotonic() + retry_for
        while self._buffer:
            try:
                for start in range(0, len(self._buffer), 1000):
                    self.client.log_batch(self.run_id, metrics=self._buffer[start:start + 1000])
                self._buffer.clear()
                return True
            except Exception as exc:  # noqa: BLE001 - tracking must never kill training
                if time.monotonic() >= deadline:
                    if not self._warned:
                        print(f"warning: MLflow unreachable ({str(exc).splitlines()[0][:120]}); "
                              f"{len(self._buffer)} metrics buffered, will retry", file=sys.stderr)
                        self._warned = True
                    return False
                time.sleep(1.0)
        self._warned = False
        return True

    def _start(self, info: RunInfo) -> None:
        cfg = info.config
        run_file = info.run_dir / RUN_FILE
        if self.run_id is None and run_file.is_file():
            saved = json.loads(run_file.read_text())
            if saved.get("tracking_uri") == self.tracking_uri:
                self.run_id = saved["run_id"]
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            self._logged = self._logged_steps()
            return
        exp_id = get_or_create_experiment(self.client, self.experiment, self.tracking_uri)
        tags = {"arch": cfg.model.arch, "family": arch_family(cfg.model.arch), "dataset": cfg.data.name,
                "lejepa.run_dir": str(info.run_dir), **self.tags}
        if self.parent_run_id:
            tags[PARENT_TAG] = self.parent_run_id
        run = self.client.create_run(exp_id, run_name=self.run_name or info.run_dir.name,
                                     tags={k: str(v) for k, v in tags.items()})
        self.run_id = run.info.run_id
        params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in cfg.flat().items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_batch(self.run_id, params=[Param("model.num_params", str(info.num_params))])
        info.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri}))
        tmp.replace(run_file)

    # ---------------------------------------------------------------- hooks
    def on_train_start(self, info: RunInfo) -> None:
        self.run_dir = info.run_dir
        self._start(info)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self._last_step = step
        self._buffer += self._metrics(metrics, step)
        self._events += 1
        if self._events % self.flush_every == 0:
            self.flush()

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self._last_step = step
        self._buffer += self._metrics({**metrics, "epoch": epoch}, step)
        self.flush()

    def on_train_end(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        self._buffer += self._metrics(metrics, self._last_step)
        self.flush(retry_for=60.0)
        if self.run_dir is not None and (self.run_dir / "config.yaml").is_file():
            self.client.log_artifact(self.run_id, str(self.run_dir / "config.yaml"))
        if self.log_checkpoint and checkpoint is not None:
            self.client.log_artifacts(self.run_id, str(checkpoint), artifact_path="checkpoint")
            self.client.set_tag(self.run_id, "lejepa.checkpoint", str(checkpoint))
        self.client.set_terminated(self.run_id, "FINISHED")

    def on_failure(self, error: BaseException) -> None:
        if self.run_id is None:
            return
        try:
            self.flush(retry_for=10.0)
            from lejepa.trainer import TrainingDiverged
            tags: dict[str, Any] = {"lejepa.error": f"{type(error).__name__}: {error}"[:5000]}
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            if isinstance(error, TrainingDiverged):
                tags.update({"lejepa.status": "diverged", "lejepa.diverged_step": error.step})
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            self.client.set_terminated(self.run_id, status)
        except Exception:  # noqa: BLE001 - never mask the original error
            pass
