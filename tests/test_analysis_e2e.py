"""Selection on a real small sweep: real Trainer runs logged by MLflowCallback as children of a
sweep parent run in a real SQLite store (the sweep layer's schema), then the loader, the
per-checkpoint criteria, `lejepa select` as a subprocess, and the notebook."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from analysis.criteria import evaluate_checkpoints
from analysis.loader import load_sweep
from lejepa.callbacks import Callback
from lejepa.cli import main as lejepa_main
from lejepa.config import load_config
from lejepa.errors import LejepaError
from lejepa.record import CRITERIA_CACHE
from lejepa.tracking import MLflowCallback
from lejepa.trainer import Trainer, TrainingDiverged

from helpers import LEJEPA, REPO, TINY, run_cli

pytestmark = pytest.mark.slow

SWEEP = "e2e-sweep"
UNLABELED = "e2e-unlabeled"
ARCHS = ("test_efficientnet", "test_resnet")
LAMS = (0.02, 0.1, 0.4)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # as the runs (train.threads=1): 2 threads on a busy 2-core box thrash
FAST = [*TINY, "train.epochs=3", "train.keep_checkpoints=3", "data.test_fraction=0.6", "model.small_stem=false"]
"""3 epochs: at 2, most tiny runs are still shrunk (collapse ratio ≈ 0.4) and flagged unhealthy."""


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_selection", REPO / "benchmarks" / "selection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LabelFree(MLflowCallback):
    """Logs like the sweep layer but drops every probe metric: a sweep on data without labels."""

    def on_epoch_end(self, epoch, step, metrics):
        super().on_epoch_end(epoch, step, {k: v for k, v in metrics.items() if "acc" not in k})

    def on_train_end(self, metrics, checkpoint):
        super().on_train_end({}, checkpoint)


class Poison(Callback):
    """Turns the weights to NaN at step 3, as an exploding update would."""

    def __init__(self):
        self.trainer = None

    def on_step_end(self, step, metrics):
        if step == 3:
            with torch.no_grad():
                for p in self.trainer.model.parameters():
                    p.fill_(float("nan"))


@pytest.fixture(scope="session")
def sweep(tmp_path_factory):
    """Six trained runs (2 archs × 3 λ, 3 epochs) plus one diverged trial under one sweep parent,
    and a two-run sweep with no probe metrics, in one SQLite store."""
    root = tmp_path_factory.mktemp("selection")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    bench = _benchmark()
    trials = [[*FAST, f"model.arch={a}", f"loss.lam={lam}"] for a in ARCHS for lam in LAMS]
    parent = bench.train_sweep(SWEEP, trials, uri, root / "runs", experiment="e2e", log=lambda m: None)

    poison = Poison()
    cfg = load_config(None, [*FAST, "model.arch=test_efficientnet", f"train.out_dir={root}", "train.log_every=1"])
    tracker = MLflowCallback(
        uri,
        "e2e",
        run_name="diverged",
        parent_run_id=parent,
        tags={"lejepa.kind": "trial", "lejepa.sweep": SWEEP, "lejepa.trial_id": "nan"},
    )
    poison.trainer = Trainer(cfg, [tracker, poison], run_dir=root / "runs" / "diverged")
    with pytest.raises(TrainingDiverged):
        poison.trainer.fit()

    label_free = [[*FAST, "model.arch=test_efficientnet", f"loss.lam={lam}"] for lam in (0.1, 0.4)]
    unlabeled = bench.train_sweep(
        UNLABELED, label_free, uri, root / "runs", experiment="e2e-unlabeled", callback=LabelFree, log=lambda m: None
    )
    return SimpleNamespace(root=root, uri=uri, parent=parent, unlabeled=unlabeled, client=MlflowClient(uri))


def _children(s, parent: str):
    return [
        r
        for r in s.client.search_runs(
            [e.experiment_id for e in s.client.search_experiments()], f"tags.mlflow.parentRunId = '{parent}'"
        )
    ]


def test_loader_one_row_per_trial_and_epoch(sweep):
    s = load_sweep(SWEEP, sweep.uri)
    assert s.parent_run_id == sweep.parent and len(s.epochs) == 18 and len(s.runs) == 6
    assert len(s.notes) == 1 and "diverged at step" in s.notes[0]
    assert sorted(s.runs["lam"]) == sorted(LAMS * 2) and set(s.runs["arch"]) == set(ARCHS)
    assert set(s.epochs["epoch"]) == {1, 2, 3} and s.epochs["params.model.arch"].notna().all()
    for col in ("loss", "invariance", "sigreg", "online_acc", "images_per_sec"):
        assert s.epochs[col].notna().all(), col
    assert all(Path(p).is_dir() for p in s.epochs["checkpoint"])
    assert s.epochs.loc[s.epochs["is_final"], "linear_probe_acc"].notna().all()
    assert s.epochs.loc[~s.epochs["is_final"], "linear_probe_acc"].isna().all()
    assert s.runs["checkpoint_uri"].tolist() == [f"runs:/{r}/checkpoint" for r in s.runs["run_id"]]
    for run in _children(sweep, sweep.parent):
        if run.data.tags.get("lejepa.status") == "diverged":
            continue
        row = s.runs.set_index("run_id").loc[run.info.run_id]
        assert row["linear_probe_acc"] == run.data.metrics["eval/linear_probe_acc"]
        history = {m.step: m.value for m in sweep.client.get_metric_history(run.info.run_id, "epoch/loss")}
        assert row["loss"] == history[max(history)] and row["step"] == max(history)
    by_id = load_sweep(sweep.parent, sweep.uri)
    by_experiment = load_sweep("e2e", sweep.uri)
    assert by_id.epochs["run_id"].tolist() == s.epochs["run_id"].tolist()
    assert sorted(by_experiment.runs["run_id"]) == sorted(s.runs["run_id"]) and by_experiment.parent_run_id is None
    by_prefix = load_sweep("e2e-sw", sweep.uri)
    assert by_prefix.name == SWEEP and by_prefix.parent_run_id == sweep.parent and "starts so" in by_prefix.notes[0]
    with pytest.raises(LejepaError, match="did you mean 'e2e-sweep'"):
        load_sweep("e2e-swep", sweep.uri)


def test_checkpoint_criteria_rebuild_the_trained_backbone(sweep):
    runs = load_sweep(SWEEP, sweep.uri).runs
    crit = evaluate_checkpoints(runs["checkpoint"], sample_size=256, lidar_images=32, lidar_views=4)
    merged = runs.merge(crit, on="checkpoint")
    assert len(merged) == 6
    # the frozen probe on the reloaded backbone reproduces the one the trainer logged
    assert np.abs(merged["probe_acc"] - merged["linear_probe_acc"]).max() <= 0.002
    assert ((merged["rankme"] > 1) & (merged["rankme"] <= 256)).all()
    assert ((merged["lidar"] > 1) & (merged["alpha_req"] > 0)).all()
    assert (merged["score.alpha_req"] == -np.abs(merged["alpha_req"] - 1)).all()
    assert (merged[["time.rankme", "time.lidar", "time.alpha_req", "time.probe"]] > 0).all().all()


def _expected_pick(s) -> tuple[str, int]:
    """argmin over healthy (run, epoch) of epoch/loss (the default score), straight from MLflow (the
    epoch's logged health/verdict is 0 = healthy); also asserts that an unhealthy epoch exists and
    that it would have won, so the health filter is what decides the test."""
    best = unfiltered = (math.inf, "", 0)
    for run in _children(s, s.parent):
        if run.info.status != "FINISHED":
            continue
        epochs = {m.step: int(m.value) for m in s.client.get_metric_history(run.info.run_id, "epoch")}
        verdicts = {m.step: m.value for m in s.client.get_metric_history(run.info.run_id, "health/verdict")}
        for m in s.client.get_metric_history(run.info.run_id, "epoch/loss"):
            unfiltered = min(unfiltered, (m.value, run.info.run_id, epochs[m.step]))
            if verdicts[m.step] == 0:
                best = min(best, (m.value, run.info.run_id, epochs[m.step]))
    assert best[1] and unfiltered[1:] != best[1:]
    return best[1], best[2]


def test_select_cli_reports_logs_and_registers(sweep, tmp_path):
    out = tmp_path / "report"
    proc = run_cli(
        [
            "select",
            SWEEP,
            "--tracking-uri",
            sweep.uri,
            "--out",
            str(out),
            "--register",
            "lejepa-e2e",
            "--criteria",
            "--sample-size",
            "128",
            "--lidar-images",
            "16",
            "--bootstrap",
            "100",
        ],
        tmp_path,
        env=ONE_THREAD,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cache = (out / CRITERIA_CACHE).resolve()
    computed = len(cache.read_text().splitlines()) - 1  # one row a checkpoint, under the header
    assert computed >= 6 and f"criteria: {computed} checkpoints, 0 cached in {cache}, {computed} to compute" in proc.stderr
    progress = re.findall(r"^criteria \[(\d+)/(\d+)\] \S+/epoch_\d{4}: [\d.]+ s ", proc.stderr, re.M)
    assert progress == [(str(i), str(computed)) for i in range(1, computed + 1)], proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    checkpoint = lines[-1].removeprefix("checkpoint: ")
    run_id, epoch = _expected_pick(sweep)
    assert Path(checkpoint).is_dir() and checkpoint.endswith(f"epoch_{epoch:04d}")
    assert str(sweep.client.get_run(run_id).data.tags["lejepa.run_dir"]) in checkpoint
    for label in ("training loss", "loss/λ^0.4", "loss/λ^α̂ (out of fold)", "RankMe", "LiDAR", "α-ReQ"):
        assert label in proc.stdout, label
    assert "oracle:" in proc.stdout and "registered: models:/lejepa-e2e/1" in proc.stdout

    report = (out / "report.md").read_text()
    for section in (
        "## Selection",
        "## Correlation with accuracy",
        "## C(α)",
        "## Per architecture",
        "## Cost per checkpoint",
        "leave-one-arch-out",
        "diverged at step",
    ):
        assert section in report, section
    pngs = {"loss_vs_accuracy.png", "alpha_curve.png", "arch_correlations.png"}
    assert all((out / p).stat().st_size > 5000 for p in pngs)
    assert "**The pick was made by training loss, healthy only** (row marked ◀ chosen)." in report
    assert (out / "report.html").read_text().count('src="data:image/png;base64,') == len(pngs)  # renders in MLflow

    parent = sweep.client.get_run(sweep.parent)
    artifacts = {a.path for a in sweep.client.list_artifacts(sweep.parent, "selection")}
    assert {f"selection/{f}" for f in pngs | {"report.md", "report.html", "selection.csv", "correlations.csv"}} <= artifacts
    assert parent.data.tags["lejepa.selected.checkpoint"] == checkpoint
    assert parent.data.tags["lejepa.selected.run_id"] == run_id

    version = sweep.client.get_model_version("lejepa-e2e", "1")
    assert version.run_id == run_id and version.tags["lejepa.epoch"] == str(epoch)
    local = sweep.client.download_artifacts(run_id, version.source.split(f"runs:/{run_id}/")[1], str(tmp_path / "dl"))
    assert (Path(local) / "state.pt").is_file()
    assert (Path(local) / "meta.json").read_text() == (Path(checkpoint) / "meta.json").read_text()


def _default_ctrl_c() -> None:
    """A shell's background job (``nohup make test &``) ignores SIGINT and its children inherit that:
    restore the default so the CLI sees Ctrl-C as it would in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_select_criteria_interrupted_keeps_what_it_computed(sweep, tmp_path):
    """Ctrl-C once a checkpoint is done: exit 130, one line saying what the cache keeps, no traceback."""
    out = tmp_path / "r"
    args = ["select", SWEEP, "--tracking-uri", sweep.uri, "--out", str(out), "--criteria", "--no-log"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | ONE_THREAD | {"PYTHONPATH": str(REPO)}
    small = ["--sample-size", "32", "--lidar-images", "4", "--bootstrap", "0"]
    proc = subprocess.Popen(
        LEJEPA + args + small, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=_default_ctrl_c
    )
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("criteria [1/"):
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    err = "".join(seen) + rest
    cache = (out / CRITERIA_CACHE).resolve()
    kept = len(cache.read_text().splitlines()) - 1
    total = int(re.search(r"^criteria: (\d+) checkpoints", err, re.M)[1])
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert 1 <= kept < total and err.strip().splitlines()[-1] == (
        f"interrupted: {kept} of {total} checkpoints' criteria kept in {cache}; rerun the same command to resume"
    )
    assert not (out / "report.md").exists()


def test_select_without_labels_still_picks(sweep, tmp_path):
    proc = run_cli(
        ["select", UNLABELED, "--tracking-uri", sweep.uri, "--out", str(tmp_path / "r"), "--bootstrap", "10"],
        tmp_path,
        env=ONE_THREAD,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the evidence (correlation with accuracy, regret) needs labels" in proc.stdout
    checkpoint = proc.stdout.strip().splitlines()[-1].removeprefix("checkpoint: ")
    assert Path(checkpoint).is_dir() and (tmp_path / "r" / "report.md").is_file()
    assert not (tmp_path / "r" / "correlations.csv").exists()
    assert {a.path for a in sweep.client.list_artifacts(sweep.unlabeled, "selection")} >= {"selection/report.md"}


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["nope"], "no sweep, parent run or experiment named 'nope'"),
        ([SWEEP, "--score", "rankm"], "did you mean 'rankme'"),
        ([SWEEP, "--score", "lidar"], "needs --criteria"),
        ([UNLABELED, "--score", "loss_lam_fit"], "needs probe accuracy"),
    ],
)
def test_select_user_errors_are_one_line(sweep, tmp_path, capsys, args, fragment):
    code = lejepa_main(
        ["select", *args, "--tracking-uri", sweep.uri, "--out", str(tmp_path / "r"), "--no-log", "--bootstrap", "0"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_select_refuses_a_missing_store(tmp_path, capsys):
    assert lejepa_main(["select", SWEEP, "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "no MLflow store" in capsys.readouterr().err and not (tmp_path / "none.db").exists()


def test_notebook_runs_on_the_sweep(sweep, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LEJEPA_SWEEP", SWEEP)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep.uri)
    monkeypatch.setenv("LEJEPA_CRITERIA_SAMPLE", "64")
    monkeypatch.setenv("LEJEPA_NOTEBOOK_OUT", str(tmp_path / "nb"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(REPO / "notebooks" / "model_selection.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "leave-one-arch-out" in text and "checkpoint: " in text
    assert (tmp_path / "nb" / "report.md").is_file() and (tmp_path / "nb" / "alpha_curve.png").is_file()
