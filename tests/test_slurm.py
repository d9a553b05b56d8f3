"""``lejepa sweep --slurm`` on a real SLURM: Debian's slurmctld, slurmd and munge, started by the
test on 127.0.0.1 with its own configuration in a temporary folder (one node, this machine).

The job script (sweeps/slurm.py) starts a Ray head in the job with ``srun``, runs the sweep
against it and stops Ray; a cancelled job leaves a sweep that ``lejepa sweep --resume`` finishes.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lejepa.record import META_FILE, TRAIN_LOSS, sqlite_uri

from helpers import SLURM_PROGRAMS, SlurmCluster, child_runs, processes, run_cli, slurm_program, spec_body, write_spec

LOG_EVERY = 2  # train.log_every of the tiny config


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [name for name in SLURM_PROGRAMS if slurm_program(name) is None]
    if missing:
        pytest.skip(
            f"needs Debian's slurmctld, slurmd, slurm-client and munge ({', '.join(missing)} missing): "
            "make test installs them where apt-get and root are"
        )
    if os.geteuid() != 0:
        pytest.skip("a test SLURM's slurmd must run as root (it starts jobs as their user)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _submit(slurm: SlurmCluster, tmp_path: Path, name: str, epochs: int) -> tuple[str, str, Path]:
    spec = write_spec(tmp_path, spec_body(epochs, space={"loss.lam": [0.05, 0.2]}, max_concurrent_trials=2))
    uri = sqlite_uri(tmp_path / "mlflow.db")
    storage = tmp_path / "sweeps"
    args = ["sweep", str(spec), "--slurm", "--name", name, "--storage", str(storage), "--tracking-uri", uri]
    proc = run_cli([*args, "--cpus-per-task", str(os.cpu_count() or 1), "--time", "00:20:00"], tmp_path, env=slurm.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job_id,) = re.findall(r"submitted SLURM job (\d+): sweep " + name, proc.stdout)
    assert f"job output:  {storage / f'{name}.slurm-{job_id}.out'}" in proc.stdout
    return job_id, uri, storage


def _assert_complete(uri: str, storage: Path, name: str, trials: int) -> None:
    """One parent and one child per trial, all FINISHED; every trained step recorded once."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lejepa-sweeps")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`lejepa.kind` = 'sweep'")
    assert parent.info.status == "FINISHED"
    children = child_runs(uri, parent.info.run_id)
    assert len(children) == trials and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        run_dir = Path(child.data.tags["lejepa.run_dir"])
        final = sorted((run_dir / "checkpoints").glob("epoch_*"))[-1]
        steps = json.loads((final / META_FILE).read_text())["step"]
        logged = sorted(m.step for m in client.get_metric_history(child.info.run_id, TRAIN_LOSS))
        assert logged == list(range(LOG_EVERY, steps + 1, LOG_EVERY)), (child.info.run_id, steps, logged)
        assert run_dir.is_relative_to(storage / name)


@pytest.mark.slow
def test_a_sweep_submitted_through_sbatch_runs_on_a_ray_cluster_in_the_job(slurm, tmp_path):
    import ray

    # Another Ray on the job's node (another job's, on a shared node): the job stops its own Ray only.
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        bystander = ray._private.worker._global_node
        started = time.monotonic()
        job_id, uri, storage = _submit(slurm, tmp_path, "s", epochs=1)
        slurm.wait_for_job(job_id)
        assert not bystander.dead_processes(), f"the job stopped another Ray on its node: {bystander.dead_processes()}"
        assert _wait_until_gone(f"/tmp/ray-{job_id}"), "the job's own Ray outlived it"
    finally:
        ray.shutdown()
    output = (storage / f"s.slurm-{job_id}.out").read_text()
    assert "sweep s: 2 trials (2 finished)" in output, output[-3000:] + slurm.logs()
    assert re.search(r"lejepa: Ray head on \S+ at [\d.]+:\d+, 1 node\(s\)", output), output[:2000]
    assert f"lejepa: MLflow: {uri}" in output and f"lejepa: sweep folder {storage / 's'}" in output
    assert "lejepa: sweep driver exited 0" in output
    assert not list(storage.glob(".s.ray-token-*"))  # the job's Ray token is removed at the end
    _assert_complete(uri, storage, "s", trials=2)
    print(f"SLURM sweep job: {time.monotonic() - started:.0f} s from submission to a complete MLflow record")


