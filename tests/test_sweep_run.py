"""Sweeps end to end on a real local Ray (2 CPUs) and a real MLflow SQLite store.

One Ray instance serves the module; the interrupt/resume test drives the real CLI in a
subprocess that joins it with ``--address``.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from lejepa.checkpoint import list_checkpoints, load_checkpoint
from sweeps.runner import SWEEP_FILE, run_sweep
from sweeps.spec import load_spec
from sweeps.status import FINAL_METRIC

from helpers import SweepCLI, child_runs, spec_body, sweep_spec, trial_states, write_spec

pytestmark = pytest.mark.slow


def test_four_trial_sweep_results_and_mlflow_structure(tmp_path, ray_address):
    spec = sweep_spec(
        tmp_path,
        space={"loss.lam": [0.02, 0.2], "model.arch": ["test_resnet", "test_vit"]},
        arch_overrides=[{"pattern": "test_vit", "set": {"optim.lr": 1e-3}}],
        max_concurrent_trials=2,
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(spec, storage=tmp_path / "sweeps", name="four", tracking_uri=uri)

    path = tmp_path / "sweeps" / "four"
    assert outcome.sweep.path == path and (path / SWEEP_FILE).is_file()
    assert [t.status for t in outcome.trials] == ["finished"] * 4 and not outcome.interrupted
    trials = trial_states(path)
    assert len(trials) == 4 and {t.status for t in trials.values()} == {"TERMINATED"}
    assert {(t.config["loss.lam"], t.config["model.arch"]) for t in trials.values()} == {
        (lam, arch) for lam in (0.02, 0.2) for arch in ("test_resnet", "test_vit")
    }
    for t in trials.values():
        r = t.last_result
        assert r["epoch"] == 1 and r["train/score"] == pytest.approx(r["epoch/loss"] / t.config["loss.lam"] ** 0.4)
        assert 0.0 <= r["eval/linear_probe_acc"] <= 1.0 and 0.0 <= r["probe/online_test_acc"] <= 1.0
        assert t.run_metadata.checkpoint_manager.latest_checkpoint_result is not None
        assert [p.name for p in list_checkpoints(path / "trials" / t.trial_id / "checkpoints")] == ["epoch_0001"]

    client = MlflowClient(uri)
    parent = client.get_run(outcome.sweep.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "four"
    assert parent.data.tags["lejepa.kind"] == "sweep" and parent.data.tags["lejepa.sweep"] == "four"
    assert parent.data.metrics["trials/finished"] == 4
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "spec")} == {"spec/spec.yaml", "spec/resolved_spec.yaml"}
    children = child_runs(uri, parent.info.run_id)
    assert sorted(c.data.tags["lejepa.trial_id"] for c in children) == sorted(trials)
    for child in children:
        t = trials[child.data.tags["lejepa.trial_id"]]
        assert child.info.status == "FINISHED"
        assert child.data.tags["lejepa.kind"] == "trial" and child.data.tags["lejepa.sweep"] == "four"
        assert child.info.run_name == f"{t.trial_id} λ={t.config['loss.lam']:g} {t.config['model.arch']}"
        assert child.data.params["loss.lam"] == str(t.config["loss.lam"])
        assert child.data.params["model.arch"] == t.config["model.arch"]
        assert float(child.data.params["optim.lr"]) == (
            1e-3 if t.config["model.arch"] == "test_vit" else spec.base_config.optim.lr
        )  # arch_overrides
        assert child.data.params["train.threads"] == "1"  # the trial's CPUs
        assert child.data.tags["lejepa.run_dir"] == str(path / "trials" / t.trial_id)
        assert child.data.metrics["train/score"] == pytest.approx(t.last_result["train/score"])
        assert child.data.metrics["eval/linear_probe_acc"] == pytest.approx(t.last_result["eval/linear_probe_acc"])
        assert child.data.metrics["hparam/lam"] == t.config["loss.lam"]  # numeric: filterable and chartable
    note = parent.data.tags["mlflow.note.content"]  # the overview (sweeps/overview.py), written when the sweep settled
    best = outcome.best("score", "min", healthy_only=True)  # 1-epoch tiny runs may all still be collapsed
    healthy = [t for t in trials.values() if t.last_result["health/verdict"] == 0]
    if healthy:
        assert best.score == min(t.last_result["train/score"] for t in healthy) and best.health == "healthy"
        assert parent.data.tags["lejepa.best_train_score_run"] == best.run_id
        assert parent.data.tags["lejepa.best_train_score_checkpoint"] == str(
            path / "trials" / best.trial_id / "checkpoints" / "epoch_0001"
        )
        assert f"**Label-free pick** (lowest final `train/score` among healthy trials): [{best.trial_id}]" in note
    else:
        assert best is None and "lejepa.best_train_score_run" not in parent.data.tags
    assert all(
        f"[{c.data.tags['lejepa.trial_id']}](#/experiments/{parent.info.experiment_id}/runs/{c.info.run_id})" in note
        for c in children
    )
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "overview")} == {
        "overview/trials.csv",
        "overview/lam_vs_accuracy.png",
        "overview/loss_vs_accuracy.png",
    }
    assert "lejepa ui --tracking-uri" in outcome.render()


def test_two_worker_ddp_trial(tmp_path, ray_address):
    spec = sweep_spec(tmp_path, resources={"cpus_per_trial": 0.5, "workers_per_trial": 2})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(spec, storage=tmp_path / "sweeps", name="ddp", tracking_uri=uri)

    (trial,) = outcome.trials
    assert trial.status == "finished" and trial.linear_acc is not None
    (state,) = trial_states(tmp_path / "sweeps" / "ddp").values()
    assert state.run_metadata.checkpoint_manager.latest_checkpoint_result is not None
    ckpt = tmp_path / "sweeps" / "ddp" / "trials" / state.trial_id / "checkpoints" / "epoch_0001"
    saved, meta = load_checkpoint(ckpt)
    views_rng = saved["rng"]["views"]
    assert len(views_rng) == 2 and not torch.equal(views_rng[0], views_rng[1])  # two ranks trained
    (run,) = child_runs(uri, outcome.sweep.parent_run_id)
    assert run.info.status == "FINISHED" and run.data.params["optim.batch_size"] == "64"
    # logged once per epoch (rank 0 only), at the global step: 64 images per step over both ranks
    assert [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "epoch")] == [meta["step"]]


def test_interrupt_and_resume_runs_each_trial_once(tmp_path, ray_address):
    """SIGTERM to the driver (a scheduler's preemption; re-raised as SIGINT, Ctrl-C's signal, also
    after Ray's driver installed its own handler) stops the sweep cleanly; --resume runs only what
    had not finished."""
    spec_path = write_spec(tmp_path, spec_body(space={"loss.lam": [0.02, 0.1, 0.3]}, max_concurrent_trials=2))
    cli = SweepCLI(tmp_path, ray_address)
    uri, storage = cli.uri, cli.storage
    first = cli.start(spec_path, "r1", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and first.poll() is None:
            # once the driver has logged a trial's final report (its run closed FINISHED just before it):
            # a trial whose run finished but whose final report Tune had not yet seen is rerun on --resume
            if _final_reported(storage / "r1"):
                break
            time.sleep(1.0)
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 130, err[-3000:]
    assert "interrupted: continue with  lejepa sweep --resume r1" in out
    parent = _parent(uri)
    assert parent.info.status == "KILLED"
    done_before = {
        r.data.tags["lejepa.trial_id"]: r.info.run_id for r in child_runs(uri, parent.info.run_id) if r.info.status == "FINISHED"
    }
    assert 1 <= len(done_before) < 3
    results_before = {t: _result_lines(storage / "r1", t) for t in done_before}

    second = cli.resume("r1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 trials (3 finished)" in second.stdout

    client = MlflowClient(uri)
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and "lejepa.resumed_at" in parent.data.tags
    assert len(client.search_runs([parent.info.experiment_id], "tags.`lejepa.kind` = 'sweep'")) == 1
    children = child_runs(uri, parent.info.run_id)
    assert len(children) == 3 and len({c.data.tags["lejepa.trial_id"] for c in children}) == 3
    assert {c.info.status for c in children} == {"FINISHED"}
    for trial_id, run_id in done_before.items():
        # finished trials were not rerun: same run, one epoch logged, no new Tune results
        assert [m.value for m in client.get_metric_history(run_id, "epoch")] == [1.0]
        assert _result_lines(storage / "r1", trial_id) == results_before[trial_id]


def test_a_sweep_stopped_before_its_first_trial_starts_over_on_resume(tmp_path, ray_address):
    """A Ctrl-C in a sweep's first seconds leaves its folder and parent run but no Ray Tune state.
    A new sweep of that name is refused with "--resume", and --resume starts it over in place (it
    used to say there was nothing to resume: two messages contradicting each other)."""
    import yaml

    from sweeps.runner import RESOLVED_SPEC, Sweep, _create_parent

    spec_path = write_spec(tmp_path, spec_body(space={"loss.lam": [0.05, 0.1]}, max_concurrent_trials=2))
    cli = SweepCLI(tmp_path, ray_address)
    spec = load_spec(spec_path)
    path = cli.storage / "early"
    path.mkdir(parents=True)  # what run_sweep has made when the first trial has not started yet
    (path / RESOLVED_SPEC).write_text(yaml.safe_dump(spec.resolved(), sort_keys=False))
    Sweep("early", path, cli.uri, spec.tracking.experiment, _create_parent(spec, "early", path, cli.uri)).save()

    again = cli.start(spec_path, "early", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = again.communicate(timeout=300)
    assert again.returncode != 0 and "continue it with --resume early" in err

    resumed = cli.resume("early")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "starting it again" in resumed.stdout and "2 trials (2 finished)" in resumed.stdout
    parent = _parent(cli.uri)
    assert parent.info.status == "FINISHED" and "lejepa.restarted_at" in parent.data.tags
    assert sorted(r.info.status for r in child_runs(cli.uri, parent.info.run_id)) == ["FINISHED", "FINISHED"]


def _parent(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lejepa-sweeps")
    runs = client.search_runs([exp.experiment_id], "tags.`lejepa.kind` = 'sweep'") if exp else []
    return runs[0] if runs else None


def _final_reported(experiment: Path) -> bool:
    """Whether Tune's driver has logged some trial's final report (the one with the final evaluation)."""
    return any(
        FINAL_METRIC in line for path in experiment.glob("run_trial_*/result.json") for line in path.read_text().splitlines()
    )


def _result_lines(experiment: Path, trial_id: str) -> int:
    (folder,) = [p for p in experiment.iterdir() if p.name.startswith(f"run_trial_{trial_id}_")]
    return len((folder / "result.json").read_text().splitlines())


def test_optuna_search_with_asha_on_the_label_free_score(tmp_path, ray_address):
    spec = sweep_spec(
        tmp_path,
        epochs=2,
        space={"loss.lam": {"loguniform": [0.01, 0.5]}},
        num_samples=4,
        search={"algo": "optuna", "seed": 0},
        scheduler={"type": "asha", "metric": "train/score", "grace_period": 1, "reduction_factor": 2},
        max_concurrent_trials=2,
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(spec, storage=tmp_path / "sweeps", name="tpe", tracking_uri=uri)

    assert len(outcome.trials) == 4 and outcome.count("finished") + outcome.count("pruned") == 4
    lams = [t.params["loss.lam"] for t in outcome.trials]
    assert len(set(lams)) == 4 and all(0.01 <= lam <= 0.5 for lam in lams)  # sampled by TPE, in range
    runs = {r.data.tags["lejepa.trial_id"]: r for r in child_runs(uri, outcome.sweep.parent_run_id)}
    for trial in outcome.trials:
        run = runs[trial.trial_id]
        assert run.info.status == "FINISHED" and run.data.metrics["train/score"] == pytest.approx(trial.score)
        if trial.status == "pruned":  # stopped by ASHA at the grace period: no final evaluation
            assert trial.epoch == 1 and trial.linear_acc is None
            assert run.data.tags["lejepa.status"] == "pruned" and run.data.tags["lejepa.pruned_at_epoch"] == "1"
        else:
            assert trial.epoch == 2 and "lejepa.status" not in run.data.tags


def test_label_free_pruning_stops_a_collapsed_trial(tmp_path, ray_address):
    """prune_collapsed: 2 — the λ = 0 trial stops after 2 collapsed epochs (status collapsed, never
    retried, counted apart); the healthy λ = 0.5 trial runs its 3 epochs."""
    spec = sweep_spec(
        tmp_path, epochs=3, space={"loss.lam": [0.0, 0.5]}, score_alpha=0, prune_collapsed=2, max_concurrent_trials=2
    )
    assert spec.base["train"]["collapse_patience"] == 2
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(spec, storage=tmp_path / "sweeps", name="prune", tracking_uri=uri)
    by_lam = {t.params["loss.lam"]: t for t in outcome.trials}
    assert by_lam[0.0].status == "collapsed" and by_lam[0.0].epoch == 2 and by_lam[0.0].health == "collapsed"
    assert by_lam[0.5].status == "finished" and by_lam[0.5].epoch == 3 and by_lam[0.5].health == "healthy"
    trials = trial_states(tmp_path / "sweeps" / "prune")
    assert all(t.num_failures == 0 for t in trials.values())
    client = MlflowClient(uri)
    parent = client.get_run(outcome.sweep.parent_run_id)
    assert parent.data.metrics["trials/collapsed"] == 1 and parent.data.metrics["trials/finished"] == 1
    runs = {c.data.params["loss.lam"]: c for c in child_runs(uri, parent.info.run_id)}
    assert runs["0.0"].info.status == "FINISHED" and runs["0.0"].data.tags["lejepa.status"] == "collapsed"
    assert runs["0.5"].data.tags["lejepa.health"] == "healthy" and "lejepa.status" not in runs["0.5"].data.tags
    summary = outcome.render()
    assert "1 finished, 1 collapsed" in summary and "health" in summary
