"""Pick a checkpoint by a label-free score and measure the pick against the oracle.

Candidates are checkpoints (rows run × epoch). For a score s (higher = predicted better):

- pick     = argmax_c s(c) over candidates with a finite score (ties: first in table order);
- oracle   = argmax_c acc(c), the best checkpoint by the evidence (probe accuracy);
- regret   = 100 · (acc(oracle) − acc(pick)), in accuracy points (0 = the pick is the best);
- rank     = 1 + #{c : acc(c) > acc(pick)} (1 = no candidate is better than the pick).

Without probe accuracy (a label-free sweep) the pick is still made; the evidence fields are NaN.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

EVIDENCE = {
    "linear_probe_acc": "frozen linear probe",
    "online_acc": "online linear probe (trained alongside pretraining)",
}
EVIDENCE_SHORT = {"linear_probe_acc": "frozen probe", "online_acc": "online probe"}
"""The same, as a table column says it."""


def evidence_column(candidates: pd.DataFrame) -> str | None:
    """The accuracy known for *every* candidate: the frozen linear probe if measured on all of
    them, else the per-epoch online probe, else ``None`` (no labels)."""
    for column in EVIDENCE:
        if len(candidates) and column in candidates and candidates[column].notna().all():
            return column
    return None


@dataclass(frozen=True)
class Pick:
    """The checkpoint a score picks and how it compares with the oracle."""

    score: str
    value: float
    run_id: str
    trial: str
    arch: str
    lam: float
    epoch: int
    checkpoint: str | None
    accuracy: float
    oracle_accuracy: float
    oracle_trial: str | None
    oracle_epoch: int | None
    regret: float
    rank: float
    candidates: int


def regret_points(pick_acc: float, oracle_acc: float) -> float:
    """Accuracy points lost by the pick: 100 · (oracle − pick)."""
    return 100.0 * (oracle_acc - pick_acc)


def pick_rank(pick_acc: float, accuracies) -> int:
    """1 + the number of candidates strictly more accurate than the pick."""
    return 1 + int(np.sum(np.asarray(accuracies, dtype=float) > pick_acc))


def checkpoint_ref(row: pd.Series) -> str | None:
    """The checkpoint folder if it is on this disk, else its MLflow artifact URI."""
    for column in ("checkpoint", "checkpoint_uri"):
        value = row.get(column)
        if isinstance(value, str) and value:
            return value
    return None


def select(candidates: pd.DataFrame, score: str, acc: str | None = None) -> Pick | None:
    """The pick of ``score`` (a key: column ``score.<key>``) among ``candidates``; None if no finite score."""
    values = candidates[f"score.{score}"].astype(float)
    if not np.isfinite(values).any():
        return None
    row = candidates.loc[values.idxmax()]
    pick_acc = oracle_acc = regret = rank = float("nan")
    oracle_trial = oracle_epoch = None
    if acc is not None:
        accuracies = candidates[acc].astype(float)
        oracle = candidates.loc[accuracies.idxmax()]
        pick_acc, oracle_acc = float(row[acc]), float(oracle[acc])
        oracle_trial, oracle_epoch = str(oracle["trial"]), int(oracle["epoch"])
        regret = regret_points(pick_acc, oracle_acc)
        rank = pick_rank(pick_acc, accuracies)
    return Pick(
        score,
        float(row[f"score.{score}"]),
        str(row["run_id"]),
        str(row["trial"]),
        str(row["arch"]),
        float(row["lam"]),
        int(row["epoch"]),
        checkpoint_ref(row),
        pick_acc,
        oracle_acc,
        oracle_trial,
        oracle_epoch,
        regret,
        rank,
        int(len(candidates)),
    )


def selection_table(candidates: pd.DataFrame, scores: list[str], acc: str | None) -> pd.DataFrame:
    """One row per score (in order): its pick, the pick's accuracy, the oracle's, regret and rank."""
    picks = [select(candidates, s, acc) for s in scores if f"score.{s}" in candidates]
    return pd.DataFrame([asdict(p) for p in picks if p is not None])


def random_regret(candidates: pd.DataFrame, acc: str) -> float:
    """Expected regret (points) of a uniformly random pick: 100 · (max acc − mean acc)."""
    accuracies = candidates[acc].astype(float)
    return regret_points(float(accuracies.mean()), float(accuracies.max()))
