"""Run health in a sweep table, and which checkpoints a health-aware score may pick.

Every checkpoint (run × epoch) gets
- ``collapse_ratio``: the logged ``health/collapse_ratio``, or for runs logged before it existed
  SIGReg / EP(constant column) at the run's batch size and quadrature (:mod:`lejepa.health`);
- ``verdict``: :func:`lejepa.health.verdict` of the ratio and the logged projector rank, with
  today's thresholds (so runs logged under older ones are judged alike; without a logged rank
  ``dimensional collapse`` cannot be told); the logged verdict only where no ratio is known;
- ``scale_group``: batch size · views · slices · quadrature. SIGReg is N times a distance
  between characteristic functions and the invariance term grows with the local views, so
  losses are on one scale only inside a group.

A health-aware score ``safe_<key>`` equals ``score.<key>`` on eligible checkpoints and −∞
elsewhere (ranked below every run, never picked). Eligible: verdict ``healthy``; for the
loss-based scores also in the *main* scale group (the one with the most healthy checkpoints),
since losses of other groups are not comparable with it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lejepa.config import Config
from lejepa.health import COLLAPSED, DIMENSIONAL, HEALTHY, VERDICTS, collapsed_ep, verdict

SCALE_PARAMS = {
    "optim.batch_size": "batch_size",
    "views.global_views": "global_views",
    "views.local_views": "local_views",
    "loss.num_slices": "num_slices",
    "loss.knots": "knots",
    "loss.t_max": "t_max",
}
"""The config keys that set a loss's scale (column names in the table)."""
LOSS_SCORES = ("loss", "loss_lastk", "loss_lam", "loss_lam_fit")
"""Scores computed from the training loss: comparable only within one scale group."""
SAFE = "safe_"


def _defaults() -> dict[str, float]:
    flat = Config().flat()
    return {col: float(flat[key]) for key, col in SCALE_PARAMS.items()}


def add_health(epochs: pd.DataFrame) -> pd.DataFrame:
    """``epochs`` with the scale columns, ``collapse_ratio``, ``verdict``, ``healthy`` and ``scale_group``."""
    out = epochs.copy()
    defaults = _defaults()
    for key, col in SCALE_PARAMS.items():
        if f"params.{key}" in out:
            out[col] = pd.to_numeric(out[f"params.{key}"], errors="coerce")
        elif col not in out:
            out[col] = np.nan
        if col != "batch_size":  # a missing batch size stays unknown: it sets the collapse scale
            out[col] = out[col].fillna(defaults[col])
    computed = [
        out.at[i, "sigreg"] / collapsed_ep(int(r.batch_size), r.t_max, int(r.knots))
        if np.isfinite(r.batch_size) and np.isfinite(r.sigreg)
        else np.nan
        for i, r in zip(out.index, out[["batch_size", "t_max", "knots", "sigreg"]].itertuples())
    ]
    logged = out["collapse_ratio"] if "collapse_ratio" in out else pd.Series(np.nan, index=out.index)
    out["collapse_ratio"] = logged.fillna(pd.Series(computed, index=out.index))
    rank = out["proj_rank"] if "proj_rank" in out else pd.Series(np.nan, index=out.index)
    code = out["verdict_code"] if "verdict_code" in out else pd.Series(np.nan, index=out.index)
    out["verdict"] = [
        verdict(ratio, r, loss) if np.isfinite(ratio) else (VERDICTS[int(c)] if np.isfinite(c) else "unknown")
        for c, ratio, r, loss in zip(code, out["collapse_ratio"], rank, out["loss"])
    ]
    out["healthy"] = out["verdict"] == HEALTHY
    out["scale_group"] = [scale_group(r) for r in out[list(SCALE_PARAMS.values())].itertuples(index=False)]
    return out


def scale_group(r) -> str:
    """``batch 128 · views 2+0 · slices 256 · t ≤ 3 × 17 knots`` for a row of the scale columns."""
    batch = f"{int(r.batch_size)}" if np.isfinite(r.batch_size) else "?"
    return (
        f"batch {batch} · views {int(r.global_views)}+{int(r.local_views)} · slices {int(r.num_slices)} · "
        f"t ≤ {r.t_max:g} × {int(r.knots)} knots"
    )


def main_group(candidates: pd.DataFrame) -> str | None:
    """The scale group with the most healthy candidates (ties: the first in sorted order)."""
    healthy = candidates[candidates["healthy"]]
    if not len(healthy):
        return None
    counts = healthy["scale_group"].value_counts()
    return sorted(counts[counts == counts.max()].index)[0]


def add_safe_scores(epochs: pd.DataFrame, scores: list[str], group: str | None) -> pd.DataFrame:
    """``score.safe_<key>`` for every key of ``scores``: the score where eligible, −∞ elsewhere."""
    out = epochs.copy()
    for key in scores:
        eligible = out["healthy"] & ((out["scale_group"] == group) if key in LOSS_SCORES else True)
        out[f"score.{SAFE}{key}"] = np.where(eligible, out[f"score.{key}"], -np.inf)
    return out


def exclusions(runs: pd.DataFrame, group: str | None) -> pd.DataFrame:
    """Runs a health-aware score ranks last, each with its reason (one row per run, final epoch)."""
    rows = []
    for r in runs.itertuples(index=False):
        if r.verdict != HEALTHY:
            why = {
                COLLAPSED: f"collapsed: collapse ratio {r.collapse_ratio:.2f}",
                DIMENSIONAL: f"dimensional collapse: projector rank {getattr(r, 'proj_rank', np.nan):.2f} of its dimension",
            }.get(r.verdict, r.verdict)
        elif r.scale_group != group:
            why = f"loss on another scale ({r.scale_group}): left out of the loss-based scores only"
        else:
            continue
        rows.append({"trial": r.trial, "arch": r.arch, "λ": r.lam, "verdict": r.verdict, "reason": why})
    return pd.DataFrame(rows, columns=["trial", "arch", "λ", "verdict", "reason"])


def replay_pruning(epochs: pd.DataFrame, patience: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Label-free pruning replayed on a full sweep: each run stops after its first ``patience``
    consecutive ``collapsed`` epochs, as ``prune_collapsed: patience`` would have stopped it.

    Returns (the rows the pruned sweep would have produced, one row per run with ``epochs_run``,
    ``epochs_full`` and ``stopped_at`` (NaN if never stopped)).
    """
    kept, runs = [], []
    for run_id, part in epochs.sort_values(["run_id", "epoch"]).groupby("run_id", sort=False):
        streak, stop = 0, None
        for epoch, v in zip(part["epoch"], part["verdict"]):
            streak = streak + 1 if v == COLLAPSED else 0
            if streak >= patience:
                stop = int(epoch)
                break
        kept.append(part if stop is None else part[part["epoch"] <= stop])
        runs.append(
            {
                "run_id": run_id,
                "trial": part["trial"].iloc[0],
                "epochs_full": int(part["epoch"].max()),
                "epochs_run": int(part["epoch"].max()) if stop is None else stop,
                "stopped_at": np.nan if stop is None else stop,
            }
        )
    return pd.concat(kept, ignore_index=True), pd.DataFrame(runs)
