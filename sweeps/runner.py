"""Running a sweep: the MLflow parent run, the Tuner (new or restored), live progress, the summary.

A sweep lives in ``<storage>/<name>/`` (absolute; on a cluster, a filesystem every node mounts at
the same path):

- the Tune experiment (``tuner.pkl``, experiment state, one result folder per trial);
- ``sweep.json``: parent run id, tracking URI and experiment, what ``--resume`` reattaches;
- ``resolved_spec.yaml``: the spec with its base inlined and catalog queries expanded;
- ``trials/<trial_id>/``: each trial's run folder (config, checkpoints, ``mlflow_run.json``);
- ``ray_train/``: Ray Train's state for multi-worker trials.

The driver opens the sweep's MLflow parent run (tags ``lejepa.kind=sweep``, ``lejepa.sweep``; the
spec files as artifacts) and keeps it RUNNING while trials run. At the end it settles each child
run's status from Tune's results (finished, pruned by the scheduler, collapsed, diverged, failed, interrupted), logs
the best trials on the parent and closes it: FINISHED, or KILLED when interrupted (``--resume``
reopens it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from ray import tune

from lejepa.errors import ConfigError, LejepaError, first_line
from lejepa.locks import ProcessLock
from lejepa.preflight import check_ray_address, check_tracking_uri, check_writable
from lejepa.record import (
    BEST_LINEAR_PROBE_ACC,
    BEST_SCORE,
    COLLAPSE_RATIO,
    COLLAPSED,
    COLLAPSED_FLAG,
    DIVERGED,
    DIVERGED_FLAG,
    DIVERGED_STEP,
    EPOCH,
    EPOCH_LOSS,
    FAILED,
    FINISHED,
    HEALTH_TAG,
    HEALTHY,
    KILLED,
    KIND_SWEEP,
    KIND_TAG,
    LINEAR_PROBE_ACC,
    NOTE_TAG,
    ONLINE_TEST_ACC,
    PARENT_TAG,
    PROJ_RANK,
    PRUNED_AT_EPOCH_TAG,
    RESTARTED_AT_TAG,
    RESUMED_AT_TAG,
    RUNNING,
    SPEC_TAG,
    STATUS_COLLAPSED,
    STATUS_DIVERGED,
    STATUS_FAILED,
    STATUS_FINISHED,
    STATUS_INTERRUPTED,
    STATUS_PENDING,
    STATUS_PRUNED,
    STATUS_TAG,
    STATUSES,
    STORAGE_TAG,
    SWEEP_FILE,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    VERDICT,
    VERDICTS,
    best_run_tag,
    best_trial_tag,
    sqlite_path,
    sqlite_uri,
    trials_metric,
)
from lejepa.tracking import default_tracking_uri, get_or_create_experiment
from sweeps.spec import SCORE_METRIC, SweepSpec, check_name, format_table, load_spec
from sweeps.trainable import TrialContext, run_trial

RESOLVED_SPEC = "resolved_spec.yaml"
FINAL_METRIC = LINEAR_PROBE_ACC
ONLINE_METRIC = ONLINE_TEST_ACC


@dataclass(frozen=True)
class Sweep:
    """Where a sweep lives and where it is tracked."""

    name: str
    path: Path                 # <storage>/<name>, absolute
    tracking_uri: str          # absolute
    experiment: str
    parent_run_id: str

    @property
    def trials_dir(self) -> Path:
        return self.path / "trials"

    def save(self) -> None:
        record = {"name": self.name, "tracking_uri": self.tracking_uri, "experiment": self.experiment,
                  "parent_run_id": self.parent_run_id}
        (self.path / SWEEP_FILE).write_text(json.dumps(record, indent=2))

    @classmethod
    def load(cls, path: Path) -> Sweep:
        record = json.loads((path / SWEEP_FILE).read_text())
        return cls(record["name"], path, record["tracking_uri"], record["experiment"], record["parent_run_id"])


@dataclass
class TrialSummary:
    """One trial at the end of a run: status is finished, pruned, collapsed, diverged, failed, interrupted or
    pending; ``health`` is its last epoch's verdict (:mod:`lejepa.health`), ``collapse`` its collapse ratio."""

    trial_id: str
    status: str
    params: dict[str, Any]
    epoch: int | None
    loss: float | None
    score: float | None
    online_acc: float | None
    linear_acc: float | None
    run_id: str | None
    health: str | None = None
    collapse: float | None = None


