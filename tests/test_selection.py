"""Picks, regret and rank arithmetic on hand-made candidate tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import selection as sel


def _candidates() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": ["r1", "r2", "r3", "r4", "r4"],
            "trial": ["t1", "t2", "t3", "t4", "t4"],
            "arch": ["a", "a", "b", "b", "b"],
            "lam": [0.01, 0.05, 0.1, 0.5, 0.5],
            "epoch": [2, 2, 2, 1, 2],
            "linear_probe_acc": [0.80, 0.90, 0.85, np.nan, 0.90],
            "online_acc": [0.7, 0.8, 0.75, 0.6, 0.82],
            "checkpoint": ["/c/1", None, "/c/3", "/c/4a", "/c/4b"],
            "checkpoint_uri": [None, "runs:/r2/checkpoint", None, None, "runs:/r4/checkpoint"],
            "score.good": [1.0, 4.0, 2.0, 0.0, 3.0],
            "score.mid": [0.0, 1.0, 5.0, np.nan, 2.0],
            "score.none": np.nan,
        }
    )


def test_regret_and_rank_arithmetic():
    assert sel.regret_points(0.85, 0.90) == pytest.approx(5.0)
    assert sel.regret_points(0.9, 0.9) == 0.0
    assert sel.pick_rank(0.85, [0.80, 0.90, 0.85, 0.90]) == 3  # two candidates strictly better
    assert sel.pick_rank(0.90, [0.80, 0.90, 0.85, 0.90]) == 1  # a tie with the oracle is rank 1


def test_pick_against_the_oracle():
    c = _candidates().drop(index=3).reset_index(drop=True)  # every candidate has a frozen-probe accuracy
    assert sel.evidence_column(c) == "linear_probe_acc"
    good = sel.select(c, "good", "linear_probe_acc")
    assert (good.trial, good.epoch, good.checkpoint) == ("t2", 2, "runs:/r2/checkpoint")
    assert good.regret == 0.0 and good.rank == 1 and good.oracle_trial == "t2" and good.candidates == 4
    mid = sel.select(c, "mid", "linear_probe_acc")
    assert (mid.trial, mid.checkpoint, mid.value) == ("t3", "/c/3", 5.0)
    assert mid.accuracy == 0.85 and mid.oracle_accuracy == 0.90
    assert mid.regret == pytest.approx(5.0) and mid.rank == 3
    assert sel.random_regret(c, "linear_probe_acc") == pytest.approx(100 * (0.90 - 0.8625))


def test_evidence_falls_back_to_online_probe_then_none():
    c = _candidates()
    assert sel.evidence_column(c) == "online_acc"  # the frozen probe is missing for one checkpoint
    pick = sel.select(c, "good", "online_acc")
    assert pick.trial == "t2" and pick.oracle_trial == "t4" and pick.oracle_epoch == 2
    assert pick.regret == pytest.approx(2.0) and pick.rank == 2
    assert sel.evidence_column(c.drop(columns=["linear_probe_acc", "online_acc"])) is None


def test_label_free_pick_without_evidence_and_unscorable_scores():
    c = _candidates()
    pick = sel.select(c, "mid", None)
    assert pick.trial == "t3" and np.isnan(pick.accuracy) and np.isnan(pick.regret) and np.isnan(pick.rank)
    assert sel.select(c, "none", None) is None
    table = sel.selection_table(c, ["good", "none", "mid", "missing"], "online_acc")
    assert list(table["score"]) == ["good", "mid"] and list(table["trial"]) == ["t2", "t3"]


def test_checkpoint_reference_prefers_the_local_folder():
    c = _candidates()
    assert [sel.checkpoint_ref(r) for _, r in c.iterrows()] == ["/c/1", "runs:/r2/checkpoint", "/c/3", "/c/4a", "/c/4b"]
