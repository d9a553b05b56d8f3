"""Running a sweep: new (:func:`run_sweep`) or continued (:func:`resume_sweep`), start to end.

Checked first, before any folder, MLflow run or Ray trial exists: the storage, the tracking store,
the Ray address and whether Ray can grant every trial's resources. Then, holding the sweep's lock
and inside the sweep's Ray (:mod:`sweeps.ray_cluster`), the driver writes the sweep's folder
(:mod:`sweeps.layout`), opens the sweep's MLflow parent run (:mod:`sweeps.mlflow_runs`: tags
``lejepa.kind=sweep``, ``lejepa.sweep``; the spec files as artifacts) and keeps it RUNNING while the
Tuner (:mod:`sweeps.tuner`) runs the trials, printing progress (:mod:`sweeps.progress`). At the end
it settles each child run's status from Tune's results (:mod:`sweeps.outcome`, :mod:`sweeps.status`:
finished, pruned by the scheduler, collapsed, diverged, failed, interrupted), logs the best trials
on the parent and closes it: FINISHED, or KILLED when interrupted (``--resume`` reopens it).
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path

import yaml
from mlflow import MlflowClient
from ray import tune

from lejepa.errors import ConfigError
from lejepa.locks import ProcessLock
from lejepa.preflight import check_ray_address, check_tracking_uri, check_writable
from lejepa.record import STATUS_FAILED, STATUS_INTERRUPTED, SWEEP_FILE
from sweeps.layout import RESOLVED_SPEC, Sweep, default_storage, storage_root, tracking_uri_for
from sweeps.mlflow_runs import close_parent_run, create_parent_run, reopen_parent_run
from sweeps.names import check_name
from sweeps.outcome import SweepOutcome, TrialSummary, settle
from sweeps.progress import ProgressTable
from sweeps.ray_cluster import check_grantable, check_shared_storage, ray_session
from sweeps.spec import SweepSpec, load_spec
from sweeps.tuner import new_tuner, restore_tuner

__all__ = [  # run_sweep and resume_sweep, and the names this module offered before they moved to the modules above
    "RESOLVED_SPEC",
    "SWEEP_FILE",
    "ProgressTable",
    "Sweep",
    "SweepOutcome",
    "TrialSummary",
    "check_grantable",
    "default_storage",
    "preflight",
    "resume_sweep",
    "run_sweep",
    "tracking_uri_for",
]
# ProgressTable: a sweep started before the split pickled its callback as sweeps.runner.ProgressTable
# in tuner.pkl, which --resume unpickles.

_create_parent = create_parent_run  # the name tests/test_sweep_run.py imports


def preflight(storage: Path, tracking_uri: str, address: str | None, *, tracking_checked: bool = False) -> None:
    """What a sweep needs, checked before any folder, MLflow run or Ray trial is created: the storage
    folder can be written, the tracking store answers (unless ``tracking_checked``: the caller just
    checked it), an explicit Ray address accepts connections."""
    import ray

    check_writable(storage, "sweep storage (--storage)")
    if not tracking_checked:
        check_tracking_uri(tracking_uri)
    if not ray.is_initialized():
        check_ray_address(address or os.environ.get("RAY_ADDRESS"))


def run_sweep(
    spec: SweepSpec,
    *,
    storage: str | Path | None = None,
    name: str | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    tracking_checked: bool = False,
) -> SweepOutcome:
    """Run ``spec`` as a new sweep ``<spec name>-<timestamp>`` (or ``name``) under ``storage``.
    ``tracking_checked``: the caller has already checked ``tracking_uri`` (``lejepa sweep`` does, before
    it loads the spec), so the preflight does not connect to it a second time."""
    root = storage_root(storage, spec)
    sweep_name = check_name(name, "--name") if name else f"{spec.name}-{datetime.now():%Y%m%d-%H%M%S}"
    path = root / sweep_name
    if path.exists():
        raise ConfigError(
            f"sweep {sweep_name!r} already exists in {root}: continue it with --resume {sweep_name}, or choose another --name"
        )
    uri = tracking_uri_for(spec, tracking_uri)
    preflight(root, uri, address, tracking_checked=tracking_checked and tracking_uri is not None)
    check_grantable(spec, address)
    with _sweep_lock(root, sweep_name):
        if path.exists():  # created by a driver that held the lock a moment ago
            raise ConfigError(
                f"sweep {sweep_name!r} was just created in {root} by another `lejepa sweep`: "
                f"continue it with --resume {sweep_name}, or choose another --name"
            )
        return _run_new(spec, sweep_name, path, address, uri)


def resume_sweep(name: str, *, storage: str | Path | None = None, address: str | None = None) -> SweepOutcome:
    """Continue the interrupted sweep ``name``: finished trials stay, the others resume from their checkpoints."""
    root = storage_root(storage, None)
    path = root / check_name(name, "--resume")
    if not root.is_dir():
        raise ConfigError(
            f"--resume {name}: no resumable sweep at {path} (no storage folder {root}); pass --storage where it lives"
        )
    with _sweep_lock(root, path.name):
        return _resume(name, root, path, address)


# --------------------------------------------------------------------------- internals
def _sweep_lock(root: Path, name: str) -> ProcessLock:
    """One driver per sweep name: a lock file beside the sweep's folder (it may not exist yet),
    removed when released."""
    root.mkdir(parents=True, exist_ok=True)
    return ProcessLock(root / f".{name}.lock", f"sweep {name!r} in {root}", remove=True)


def _run_new(spec: SweepSpec, sweep_name: str, path: Path, address: str | None, uri: str) -> SweepOutcome:
    with ray_session(address):
        check_grantable(spec)
        path.mkdir(parents=True)
        try:
            (path / RESOLVED_SPEC).write_text(yaml.safe_dump(spec.resolved(), sort_keys=False))
            sweep = Sweep(sweep_name, path, uri, spec.tracking.experiment, create_parent_run(spec, sweep_name, path, uri))
            sweep.save()
        except BaseException:  # no half-created sweep folder: nothing has run in it yet
            shutil.rmtree(path, ignore_errors=True)
            raise
        check_shared_storage(sweep.path, sweep.tracking_uri)
        return _execute(spec, sweep, new_tuner(spec, sweep))


def _resume(name: str, root: Path, path: Path, address: str | None) -> SweepOutcome:
    if not (path / SWEEP_FILE).is_file():
        known = sorted(p.name for p in root.iterdir() if (p / SWEEP_FILE).is_file()) if root.is_dir() else []
        hint = f"; sweeps there: {', '.join(known[-10:])}" if known else "; pass --storage where it lives"
        raise ConfigError(f"--resume {name}: no resumable sweep at {path}{hint}")
    sweep = Sweep.load(path)
    spec = load_spec(path / RESOLVED_SPEC)
    preflight(path, sweep.tracking_uri, address)
    check_grantable(spec, address)
    # Stopped after the sweep's folder and parent run were made but before Ray Tune saved its first
    # state (a Ctrl-C in the first seconds): no trial has a result, so the sweep starts over in place.
    restart = not tune.Tuner.can_restore(path)
    with ray_session(address):
        check_grantable(spec)
        reopen_parent_run(sweep, restart)
        check_shared_storage(sweep.path, sweep.tracking_uri)
        if restart:
            print(f"sweep {name!r} was stopped before its first trial was recorded: starting it again", flush=True)
            return _execute(spec, sweep, new_tuner(spec, sweep))
        return _execute(spec, sweep, restore_tuner(spec, sweep))


def _execute(spec: SweepSpec, sweep: Sweep, tuner: tune.Tuner) -> SweepOutcome:
    """Run the Tuner, settle the trials and close the parent run as the sweep ended (failed when
    something raised, interrupted on Ctrl-C)."""
    client = MlflowClient(sweep.tracking_uri)
    status = STATUS_FAILED
    try:
        outcome = settle(client, spec, sweep, tuner.fit())
        status = outcome.status
        return outcome
    except KeyboardInterrupt:
        status = STATUS_INTERRUPTED
        raise
    finally:
        close_parent_run(client, sweep, status)