@dataclass
class SweepOutcome:
    """The trials of a sweep after ``fit`` returned, and where to find them."""

    sweep: Sweep
    spec: SweepSpec
    trials: list[TrialSummary] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return any(t.status in (STATUS_INTERRUPTED, STATUS_PENDING) for t in self.trials)

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)

    def best(self, attr: str, mode: str, healthy_only: bool = False) -> TrialSummary | None:
        """The finished trial (healthy too, with ``healthy_only``) with the lowest (``min``) or highest
        (``max``) ``attr``."""
        done = [t for t in self.trials if t.status == STATUS_FINISHED and getattr(t, attr) is not None
                and (not healthy_only or t.health == HEALTHY)]
        if not done:
            return None
        return (min if mode == "min" else max)(done, key=lambda t: getattr(t, attr))

    def render(self) -> str:
        """The end-of-sweep summary: the trial table, the best trials, where to look in MLflow."""
        keys = self.spec.keys()
        header = ["trial", "status", *keys, "epoch", "loss", "score", "collapse", "health", "online acc", "linear acc"]
        rows = [[t.trial_id, t.status, *(t.params.get(k) for k in keys), t.epoch, t.loss, t.score, t.collapse,
                 t.health, t.online_acc, t.linear_acc] for t in sorted(self.trials, key=_score_order)]
        counts = ", ".join(f"{self.count(s)} {s}" for s in STATUSES if self.count(s))
        lines = [f"sweep {self.sweep.name}: {len(self.trials)} trials ({counts or 'none ran'})", format_table(header, rows)]
        for label, attr, mode in ((f"label-free score ({EPOCH_LOSS} / λ^α) among healthy trials", "score", "min"),
                                  ("linear probe accuracy", "linear_acc", "max")):
            best = self.best(attr, mode, healthy_only=attr == "score")
            if best is not None:
                params = ", ".join(f"{k}={_fmt(best.params.get(k))}" for k in keys)
                lines.append(f"best by {label}: {best.trial_id} ({params}) {attr} {_fmt(getattr(best, attr))}"
                             f"  MLflow run {best.run_id}")
        lines.append(f"MLflow: parent run {self.sweep.parent_run_id} in experiment {self.sweep.experiment!r} "
                     f"at {self.sweep.tracking_uri}")
        if sqlite_path(self.sweep.tracking_uri) is not None:
            lines.append(f"  browse: lejepa ui --tracking-uri {self.sweep.tracking_uri}")
        else:
            lines.append(f"  browse: {self.sweep.tracking_uri}")
        if self.interrupted:
            lines.append(f"interrupted: continue with  lejepa sweep --resume {self.sweep.name} "
                         f"--storage {self.sweep.path.parent}")
        return "\n".join(lines)


def default_storage(spec: SweepSpec | None) -> Path:
    """``<train.out_dir>/sweeps`` of the spec's base config (``runs/sweeps`` without a spec), absolute."""
    out_dir = spec.base_config.train.out_dir if spec is not None else "runs"
    return Path(out_dir).expanduser().resolve() / "sweeps"


def tracking_uri_for(spec: SweepSpec, override: str | None) -> str:
    """``override``, else the spec's, else the base config's, else the ``lejepa train`` default; made absolute."""
    cfg = spec.base_config
    uri = override or spec.tracking.uri or cfg.tracking.uri or default_tracking_uri(cfg.train.out_dir)
    db = sqlite_path(uri)
    if db is not None:
        return sqlite_uri(Path(db).expanduser().resolve())
    return uri  # anything else is checked by preflight()


