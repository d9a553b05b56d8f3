"""A sweep's outcome once ``fit`` returned: one :class:`TrialSummary` per trial, and :func:`settle`,
which builds it from Tune's results and settles the MLflow runs (each child's final status, the
best trials on the parent)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient

from lejepa.record import (
    ARCH_PARAM,
    COLLAPSE_RATIO,
    EPOCH,
    EPOCH_LOSS,
    HEALTHY,
    INIT_LINEAR_PROBE_ACC,
    LAM_PARAM,
    ONLINE_TEST_ACC,
    STATUS_FAILED,
    STATUS_FINISHED,
    STATUS_INTERRUPTED,
    STATUS_PENDING,
    TRAIN_SCORE,
)
from sweeps.layout import Sweep
from sweeps.mlflow_runs import child_runs, close_child_run, log_best
from sweeps.overview import log_overview
from sweeps.progress import summary
from sweeps.spec import SweepSpec
from sweeps.status import FINAL_METRIC, trial_health, trial_status

if TYPE_CHECKING:
    from ray import tune


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
    arch: str | None = None
    lam: float | None = None
    init_acc: float | None = None  # the frozen linear probe at random init (``train.eval_at_init``)


@dataclass
class SweepOutcome:
    """The trials of a sweep after ``fit`` returned, and where to find them."""

    sweep: Sweep
    spec: SweepSpec
    trials: list[TrialSummary] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return any(t.status in (STATUS_INTERRUPTED, STATUS_PENDING) for t in self.trials)

    @property
    def status(self) -> str:
        """The sweep's own status (its parent run's, through :func:`~lejepa.record.run_status`):
        interrupted while some trial is, else finished."""
        return STATUS_INTERRUPTED if self.interrupted else STATUS_FINISHED

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)

    def best(self, attr: str, mode: str, healthy_only: bool = False) -> TrialSummary | None:
        """The finished trial (healthy too, with ``healthy_only``) with the lowest (``min``) or highest
        (``max``) ``attr``."""
        done = [
            t
            for t in self.trials
            if t.status == STATUS_FINISHED and getattr(t, attr) is not None and (not healthy_only or t.health == HEALTHY)
        ]
        if not done:
            return None
        return (min if mode == "min" else max)(done, key=lambda t: getattr(t, attr))

    def render(self) -> str:
        """The end-of-sweep summary: the trial table, the best trials, where to look in MLflow."""
        return summary(self)


def settle(client: MlflowClient, spec: SweepSpec, sweep: Sweep, grid: tune.ResultGrid) -> SweepOutcome:
    """Summarise Tune's results, give every child run its final status, log the best trials on the parent."""
    runs = child_runs(client, sweep)
    outcome = SweepOutcome(sweep, spec)
    base = spec.base_config
    for i in range(len(grid)):  # ResultGrid is indexed, not typed as iterable
        result = grid[i]
        metrics, config = result.metrics or {}, result.config or {}
        trial_id = metrics.get("trial_id") or (Path(result.path).name if result.path else "(not started)")
        run = runs.get(trial_id)
        outcome.trials.append(
            TrialSummary(
                trial_id=trial_id,
                status=trial_status(result),
                params={k: config.get(k) for k in spec.keys()},
                epoch=metrics.get(EPOCH),
                loss=metrics.get(EPOCH_LOSS),
                score=metrics.get(TRAIN_SCORE),
                online_acc=metrics.get(ONLINE_TEST_ACC),
                linear_acc=metrics.get(FINAL_METRIC),
                run_id=run.info.run_id if run else None,
                health=trial_health(metrics),
                collapse=metrics.get(COLLAPSE_RATIO),
                arch=config.get(ARCH_PARAM, base.model.arch),
                lam=config.get(LAM_PARAM, base.loss.lam),
                init_acc=metrics.get(INIT_LINEAR_PROBE_ACC),
            )
        )
    by_id: dict[str | None, TrialSummary] = {t.trial_id: t for t in outcome.trials}
    for trial_id, run in runs.items():
        trial = by_id.get(trial_id)
        unseen = STATUS_INTERRUPTED if outcome.interrupted else STATUS_FAILED
        close_child_run(client, run, trial.status if trial else unseen, trial.epoch if trial else None)
    log_best(client, outcome)
    log_overview(client, outcome)
    return outcome
