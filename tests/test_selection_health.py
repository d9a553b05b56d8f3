"""Health-aware selection on a hand-made sweep: an unhealthy checkpoint is never picked, losses are
compared only within one scale (batch size, views, slices, quadrature), and pruning replays."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.health import add_health, replay_pruning
from analysis.report import analyse, health_comparison, terminal_table
from lejepa.health import collapsed_ep

from helpers import hand_made_sweep


def test_health_columns_from_logged_and_computed_measures():
    e = add_health(hand_made_sweep().epochs)
    final = e[e["is_final"]].set_index("run_id")
    assert final.loc["collapsed", "collapse_ratio"] == pytest.approx(0.9)  # SIGReg / EP(constant) at N = 64
    assert final.loc["good", "collapse_ratio"] == pytest.approx(6.0 / collapsed_ep(64))
    assert final["verdict"].to_dict() == {
        "collapsed": "collapsed",
        "good": "healthy",
        "fair": "healthy",
        "big-batch": "healthy",
        "dim": "dimensional collapse",
    }
    assert final.loc["good", "scale_group"] != final.loc["big-batch", "scale_group"]
    assert final.loc["good", "scale_group"].startswith("batch 64 · views 2+")


def test_select_never_picks_unhealthy_and_compares_losses_within_one_scale():
    a = analyse(hand_made_sweep(), n_boot=50)
    picks = a.selection.set_index("score")
    assert picks.loc["loss", "trial"] == "collapsed"  # the old score: lowest loss wins
    assert picks.loc["safe_loss", "trial"] == "good"  # healthy, and big-batch's loss is on another scale
    assert picks.loc["safe_loss_lam", "trial"] in ("good", "fair")
    assert picks.loc["rankme", "trial"] == "dim" and picks.loc["safe_rankme", "trial"] == "big-batch"  # scale-free
    unhealthy = {"collapsed", "dim"}
    assert not unhealthy & set(picks.loc[[k for k in picks.index if k.startswith("safe_")], "trial"])
    assert a.group.startswith("batch 64")
    assert dict(zip(a.excluded["trial"], a.excluded["verdict"])) == {
        "collapsed": "collapsed",
        "big-batch": "healthy",
        "dim": "dimensional collapse",
    }
    assert "another scale" in a.excluded.set_index("trial").loc["big-batch", "reason"]
    assert any("on 2 scales" in n for n in a.notes)
    text = terminal_table(a)
    assert "ruled out by the healthy-only scores (3 of 5 runs)" in text
    # ρ of a healthy-only score counts every run, the ruled-out ones tied last
    pooled = a.correlations[(a.correlations["group"] == "all")].set_index("score")
    assert pooled.loc["safe_loss", "n"] == 5
    comparison = health_comparison(a).set_index("score")
    assert comparison.loc["training loss", "regret"] == "16.00"
    assert comparison.loc["training loss", "regret (healthy only)"] == "0.00"


def test_pruning_replay_stops_runs_collapsed_for_patience_epochs():
    e = add_health(hand_made_sweep().epochs)
    e.loc[(e["run_id"] == "fair") & (e["epoch"] == 1), "verdict"] = "collapsed"  # recovers at epoch 2
    kept, runs = replay_pruning(e, patience=2)
    runs = runs.set_index("run_id")
    assert runs.loc["collapsed", "stopped_at"] == 2 and np.isnan(runs.loc["fair", "stopped_at"])
    kept1, runs1 = replay_pruning(e, patience=1)
    runs1 = runs1.set_index("run_id")
    assert runs1.loc["collapsed", "epochs_run"] == 1 and runs1.loc["fair", "epochs_run"] == 1
    assert len(kept1) == len(e) - 2 and not ((kept1["run_id"] == "fair") & (kept1["epoch"] == 2)).any()