def preflight(storage: Path, tracking_uri: str, address: str | None) -> None:
    """What a sweep needs, checked before any folder, MLflow run or Ray trial is created: the storage
    folder can be written, the tracking store answers, an explicit Ray address accepts connections."""
    import ray

    check_writable(storage, "sweep storage (--storage)")
    check_tracking_uri(tracking_uri)
    if not ray.is_initialized():
        check_ray_address(address or os.environ.get("RAY_ADDRESS"))


def run_sweep(spec: SweepSpec, *, storage: str | Path | None = None, name: str | None = None,
              address: str | None = None, tracking_uri: str | None = None) -> SweepOutcome:
    """Run ``spec`` as a new sweep ``<spec name>-<timestamp>`` (or ``name``) under ``storage``."""
    root = _storage(storage, spec)
    sweep_name = check_name(name, "--name") if name else f"{spec.name}-{datetime.now():%Y%m%d-%H%M%S}"
    path = root / sweep_name
    if path.exists():
        raise ConfigError(f"sweep {sweep_name!r} already exists in {root}: continue it with --resume {sweep_name}, "
                          f"or choose another --name")
    uri = tracking_uri_for(spec, tracking_uri)
    preflight(root, uri, address)
    check_grantable(spec, address)
    with _sweep_lock(root, sweep_name):
        if path.exists():  # created by a driver that held the lock a moment ago
            raise ConfigError(f"sweep {sweep_name!r} was just created in {root} by another `lejepa sweep`: "
                              f"continue it with --resume {sweep_name}, or choose another --name")
        return _run_new(spec, sweep_name, path, address, uri)


def _sweep_lock(root: Path, name: str) -> ProcessLock:
    """One driver per sweep name: a lock file beside the sweep's folder (it may not exist yet),
    removed when released."""
    root.mkdir(parents=True, exist_ok=True)
    return ProcessLock(root / f".{name}.lock", f"sweep {name!r} in {root}", remove=True)


def _run_new(spec: SweepSpec, sweep_name: str, path: Path, address: str | None, uri: str) -> SweepOutcome:
    with _ray(address):
        check_grantable(spec)
        path.mkdir(parents=True)
        try:
            (path / RESOLVED_SPEC).write_text(yaml.safe_dump(spec.resolved(), sort_keys=False))
            sweep = Sweep(sweep_name, path, uri, spec.tracking.experiment, _create_parent(spec, sweep_name, path, uri))
            sweep.save()
        except BaseException:  # no half-created sweep folder: nothing has run in it yet
            shutil.rmtree(path, ignore_errors=True)
            raise
        _check_shared(sweep)
        return _execute(spec, sweep, _new_tuner(spec, sweep))


def check_grantable(spec: SweepSpec, address: str | None = None) -> None:
    """Refuse, before anything is created, a sweep whose trials need more CPUs or GPUs than the
    whole Ray cluster has (Ray would keep them pending forever, its autoscaler printing that no
    node type can fulfil the request). Before a local Ray starts, the machine's own CPUs and
    CUDA devices are counted (so the refusal comes before Ray's start-up lines); in a running or
    joined Ray, its cluster resources."""
    import ray

    if ray.is_initialized():
        total = ray.cluster_resources()
        have = {"CPU": total.get("CPU", 0.0), "GPU": total.get("GPU", 0.0)}
        where = "this machine" if len(ray.nodes()) <= 1 else "the Ray cluster"
    elif not (address or os.environ.get("RAY_ADDRESS")):
        import torch

        have = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
        where = "this machine"
    else:
        return  # checked once joined
    for arch, res in sorted(spec.arch_resources.items()):
        for kind, need in zip(("CPU", "GPU"), res.total()):
            if need > have[kind] + 1e-9:
                raise ConfigError(f"a {arch} trial needs {need:g} {kind}{'s' if need != 1 else ''} but {where} has "
                                  f"{have[kind]:g}: lower resources.{'cpus' if kind == 'CPU' else 'gpus'}_per_trial "
                                  f"(or workers_per_trial), or join a cluster that has them (--address)")


