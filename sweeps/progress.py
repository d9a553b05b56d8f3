"""What a sweep prints: the live trial table and trial events while it runs (:class:`ProgressTable`,
on stderr), and the end-of-sweep :func:`summary`."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ray import tune

from lejepa.record import (
    COLLAPSE_RATIO,
    COLLAPSED_FLAG,
    DIVERGED_FLAG,
    DIVERGED_STEP,
    EPOCH,
    EPOCH_LOSS,
    ONLINE_TEST_ACC,
    PROJ_RANK,
    STATUS_FINISHED,
    STATUSES,
    TRAIN_SCORE,
    sqlite_path,
)
from lejepa.tables import fmt, format_table
from sweeps.status import FINAL_METRIC, trial_health

if TYPE_CHECKING:
    from sweeps.outcome import SweepOutcome, TrialSummary


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
        params = ", ".join(f"{k}={fmt(trial.config.get(k))}" for k in self.keys)
        self._print(f"trial {trial.trial_id} started{f': {params}' if params else ''}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result
        if r.get(DIVERGED_FLAG):
            self._print(f"trial {trial.trial_id} diverged at step {int(r[DIVERGED_STEP])} (loss not finite); the sweep goes on")
            return
        if r.get(COLLAPSED_FLAG):
            self._print(
                f"trial {trial.trial_id} stopped at epoch {r.get(EPOCH)}: collapsed (collapse ratio "
                f"{fmt(r.get(COLLAPSE_RATIO))}); its resources go to the next trial"
            )
            return
        end = f"frozen linear probe acc {fmt(r[FINAL_METRIC])}" if FINAL_METRIC in r else "stopped early by the scheduler"
        self._print(
            f"trial {trial.trial_id} done: epoch {r.get(EPOCH)}  loss {fmt(r.get(EPOCH_LOSS))}  "
            f"score {fmt(r.get(TRAIN_SCORE))}  {end}"
        )

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(f"trial {trial.trial_id} failed (attempt {trial.num_failures}); retrying from its last checkpoint")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(f"trial {trial.trial_id} failed after {trial.num_failures} attempt(s): see {trial.error_file or trial.path}")

    def table(self, trials: list) -> str:
        header = ["trial", "status", *self.keys, "epoch", "loss", "score", "collapse", "rank", "health", "online probe acc"]
        rows = [
            [
                t.trial_id,
                t.status.lower(),
                *(t.config.get(k) for k in self.keys),
                t.last_result.get(EPOCH),
                t.last_result.get(EPOCH_LOSS),
                t.last_result.get(TRAIN_SCORE),
                t.last_result.get(COLLAPSE_RATIO),
                t.last_result.get(PROJ_RANK),
                trial_health(t.last_result),
                t.last_result.get(ONLINE_TEST_ACC),
            ]
            for t in trials
        ]
        return f"[{datetime.now():%H:%M:%S}]\n" + format_table(header, rows)

    @staticmethod
    def _print(text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def summary(outcome: SweepOutcome) -> str:
    """The end-of-sweep summary: the trial table, the best trials, where to look in MLflow."""
    sweep, keys = outcome.sweep, outcome.spec.keys()
    header = ["trial", "status", *keys, "epoch", "loss", "score", "collapse", "health", "online probe acc", "frozen probe acc"]
    rows = [
        [
            t.trial_id,
            t.status,
            *(t.params.get(k) for k in keys),
            t.epoch,
            t.loss,
            t.score,
            t.collapse,
            t.health,
            t.online_acc,
            t.linear_acc,
        ]
        for t in sorted(outcome.trials, key=_score_order)
    ]
    counts = ", ".join(f"{outcome.count(s)} {s}" for s in STATUSES if outcome.count(s))
    lines = [f"sweep {sweep.name}: {len(outcome.trials)} trials ({counts or 'none ran'})", format_table(header, rows)]
    for label, attr, mode in (
        (f"label-free score ({EPOCH_LOSS} / λ^α) among healthy trials", "score", "min"),
        ("frozen linear probe accuracy (labels: evidence, not the pick)", "linear_acc", "max"),
    ):
        best = outcome.best(attr, mode, healthy_only=attr == "score")
        if best is not None:
            params = ", ".join(f"{k}={fmt(best.params.get(k))}" for k in keys)
            lines.append(
                f"best by {label}: {best.trial_id} ({params}) {attr} {fmt(getattr(best, attr))}  MLflow run {best.run_id}"
            )
    lines.append(f"MLflow: parent run {sweep.parent_run_id} in experiment {sweep.experiment!r} at {sweep.tracking_uri}")
    if sqlite_path(sweep.tracking_uri) is not None:
        lines.append(f"  browse: lejepa ui --tracking-uri {sweep.tracking_uri}")
    else:
        lines.append(f"  browse: {sweep.tracking_uri}")
    if outcome.interrupted:
        lines.append(f"interrupted: continue with  lejepa sweep --resume {sweep.name} --storage {sweep.path.parent}")
    return "\n".join(lines)


def _score_order(trial: TrialSummary) -> tuple[int, float]:
    return (0 if trial.status == STATUS_FINISHED else 1, trial.score if trial.score is not None else float("inf"))
