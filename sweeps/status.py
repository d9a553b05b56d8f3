"""How a trial ended, decided in one place: its status from Tune's result (:func:`trial_status`),
its health (:func:`trial_health`), and the tags its run gets beside its MLflow status
(:func:`outcome_tags`) — used when the sweep settles its trials, when Tune stops a trial's process,
and for the sweep's own parent run.

The MLflow status itself comes from :func:`lejepa.record.run_status`, the rule the trainer's
:class:`~lejepa.tracking.MLflowCallback` ends a plain run by too (FINISHED after training or
label-free pruning, FAILED on an error or divergence, KILLED on Ctrl-C).
"""

from __future__ import annotations

from typing import Any

from lejepa.record import (
    COLLAPSED,
    COLLAPSED_FLAG,
    DIVERGED,
    DIVERGED_FLAG,
    HEALTH_TAG,
    KILLED,
    LINEAR_PROBE_ACC,
    PRUNED_AT_EPOCH_TAG,
    STATUS_COLLAPSED,
    STATUS_DIVERGED,
    STATUS_FAILED,
    STATUS_FINISHED,
    STATUS_INTERRUPTED,
    STATUS_PENDING,
    STATUS_PRUNED,
    STATUS_TAG,
    VERDICT,
    VERDICTS,
    run_status,
)

FINAL_METRIC = LINEAR_PROBE_ACC
"""Reported once, after the final evaluation: a trial whose last report has it finished."""


def outcome_tags(status: str, epoch: int | None) -> dict[str, str]:
    """The tags a trial's run gets beside its :func:`run_status`: what the MLflow status alone does not say."""
    if status in (STATUS_DIVERGED, STATUS_COLLAPSED):
        return {STATUS_TAG: status, HEALTH_TAG: status}  # the verdict of the same name
    if status == STATUS_PRUNED:
        return {STATUS_TAG: STATUS_PRUNED, PRUNED_AT_EPOCH_TAG: str(epoch)}
    if run_status(status) == KILLED:
        return {STATUS_TAG: STATUS_INTERRUPTED}
    return {}


def trial_status(result: Any) -> str:
    """A trial's status from its Tune result: failed, diverged, collapsed, finished (evaluated),
    pruned (stopped by the scheduler), interrupted (some reports) or pending (none)."""
    metrics = result.metrics or {}
    if result.error is not None:
        return STATUS_FAILED
    if metrics.get(DIVERGED_FLAG):
        return STATUS_DIVERGED
    if metrics.get(COLLAPSED_FLAG):
        return STATUS_COLLAPSED
    if FINAL_METRIC in metrics:  # its last report, sent after the final evaluation (Tune's "done" may lag it)
        return STATUS_FINISHED
    if metrics.get("done"):  # Tune's own key: stopped before its final evaluation
        return STATUS_PRUNED
    return STATUS_INTERRUPTED if metrics else STATUS_PENDING


def trial_health(metrics: dict[str, Any]) -> str | None:
    """The verdict of a trial's last report (diverged and collapsed trials say so themselves)."""
    if metrics.get(DIVERGED_FLAG):
        return DIVERGED
    if metrics.get(COLLAPSED_FLAG):
        return COLLAPSED
    code = metrics.get(VERDICT)
    return VERDICTS[int(code)] if code is not None else None