def resume_sweep(name: str, *, storage: str | Path | None = None, address: str | None = None) -> SweepOutcome:
    """Continue the interrupted sweep ``name``: finished trials stay, the others resume from their checkpoints."""
    root = _storage(storage, None)
    path = root / check_name(name, "--resume")
    if not root.is_dir():
        raise ConfigError(f"--resume {name}: no resumable sweep at {path} (no storage folder {root}); "
                          f"pass --storage where it lives")
    with _sweep_lock(root, path.name):
        return _resume(name, root, path, address)


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
    with _ray(address):
        check_grantable(spec)
        client = MlflowClient(sweep.tracking_uri)
        client.update_run(sweep.parent_run_id, status=RUNNING)
        client.set_tag(sweep.parent_run_id, RESTARTED_AT_TAG if restart else RESUMED_AT_TAG,
                       datetime.now().isoformat(timespec="seconds"))
        _check_shared(sweep)
        if restart:
            print(f"sweep {name!r} was stopped before its first trial was recorded: starting it again", flush=True)
            return _execute(spec, sweep, _new_tuner(spec, sweep))
        trainable = _trainable(spec, sweep)
        return _execute(spec, sweep, tune.Tuner.restore(str(path), trainable, resume_errored=True))


# --------------------------------------------------------------------------- internals
def _storage(storage: str | Path | None, spec: SweepSpec | None) -> Path:
    if storage is not None and "://" in str(storage):
        raise ConfigError(f"--storage {storage}: trials write their run folders there, so it must be a path "
                          f"(on a cluster: a shared filesystem mounted at the same path on every node)")
    return Path(storage).expanduser().resolve() if storage is not None else default_storage(spec)


@contextlib.contextmanager
def _ray(address: str | None):
    """Use the Ray already initialised in this process, else join ``address`` / ``RAY_ADDRESS``, else start a
    local Ray; disconnect (or shut down) what was started here."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise LejepaError(f"cannot join the Ray cluster at {address}: {first_line(exc)} "
                              f"(start one with `ray start --head`)") from None
    else:  # a fresh local instance, never a cluster that happens to run on this machine
        ray.init(address="local", include_dashboard=False)
    if threading.current_thread() is threading.main_thread():
        from lejepa.cli import _stop_on_sigterm_as_on_sigint

        _stop_on_sigterm_as_on_sigint()  # Ray's driver replaced the CLI's SIGTERM handler when it connected
    try:
        yield
    finally:
        ray.shutdown()


def _check_shared(sweep: Sweep) -> None:
    """On a multi-node cluster, check from every node that the sweep folder (and a SQLite store) is visible."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    marker = sweep.path / f".shared-check-{uuid.uuid4().hex[:8]}"
    marker.write_text("")
    paths = [str(marker)]
    db = sqlite_path(sweep.tracking_uri)
    if db is not None:
        paths.append(db)
    probe = ray.remote(num_cpus=0)(_visible)
    try:
        seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(paths)
                        for n in nodes], timeout=120)
    except Exception as exc:  # a failed check is reported, not fatal
        print(f"warning: could not check that every node sees {sweep.path}: {first_line(exc)}", file=sys.stderr)
        return
    finally:
        marker.unlink(missing_ok=True)
    blind = [n[:8] for n, ok in zip(nodes, seen) if not ok[0]]
    if blind:
        print(f"warning: {len(blind)} of {len(nodes)} Ray nodes ({', '.join(blind)}) cannot see the sweep storage "
              f"{sweep.path.parent}: trials there write run folders and checkpoints to their own disk, so retries "
              f"and --resume lose them. Pass --storage on a filesystem shared by all nodes (NFS, …).", file=sys.stderr)
    if len(paths) > 1 and not all(ok[1] for ok in seen):
        print(f"warning: the MLflow SQLite store {paths[1]} is not visible on every node: trials there cannot log "
              f"to it. Run `mlflow server` and pass --tracking-uri http://HOST:PORT.", file=sys.stderr)


