"""The sweep's overview on its parent run (sweeps/overview.py): description table, pick, figures.

Trials are built by hand (no Ray) and logged to a real SQLite MLflow store; the end-to-end check of
the same overview after a real sweep is in tests/test_sweep_run.py.
"""

from __future__ import annotations

import csv

import pytest
from mlflow import MlflowClient

from lejepa import record
from lejepa.checkpoint import checkpoint_name
from sweeps.layout import Sweep
from sweeps.outcome import SweepOutcome, TrialSummary
from sweeps.overview import NOTE_LIMIT, description, log_overview, pick, trials_table

from helpers import sweep_spec


def _trial(i: int, lam: float, arch: str, score: float | None, acc: float | None, status="finished", health="healthy"):
    return TrialSummary(
        trial_id=f"t_{i:05d}",
        status=status,
        params={"loss.lam": lam, "model.arch": arch},
        epoch=2,
        loss=score * lam**0.4 if score is not None else None,
        score=score,
        online_acc=None if acc is None else acc - 0.05,
        linear_acc=acc,
        run_id=None,
        health=health,
        arch=arch,
        lam=lam,
        init_acc=0.30,
    )


@pytest.fixture
def outcome(tmp_path):
    spec = sweep_spec(tmp_path, space={"loss.lam": [0.02, 0.2], "model.arch": ["test_resnet", "test_vit"]})
    uri = record.sqlite_uri(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    exp = client.create_experiment("overview")
    parent = client.create_run(exp, run_name="s").info.run_id
    sweep = Sweep("s", tmp_path / "sweeps" / "s", uri, "overview", parent)
    trials = [
        _trial(0, 0.02, "test_resnet", 3.0, 0.61, health="collapsed"),  # the lowest score, but not healthy: never the pick
        _trial(1, 0.2, "test_resnet", 5.0, 0.72),
        _trial(2, 0.02, "test_vit", 4.0, 0.55),  # the pick
        _trial(3, 0.2, "test_vit", None, None, status="failed", health=None),
    ]
    for t in trials[:3]:
        t.run_id = client.create_run(exp, run_name=t.trial_id, tags={record.PARENT_TAG: parent}).info.run_id
    (sweep.trials_dir / "t_00002" / record.CHECKPOINTS_DIR / checkpoint_name(2)).mkdir(parents=True)
    return SweepOutcome(sweep, spec, trials), client, exp


def test_the_pick_is_the_lowest_score_among_healthy_finished_trials(outcome):
    out, _, _ = outcome
    assert pick(out).trial_id == "t_00002"
    table = trials_table(out)
    assert list(table["trial"][:3]) == ["t_00000", "t_00002", "t_00001"]  # by score; the failed trial last
    assert table.set_index("trial")["pick"].to_dict() == {"t_00000": False, "t_00001": False, "t_00002": True, "t_00003": False}


def test_description_links_each_trial_bolds_the_pick_and_names_its_accuracy(outcome):
    out, _, exp = outcome
    text = description(out, exp)
    pick_run = out.trials[2].run_id
    assert (
        f"**Label-free pick** (lowest final `train/score` among healthy trials): [t_00002](#/experiments/{exp}/runs/{pick_run})"
        in text
    )
    assert str(out.sweep.trials_dir / "t_00002" / "checkpoints" / checkpoint_name(2)) in text
    assert "accuracy: frozen linear probe accuracy" in text and "| frozen acc % |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "trial" not in line]
    assert len(rows) == 4
    assert rows[0].startswith(
        f"| [t_00000](#/experiments/{exp}/runs/{out.trials[0].run_id}) | finished | collapsed | test_resnet | 0.02 |"
    )
    assert rows[0].endswith("| 61.0 |")
    assert rows[1].startswith("| **[t_00002]") and rows[1].endswith("| **55.0** |")  # the pick, in bold
    assert rows[3] == "| t_00003 | failed | - | test_vit | 0.2 | - | - | - |"  # no run: no link


def test_a_large_sweep_is_cut_to_mlflows_tag_limit_and_points_to_the_csv(outcome):
    out, _, exp = outcome
    out.trials = [_trial(i, 0.02 + i / 1000, "resnet18", 3.0 + i / 100, 0.5) for i in range(300)]
    for t in out.trials:
        t.run_id = "0123456789abcdef0123456789abcdef"
    text = description(out, exp)
    assert len(text) <= NOTE_LIMIT
    shown = sum(line.startswith("| ") for line in text.splitlines()) - 1
    assert 20 < shown < 300 and text.endswith(f"… {300 - shown} more trials in `overview/trials.csv`.")


def test_log_overview_writes_description_checkpoint_tag_table_and_figures(outcome, tmp_path):
    out, client, exp = outcome
    log_overview(client, out)
    run = client.get_run(out.sweep.parent_run_id)
    assert run.data.tags[record.NOTE_TAG] == description(out, exp)
    ckpt = out.sweep.trials_dir / "t_00002" / "checkpoints" / checkpoint_name(2)
    assert run.data.tags[record.best_checkpoint_tag(record.BEST_SCORE)] == str(ckpt)
    assert {a.path for a in client.list_artifacts(run.info.run_id, record.OVERVIEW_ARTIFACT)} == {
        "overview/trials.csv",
        "overview/lam_vs_accuracy.png",
        "overview/loss_vs_accuracy.png",
    }
    local = client.download_artifacts(run.info.run_id, "overview", str(tmp_path / "dl"))
    with open(f"{local}/trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["t_00000", "t_00002", "t_00001", "t_00003"]
    assert float(rows[1]["linear_probe_acc"]) == 0.55 and rows[1]["pick"] == "True"
    for name in ("lam_vs_accuracy.png", "loss_vs_accuracy.png"):
        assert (tmp_path / "dl" / "overview" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
