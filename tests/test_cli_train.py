"""End-to-end `lejepa train` through the real CLI and a real MLflow SQLite store."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from helpers import LEJEPA, REPO, free_port, run_cli


@pytest.mark.slow
def test_train_logs_a_complete_mlflow_run(tmp_path, tiny_overrides):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    proc = run_cli(["train", *tiny_overrides, "train.epochs=2", "train.run_name=e2e", "--tracking-uri", uri], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 2/2" in proc.stderr and "final:" in proc.stderr
    assert "warning" not in proc.stderr  # λ 0.05 × batch 64 is outside the collapse region
    assert "collapse " in proc.stderr and "rank " in proc.stderr  # the health columns of the progress line

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lejepa")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    assert run.data.params["loss.lam"] == "0.05" and run.data.params["model.arch"] == "test_resnet"
    assert run.data.tags["arch"] == "test_resnet" and run.data.tags["dataset"] == "digits-shifted"
    assert "family" in run.data.tags
    for key in ("eval/linear_probe_acc", "eval/knn_acc", "probe/online_test_acc", "epoch/images_per_sec"):
        assert 0.0 <= run.data.metrics[key] <= (1.0 if "acc" in key else 1e9)
    for key in ("health/collapse_ratio", "health/proj_rank", "health/proj_std_spread", "health/feature_rank", "health/verdict"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    assert run.data.tags["lejepa.health"] in ("healthy", "dimensional collapse", "collapsed")
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert loss_steps == sorted(set(loss_steps)) and loss_steps[0] == 2 and len(loss_steps) >= 4
    assert len(client.get_metric_history(run.info.run_id, "probe/online_test_acc")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoint"} <= artifacts
    checkpoint = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert checkpoint == {"checkpoint/meta.json", "checkpoint/state.pt"}
    # artifacts live beside the store, not in the working directory
    assert (tmp_path / "store" / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_resume_continues_the_same_mlflow_run(tmp_path, tiny_overrides):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["train", *tiny_overrides, "train.epochs=1", "train.run_name=r", "--tracking-uri", uri], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "r"
    proc = run_cli(["train", "train.epochs=2", "--resume", str(run_dir), "--tracking-uri", uri], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at epoch 1" in proc.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lejepa").experiment_id])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "epoch")] == [1.0, 2.0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["loss.lam=2"], "loss.lam=2 is invalid"),
        (["loss.lamda=0.1"], "did you mean 'loss.lam'"),
        (["data.name=fashion_mnist"], "did you mean 'fashion-mnist'"),
        (["data.name=mnist"], "MNIST needs data.root"),
        (["model.arch=resnet_18"], "resnet18"),
        (["a.yaml", "b.yaml"], "several files"),
        (["missing.yaml"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, fragment):
    proc = run_cli(["train", *args, f"train.out_dir={tmp_path / 'runs'}"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("*.db"))


def _train_in_a_fresh_process(args: list[str], modules: tuple[str, ...]) -> subprocess.CompletedProcess:
    """``lejepa train ARGS`` in a new Python; its stdout is the exit code and which of ``modules`` it imported."""
    probe = f"import sys; from lejepa.cli import main; rc = main({['train', *args]!r}); "
    probe += f"print(rc, sorted(m for m in {modules!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_an_unreachable_tracking_server_is_refused_before_torch_loads(tmp_path):
    """The refusals that need no model (run folder, tracking store) come before torch and timm are
    imported, which takes seconds: the error line is immediate."""
    args = ["--tracking-uri", f"http://127.0.0.1:{free_port()}", f"train.out_dir={tmp_path / 'runs'}"]
    done = _train_in_a_fresh_process(args, ("torch", "timm", "mlflow"))
    assert done.stdout.split() == ["2", "[]"], done.stdout + done.stderr
    assert done.stderr.startswith("error: MLflow tracking server") and "does not answer" in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override, fragment",
    [("model.arch=resnet10t", "MNIST needs data.root"), ("model.arch=test_resnet", "MNIST needs data.root")],
)
def test_a_missing_dataset_is_refused_before_timm_torchvision_and_sklearn_load(tmp_path, override, fragment):
    """The architecture is checked against timm's registry snapshot and the dataset's files before
    the trainer's imports (timm, torchvision, scikit-learn: about 5 CPU-seconds)."""
    args = ["--no-tracking", override, "data.name=mnist", f"train.out_dir={tmp_path / 'runs'}"]
    done = _train_in_a_fresh_process(args, ("timm", "torchvision", "sklearn"))
    assert done.stdout.split() == ["2", "[]"], done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and fragment in done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_broken_plugin_leaves_the_other_commands_working(monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    import lejepa.cli as cli

    installed = list(cli.entry_points(group="lejepa.commands"))
    broken = EntryPoint("broken", "lejepa_missing_plugin_module:register", "lejepa.commands")
    monkeypatch.setattr(cli, "entry_points", lambda group: [*installed, broken])

    assert cli.main(["archs", "--family", "vit", "--max-params", "10M"]) == 0  # core command runs
    assert "vit_" in capsys.readouterr().out
    assert cli.main(["broken", "--anything"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the 'broken' command is unavailable" in err[0] and "ModuleNotFoundError" in err[0]


def test_output_into_a_pipe_whose_reader_has_gone_ends_quietly(tmp_path):
    """`lejepa archs | head -0`: the reader closed its end before the command wrote, so the write
    fails with EPIPE. The command stops with 141 (128 + SIGPIPE), as a shell reports a closed
    pipe, and prints no traceback and no "Exception ignored" from the interpreter's exit."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [*LEJEPA, "archs"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == ""


@pytest.mark.slow
def test_train_warns_once_in_the_collapse_region(tmp_path, tiny_overrides):
    proc = run_cli(
        ["train", *tiny_overrides, "loss.lam=0.005", "train.max_steps=2", "train.eval_probe_epochs=1", "--no-tracking"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "lejepa: warning: λ=0.005 × batch 64 = 0.32 lies in the collapse region λ·N < 1 "
        "(benchmarks/results/collapse_map): raise loss.lam to ≥ 0.016 or the batch size"
    ]


def test_sigterm_stops_a_command_started_with_sigint_ignored():
    """A script's background job (``lejepa train … &``, ``nohup``) starts with SIGINT ignored; a
    scheduler's SIGTERM must still stop it as Ctrl-C would, not be passed on to an ignored SIGINT."""
    import signal

    probe = (
        "import os, signal, time\n"
        "from lejepa.cli import _stop_on_sigterm_as_on_sigint\n"
        "assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN\n"
        "_stop_on_sigterm_as_on_sigint()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(10)\n"
        "    print('not stopped')\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped as by Ctrl-C')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip() == "stopped as by Ctrl-C", proc.stdout + proc.stderr


@pytest.mark.slow
def test_sigterm_stops_training_like_ctrl_c_and_resume_continues(tmp_path):
    """SIGTERM (a scheduler's preemption) during an epoch: exit 130 with one line, the MLflow run
    KILLED, the last checkpoint intact; --resume finishes with every epoch logged once."""
    import json
    import random
    import signal
    import time

    from helpers import LEJEPA, REPO, TINY

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    args = ["train", *TINY, f"train.out_dir={tmp_path}", "train.run_name=pre", "train.epochs=30"]
    proc = subprocess.Popen(LEJEPA + args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        checkpoints = tmp_path / "pre" / "checkpoints"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and len(list(checkpoints.glob("epoch_*"))) < 2:
            time.sleep(0.2)
        time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))  # a random point of the next epoch (or its checkpoint write)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lejepa").experiment_id])
    assert run.info.status == "KILLED"
    done = len(list(checkpoints.glob("epoch_*")))
    assert 2 <= done < 30

    target = max(4, done + 1)
    resumed = subprocess.run(
        LEJEPA + ["train", "--resume", str(tmp_path / "pre"), f"train.epochs={target}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "epoch/loss")]
    assert epochs == sorted(set(epochs)) and len(epochs) == target
    steps = json.loads((sorted(checkpoints.glob("epoch_*"))[-1] / "meta.json").read_text())["step"]
    logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert logged == list(range(2, steps + 1, 2))  # train.log_every=2: no gap, no step twice
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")] == []  # no half-written checkpoint


def test_resume_from_one_checkpoint_folder_continues_its_run(tmp_path):
    """--resume <run>/checkpoints/epoch_NNNN continues that run from that checkpoint (its folder and
    config), instead of starting a new run inside the checkpoint folder."""
    from helpers import TINY

    first = run_cli(
        ["train", "--no-tracking", *TINY, f"train.out_dir={tmp_path}", "train.run_name=a", "train.epochs=1"], tmp_path
    )
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoint = tmp_path / "a" / "checkpoints" / "epoch_0001"
    again = run_cli(["train", "--no-tracking", "--resume", str(checkpoint), "train.epochs=2"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming run {tmp_path / 'a'} from its checkpoint epoch_0001" in again.stderr
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]
    assert [p.name for p in checkpoint.iterdir() if p.is_dir()] == []  # nothing written inside the checkpoint