def _visible(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]


def _create_parent(spec: SweepSpec, name: str, path: Path, uri: str) -> str:
    client = MlflowClient(uri)
    experiment_id = get_or_create_experiment(client, spec.tracking.experiment, uri)
    tags = {KIND_TAG: KIND_SWEEP, SWEEP_TAG: name, STORAGE_TAG: str(path), SPEC_TAG: str(spec.path.resolve())}
    if spec.description:
        tags[NOTE_TAG] = spec.description
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    params = {"num_trials": spec.num_trials(), "num_samples": spec.num_samples, "space": ", ".join(spec.keys()),
              "search": spec.search.algo, "search.metric": spec.search.metric, "scheduler": spec.scheduler.type,
              "max_concurrent_trials": spec.max_concurrent_trials, "max_failures": spec.max_failures,
              "score_alpha": spec.score_alpha, "epochs": spec.epochs}
    try:
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        client.log_artifact(run.info.run_id, str(spec.path), artifact_path="spec")
        client.log_artifact(run.info.run_id, str(path / RESOLVED_SPEC), artifact_path="spec")
    except BaseException:  # no half-created parent run either
        with contextlib.suppress(Exception):
            client.delete_run(run.info.run_id)
        raise
    return run.info.run_id


def _trainable(spec: SweepSpec, sweep: Sweep) -> Any:
    ctx = TrialContext(sweep=sweep.name, base=spec.base, trials_dir=str(sweep.trials_dir),
                       train_storage=str(sweep.path / "ray_train"), tracking_uri=sweep.tracking_uri,
                       experiment=sweep.experiment, parent_run_id=sweep.parent_run_id,
                       score_alpha=spec.score_alpha, arch_resources=spec.arch_resources,
                       arch_params=spec.arch_params,
                       worst={m: math.inf if mode == "min" else -math.inf for m, mode in
                              ((spec.scheduler.metric, spec.scheduler.mode), (spec.search.metric, spec.search.mode))})
    # Ray's annotation omits a callable returning a resource dict, which with_resources accepts
    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), spec.trial_resources)  # type: ignore[arg-type]


def _new_tuner(spec: SweepSpec, sweep: Sweep) -> tune.Tuner:
    search_alg = scheduler = None
    if spec.search.algo == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=spec.search.metric, mode=spec.search.mode, seed=spec.search.seed)
    if spec.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # time is the trial's epoch; a trial reaching max_t is not stopped but finishes and evaluates
        scheduler = ASHAScheduler(time_attr=EPOCH, metric=spec.scheduler.metric, mode=spec.scheduler.mode,
                                  max_t=spec.epochs, grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor, stop_last_trials=False)
    return tune.Tuner(
        _trainable(spec, sweep),
        param_space=spec.param_space(),
        tune_config=tune.TuneConfig(num_samples=spec.num_samples, search_alg=search_alg, scheduler=scheduler,
                                    max_concurrent_trials=spec.max_concurrent_trials),
        run_config=tune.RunConfig(name=sweep.name, storage_path=str(sweep.path.parent), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  callbacks=[ProgressTable(spec.keys())]),
    )


def _execute(spec: SweepSpec, sweep: Sweep, tuner: tune.Tuner) -> SweepOutcome:
    client = MlflowClient(sweep.tracking_uri)
    status = FAILED
    try:
        outcome = _settle(client, spec, sweep, tuner.fit())
        status = KILLED if outcome.interrupted else FINISHED
        return outcome
    except KeyboardInterrupt:
        status = KILLED
        raise
    finally:
        client.set_terminated(sweep.parent_run_id, status)


