"""Where a sweep lives and where it is tracked.

A sweep lives in ``<storage>/<name>/`` (absolute; on a cluster, a filesystem every node mounts at
the same path):

- the Tune experiment (``tuner.pkl``, experiment state, one result folder per trial);
- ``sweep.json``: parent run id, tracking URI and experiment, what ``--resume`` reattaches;
- ``resolved_spec.yaml``: the spec with its base inlined and catalog queries expanded;
- ``trials/<trial_id>/``: each trial's run folder (config, checkpoints, ``mlflow_run.json``);
- ``ray_train/``: Ray Train's state for multi-worker trials.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lejepa.errors import ConfigError
from lejepa.record import SWEEP_FILE, default_tracking_uri, sqlite_path, sqlite_uri
from sweeps.spec import SweepSpec

RESOLVED_SPEC = "resolved_spec.yaml"
"""In a sweep's folder: :meth:`~sweeps.spec.SweepSpec.resolved`, what ``--resume`` loads."""


@dataclass(frozen=True)
class Sweep:
    """Where a sweep lives and where it is tracked."""

    name: str
    path: Path  # <storage>/<name>, absolute
    tracking_uri: str  # absolute
    experiment: str
    parent_run_id: str

    @property
    def trials_dir(self) -> Path:
        return self.path / "trials"

    @property
    def train_storage(self) -> Path:
        """Ray Train's run state for multi-worker trials."""
        return self.path / "ray_train"

    def save(self) -> None:
        record = {
            "name": self.name,
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
            "parent_run_id": self.parent_run_id,
        }
        (self.path / SWEEP_FILE).write_text(json.dumps(record, indent=2))

    @classmethod
    def load(cls, path: Path) -> Sweep:
        record = json.loads((path / SWEEP_FILE).read_text())
        return cls(record["name"], path, record["tracking_uri"], record["experiment"], record["parent_run_id"])


def default_storage(spec: SweepSpec | None) -> Path:
    """``<train.out_dir>/sweeps`` of the spec's base config (``runs/sweeps`` without a spec), absolute."""
    out_dir = spec.base_config.train.out_dir if spec is not None else "runs"
    return Path(out_dir).expanduser().resolve() / "sweeps"


def storage_root(storage: str | Path | None, spec: SweepSpec | None) -> Path:
    """The folder holding sweeps: ``storage`` (a path, made absolute), else :func:`default_storage`."""
    if storage is not None and "://" in str(storage):
        raise ConfigError(
            f"--storage {storage}: trials write their run folders there, so it must be a path "
            f"(on a cluster: a shared filesystem mounted at the same path on every node)"
        )
    return Path(storage).expanduser().resolve() if storage is not None else default_storage(spec)


def tracking_uri_for(spec: SweepSpec, override: str | None) -> str:
    """``override``, else the spec's, else the base config's, else the ``lejepa train`` default; made absolute."""
    cfg = spec.base_config
    uri = override or spec.tracking.uri or cfg.tracking.uri or default_tracking_uri(cfg.train.out_dir)
    db = sqlite_path(uri)
    if db is not None:
        return sqlite_uri(Path(db).expanduser().resolve())
    return uri  # anything else is checked by preflight()