def _wait_until_gone(folder: str, timeout: float = 30.0) -> bool:
    """Whether every process with ``folder`` (or a path in it) among its arguments is gone within ``timeout`` seconds."""
    pattern = re.compile(re.escape(folder.encode()) + rb"(/|\x00)")  # /tmp/ray-1 but not /tmp/ray-12
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pattern.search(cmdline) for _, cmdline in processes().values()):
            return True
        time.sleep(0.5)
    return False


STOPS = {
    "scancel": ["scancel"],  # every process of the job gets SIGTERM, then SIGKILL after KillWait
    "time-limit": ["scancel", "--batch", "--signal=TERM"],  # what --signal=B:TERM@120 sends: the batch shell only
}


@pytest.mark.slow
@pytest.mark.parametrize("stop", list(STOPS))
def test_a_cancelled_job_leaves_a_sweep_that_resume_finishes(slurm, tmp_path, stop):
    job_id, uri, storage = _submit(slurm, tmp_path, "c", epochs=6)
    deadline = time.monotonic() + 300
    while not list((storage / "c" / "trials").glob("*/checkpoints/epoch_0002")):
        assert time.monotonic() < deadline and slurm.run("squeue", "-h", "-j", job_id).stdout.strip(), slurm.logs()
        time.sleep(0.2)
    assert slurm.run(*STOPS[stop], job_id).returncode == 0
    slurm.wait_for_job(job_id)
    output = (storage / f"c.slurm-{job_id}.out").read_text()
    assert "the sweep saves its state" in output, output[-3000:]
    assert "lejepa: sweep driver exited" in output, output[-3000:]  # the script ended, not killed after KillWait
    resumed = run_cli(["sweep", "--resume", "c", "--storage", str(storage)], tmp_path, env=slurm.env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "sweep c: 2 trials (2 finished)" in resumed.stdout
    _assert_complete(uri, storage, "c", trials=2)


def test_the_dry_run_prints_the_job_script_with_the_specs_and_the_commands_options(tmp_path):
    body = spec_body(
        1, slurm={"nodes": 2, "gpus_per_node": 4, "partition": "gpu", "sbatch": ["--mem=64G"], "setup": ["module load cuda"]}
    )
    spec = write_spec(tmp_path, body)
    args = ["sweep", str(spec), "--slurm", "--dry-run", "--name", "d", "--storage", str(tmp_path / "s"), "--time", "01:00:00"]
    proc = run_cli([*args, "--account", "lab", "--sbatch=--constraint=a100"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for option in ("--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--account=lab", "--time=01:00:00", "--mem=64G"):
        assert f"#SBATCH {option}" in header, header
    assert "#SBATCH --constraint=a100" in header and "#SBATCH --signal=B:TERM@120" in header
    assert "module load cuda" in script and "export RAY_AUTH_MODE=token" in script
    assert "ray.scripts.scripts start --head --block" in script and "--num-gpus=4" in script
    assert f"sweep --resume d --storage {tmp_path / 's'}" in script  # re-submitting the script resumes
    assert not (tmp_path / "s").exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--address", "auto"], "--slurm starts its own Ray cluster in the job: drop --address"),
        (["--sbatch=mem=64G"], "slurm.sbatch 'mem=64G': give one sbatch option per entry"),
    ],
)
def test_bad_slurm_options_are_one_line(tmp_path, extra, fragment):
    spec = write_spec(tmp_path, spec_body(1))
    proc = run_cli(["sweep", str(spec), "--slurm", "--dry-run", *extra], tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and fragment in proc.stderr, proc.stderr