def _settle(client: MlflowClient, spec: SweepSpec, sweep: Sweep, grid: tune.ResultGrid) -> SweepOutcome:
    """Summarise Tune's results, give every child run its final status, log the best trials on the parent."""
    experiment_id = get_or_create_experiment(client, sweep.experiment, sweep.tracking_uri)
    runs = {r.data.tags.get(TRIAL_ID_TAG): r for r in client.search_runs(
        [experiment_id], filter_string=f"tags.{PARENT_TAG} = '{sweep.parent_run_id}'", max_results=10_000)}
    outcome = SweepOutcome(sweep, spec)
    for i in range(len(grid)):  # ResultGrid is indexed, not typed as iterable
        result = grid[i]
        metrics, config = result.metrics or {}, result.config or {}
        trial_id = metrics.get("trial_id") or (Path(result.path).name if result.path else "(not started)")
        run = runs.get(trial_id)
        outcome.trials.append(TrialSummary(
            trial_id=trial_id, status=_status(result), params={k: config.get(k) for k in spec.keys()},
            epoch=metrics.get(EPOCH), loss=metrics.get(EPOCH_LOSS), score=metrics.get(SCORE_METRIC),
            online_acc=metrics.get(ONLINE_METRIC), linear_acc=metrics.get(FINAL_METRIC),
            run_id=run.info.run_id if run else None, health=_health(metrics),
            collapse=metrics.get(COLLAPSE_RATIO)))
    by_id: dict[str | None, TrialSummary] = {t.trial_id: t for t in outcome.trials}
    for trial_id, run in runs.items():
        trial = by_id.get(trial_id)
        unseen = STATUS_INTERRUPTED if outcome.interrupted else STATUS_FAILED
        _close_child(client, run, trial.status if trial else unseen, trial.epoch if trial else None)
    _log_best(client, outcome)
    return outcome


def _health(metrics: dict[str, Any]) -> str | None:
    """The verdict of a trial's last report (diverged and collapsed trials say so themselves)."""
    if metrics.get(DIVERGED_FLAG):
        return DIVERGED
    if metrics.get(COLLAPSED_FLAG):
        return COLLAPSED
    code = metrics.get(VERDICT)
    return VERDICTS[int(code)] if code is not None else None


def _status(result: Any) -> str:
    metrics = result.metrics or {}
    if result.error is not None:
        return STATUS_FAILED
    if metrics.get(DIVERGED_FLAG):
        return STATUS_DIVERGED
    if metrics.get(COLLAPSED_FLAG):
        return STATUS_COLLAPSED
    if metrics.get("done"):  # Tune's own key
        return STATUS_FINISHED if FINAL_METRIC in metrics else STATUS_PRUNED
    return STATUS_INTERRUPTED if metrics else STATUS_PENDING


def _close_child(client: MlflowClient, run: Any, status: str, epoch: int | None) -> None:
    """FINISHED for finished, pruned and collapsed trials (tagged ``lejepa.status=pruned|collapsed``),
    FAILED for failed and diverged ones (``lejepa.status=diverged``), else KILLED."""
    target = {STATUS_FINISHED: FINISHED, STATUS_PRUNED: FINISHED, STATUS_COLLAPSED: FINISHED, STATUS_FAILED: FAILED,
              STATUS_DIVERGED: FAILED}.get(status, KILLED)
    tags = {}
    if status in (STATUS_DIVERGED, STATUS_COLLAPSED):
        tags = {STATUS_TAG: status, HEALTH_TAG: status}  # the verdict of the same name
    elif status == STATUS_PRUNED:
        tags = {STATUS_TAG: STATUS_PRUNED, PRUNED_AT_EPOCH_TAG: str(epoch)}
    elif target == KILLED:
        tags = {STATUS_TAG: STATUS_INTERRUPTED}
    if tags:
        client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    if run.info.status != target:
        client.set_terminated(run.info.run_id, target)


