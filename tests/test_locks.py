"""One writer per run folder and per sweep name (lejepa.locks): a second `lejepa train --resume`
of a live run and a second `lejepa sweep` of the same name are refused in one line; the lock
goes with its process, however it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import yaml

from lejepa.locks import ProcessLock

from helpers import LEJEPA, REPO, TINY, run_cli, tiny_base


def test_a_held_lock_is_refused_and_released_with_its_holder(tmp_path):
    from lejepa.errors import ConfigError

    with ProcessLock(tmp_path / "x.lock", "thing"):
        with pytest.raises(ConfigError, match=f"thing is in use by another process \\(pid {os.getpid()}\\)"):
            ProcessLock(tmp_path / "x.lock", "thing").acquire()
    ProcessLock(tmp_path / "x.lock", "thing").acquire().release()  # free again
    with ProcessLock(tmp_path / "y.lock", "other", remove=True):
        assert (tmp_path / "y.lock").is_file()
    assert not (tmp_path / "y.lock").exists()


@pytest.mark.slow
def test_resume_of_a_run_that_is_still_training_is_refused_until_its_process_dies(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    live = subprocess.Popen(
        LEJEPA + ["train", *TINY, f"train.out_dir={tmp_path}", "train.run_name=live", "train.epochs=40"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list((tmp_path / "live" / "checkpoints").glob("epoch_*")):
            time.sleep(0.2)
        second = run_cli(["train", "--resume", str(tmp_path / "live")], tmp_path, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert (
            lines[-1] == f"error: run folder {tmp_path / 'live'} is in use by another process (pid {live.pid}): "
            "wait for it to end or stop it first"
        )
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=60)
    done = len(list((tmp_path / "live" / "checkpoints").glob("epoch_*")))
    after = run_cli(["train", "--resume", str(tmp_path / "live"), f"train.epochs={max(done, 1) + 1}"], tmp_path, timeout=300)
    assert after.returncode == 0, after.stderr[-2000:]


def test_a_second_driver_of_the_same_sweep_name_is_refused(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "base": tiny_base()}))
    storage = tmp_path / "sweeps"
    storage.mkdir()
    with ProcessLock(storage / ".dup.lock", "held by this test"):
        proc = run_cli(
            [
                "sweep",
                str(spec),
                "--name",
                "dup",
                "--storage",
                str(storage),
                "--tracking-uri",
                f"sqlite:///{tmp_path / 'mlflow.db'}",
            ],
            tmp_path,
            timeout=300,
        )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: sweep 'dup' in {storage} is in use by another process (pid {os.getpid()}): wait for it to end or stop it first"
    )
    assert sorted(p.name for p in storage.iterdir()) == [".dup.lock"]  # nothing else created