def _log_best(client: MlflowClient, outcome: SweepOutcome) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(trials_metric(s), float(outcome.count(s)), now, 0)
               for s in (STATUS_FINISHED, STATUS_PRUNED, STATUS_COLLAPSED, STATUS_DIVERGED, STATUS_FAILED)]
    tags = []
    for attr, mode, key in (("score", "min", BEST_SCORE), ("linear_acc", "max", BEST_LINEAR_PROBE_ACC)):
        best = outcome.best(attr, mode, healthy_only=attr == "score")
        if best is not None:
            metrics.append(Metric(key, float(getattr(best, attr)), now, 0))
            tags += [RunTag(best_trial_tag(key), best.trial_id), RunTag(best_run_tag(key), best.run_id or "")]
    client.log_batch(outcome.sweep.parent_run_id, metrics=metrics, tags=tags)


def _score_order(trial: TrialSummary) -> tuple[int, float]:
    return (0 if trial.status == STATUS_FINISHED else 1, trial.score if trial.score is not None else float("inf"))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ProgressTable(tune.Callback):
    """The live trial table on stderr: status, sampled params, epoch, loss, score, online probe accuracy.

    Reprinted when something changed, at most every ``interval`` seconds, plus one line when a trial
    starts, finishes, fails or is retried. Holds no stream or lock: Tune pickles it with the experiment.
    """

    def __init__(self, keys: list[str], interval: float = 30.0) -> None:
        self.keys = keys
        self.interval = interval
        self._last = 0.0
        self._shown: tuple = ()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        state = tuple((t.trial_id, t.status, t.last_result.get(EPOCH)) for t in trials)
        if state != self._shown and time.monotonic() - self._last >= self.interval:
            self._last, self._shown = time.monotonic(), state
            self._print(self.table(trials))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = ", ".join(f"{k}={_fmt(trial.config.get(k))}" for k in self.keys)
        self._print(f"trial {trial.trial_id} started{f': {params}' if params else ''}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result
        if r.get(DIVERGED_FLAG):
            self._print(f"trial {trial.trial_id} diverged at step {int(r[DIVERGED_STEP])} (loss not finite); "
                        f"the sweep goes on")
            return
        if r.get(COLLAPSED_FLAG):
            self._print(f"trial {trial.trial_id} stopped at epoch {r.get(EPOCH)}: collapsed (collapse ratio "
                        f"{_fmt(r.get(COLLAPSE_RATIO))}); its resources go to the next trial")
            return
        end = f"linear acc {_fmt(r[FINAL_METRIC])}" if FINAL_METRIC in r else "stopped early by the scheduler"
        self._print(f"trial {trial.trial_id} done: epoch {r.get(EPOCH)}  loss {_fmt(r.get(EPOCH_LOSS))}  "
                    f"score {_fmt(r.get(SCORE_METRIC))}  {end}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(f"trial {trial.trial_id} failed (attempt {trial.num_failures}); retrying from its last checkpoint")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(f"trial {trial.trial_id} failed after {trial.num_failures} attempt(s): see {trial.error_file or trial.path}")

    def table(self, trials: list) -> str:
        header = ["trial", "status", *self.keys, "epoch", "loss", "score", "collapse", "rank", "health", "probe acc"]
        rows = [[t.trial_id, t.status.lower(), *(t.config.get(k) for k in self.keys), t.last_result.get(EPOCH),
                 t.last_result.get(EPOCH_LOSS), t.last_result.get(SCORE_METRIC),
                 t.last_result.get(COLLAPSE_RATIO), t.last_result.get(PROJ_RANK),
                 _health(t.last_result), t.last_result.get(ONLINE_METRIC)]
                for t in trials]
        return f"[{datetime.now():%H:%M:%S}]\n" + format_table(header, rows)

    @staticmethod
    def _print(text: str) -> None:
        print(text, file=sys.stderr, flush=True)
