"""What several test modules share: the repository's paths, a tiny training config, the real CLI
in a subprocess, a real ``mlflow server``, sweep specs and their results, and a hand-made sweep for
the selection analysis (pytest fixtures stay in conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from lejepa.health import collapsed_ep
from lejepa.serve import server_env

REPO = Path(__file__).resolve().parents[1]
LEJEPA = [sys.executable, "-m", "lejepa"]

# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadfile --no-loadscope-reorder`):
# each file runs on one worker, so its module and session fixtures start once, and a worker that is done
# takes the next file in collection order. The longest files (from `pytest --durations=0`) are queued
# first, so that the last files to start are short ones and both workers finish together. Not strictly by
# length: files of concurrent Ray trials side by side slow each other. Strictly by length (faults beside
# sweep_run) pytest took 1,644 s in one CI, this order (faults beside sweep_cluster's outage waits) 1,564 s
# in the one before; one run each, and the machine's speed varies. conftest sorts by it; test_tooling
# checks that every name here is still a file in tests/.
LONGEST_FIRST = (
    "test_faults.py",
    "test_sweep_cluster.py",
    "test_slurm.py",
    "test_sweep_run.py",
    "test_catalog.py",
    "test_cli_ui.py",
    "test_cli_train.py",
    "test_undelivered.py",
    "test_sweep_estimate.py",
    "test_analysis_e2e.py",
)

# A config small enough to train an epoch in about a second on 2 CPU cores.
TINY = [
    "data.name=digits-shifted",
    "data.resolution=16",
    "data.placements=1",
    "model.arch=test_resnet",
    "model.proj_hidden=32",
    "model.proj_dim=16",
    "views.global_views=2",
    "views.local_views=2",
    "loss.num_slices=32",
    "optim.batch_size=64",
    "optim.warmup_epochs=0.5",
    "train.log_every=2",
    "train.eval_probe_epochs=5",
    "train.threads=1",
]


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m lejepa ARGS`` in ``cwd`` with the repo importable; capture output."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update({"PYTHONPATH": str(REPO), **(env or {})})
    return subprocess.run(LEJEPA + args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` process on 127.0.0.1 (SQLite backend, proxied artifacts) in ``folder``.

    :meth:`stop` and :meth:`start` may be called again: the port and the store stay the same.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        import time
        import urllib.request

        log = (self.folder / "mlflow-server.log").open("a")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.folder / 'server.db'}",
                "--artifacts-destination",
                str(self.folder / "server-artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            cwd=self.folder,
            env=server_env(),  # as `lejepa server` starts it: without MLflow's job runner processes
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, (self.folder / "mlflow-server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None


def processes() -> dict[int, tuple[int, bytes]]:
    """Every live process on this machine, read from /proc: pid → (parent pid, command line as its
    NUL-separated bytes). A process that exits while it is read is left out."""
    table: dict[int, tuple[int, bytes]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                table[int(proc.name)] = (ppid, (proc / "cmdline").read_bytes())
            except (OSError, IndexError, ValueError):
                continue
    return table


def descendants(root: int) -> dict[int, bytes]:
    """Every live process below ``root`` (children, their children, ...): pid → command line (NUL-separated)."""
    table = processes()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return {pid: table[pid][1] for pid in found}


def tiny_base() -> dict:
    """TINY as a nested config tree (a sweep spec's ``base``)."""
    from lejepa.config import parse_override, set_dotted

    tree: dict = {}
    for text in TINY:
        set_dotted(tree, *parse_override(text))
    return tree


def write_spec(tmp_path: Path, body: dict | str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return path


def spec_body(epochs: int = 1, **fields) -> dict:
    """A sweep spec named ``t`` on the tiny config trained ``epochs`` epochs, plus ``fields``."""
    base = tiny_base()
    base["train"]["epochs"] = epochs
    return {"name": "t", "base": base, **fields}


def sweep_spec(tmp_path: Path, epochs: int = 1, **fields):
    from sweeps.spec import load_spec

    return load_spec(write_spec(tmp_path, spec_body(epochs, **fields)))


def child_runs(uri: str, parent_id: str) -> list:
    """The trial runs nested under the sweep's parent run ``parent_id``."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lejepa-sweeps")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def trial_states(path: Path) -> dict:
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t for t in ExperimentAnalysis(str(path)).trials}


class SweepCLI:
    """``lejepa sweep`` in a subprocess joining the test's Ray, with a SQLite store and storage in ``tmp_path``."""

    def __init__(self, tmp_path: Path, ray_address: str) -> None:
        self.cwd = tmp_path
        self.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        self.storage = tmp_path / "sweeps"
        self.common = ["--storage", str(self.storage), "--address", ray_address]
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.env.pop("MLFLOW_TRACKING_URI", None)

    def start(self, spec_path: Path, name: str, **popen) -> subprocess.Popen:
        return subprocess.Popen(
            LEJEPA + ["sweep", str(spec_path), "--name", name, "--tracking-uri", self.uri, *self.common],
            cwd=self.cwd,
            env=self.env,
            **popen,
        )

    def resume(self, name: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            LEJEPA + ["sweep", "--resume", name, *self.common],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )


# run: (batch, λ, arch, final loss, final SIGReg, logged (collapse ratio, projector rank) or None,
#       frozen probe, RankMe)
RUNS = {
    "collapsed": (64, 0.01, "a", 0.20, 0.9 * collapsed_ep(64), None, 0.70, 50.0),  # lowest loss, collapsed
    "good": (64, 0.05, "a", 0.60, 6.0, None, 0.86, 60.0),
    "fair": (64, 0.20, "b", 1.00, 2.0, None, 0.80, 40.0),
    "big-batch": (128, 0.05, "b", 0.50, 5.0, (0.10, 0.6), 0.84, 70.0),  # healthy, on another loss scale
    "dim": (128, 0.02, "b", 0.40, 3.0, (0.20, 0.10), 0.60, 90.0),  # dimensional collapse, best RankMe
}


def hand_made_sweep():
    """Five runs × two epochs of a hand-made sweep (:data:`RUNS`), as :class:`analysis.loader.Sweep`."""
    import numpy as np
    import pandas as pd

    from analysis.loader import Sweep

    rows = []
    for name, (batch, lam, arch, loss, sigreg, logged, acc, rankme) in RUNS.items():
        for epoch in (1, 2):
            final = epoch == 2
            ratio, rank = logged if logged else (np.nan, np.nan)
            rows.append(
                {
                    "run_id": name,
                    "trial": name,
                    "arch": arch,
                    "lam": lam,
                    "epoch": epoch,
                    "step": 10 * epoch,
                    "is_final": final,
                    "loss": loss + (0.0 if final else 0.1),
                    "invariance": np.nan,
                    "sigreg": sigreg,
                    "online_acc": acc - (0.0 if final else 0.05),
                    "linear_probe_acc": acc if final else np.nan,
                    "knn_acc": np.nan,
                    "online_probe_acc": np.nan,
                    "checkpoint": f"/ckpt/{name}/{epoch}",
                    "checkpoint_uri": None,
                    "params.optim.batch_size": str(batch),
                    "collapse_ratio": ratio,
                    "proj_rank": rank,
                    "score.rankme": rankme if final else np.nan,
                }
            )
    return Sweep("hand-made", "sqlite:///none", None, pd.DataFrame(rows))


SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def slurm_program(name: str) -> str | None:
    """The path of a SLURM or munge program (daemons live in /usr/sbin, not always on PATH)."""
    import shutil

    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name,) if p.exists()), None)


class SlurmCluster:
    """A real one-node SLURM cluster on 127.0.0.1 in ``folder``: munged with its own key and socket,
    slurmctld and slurmd in the foreground on free ports, configuration written here. Clients find
    it through ``env`` (``SLURM_CONF``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.host = socket.gethostname().split(".")[0]
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PYTHONPATH": str(REPO)}
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.daemons: list[subprocess.Popen] = []

    def start(self, timeout: float = 90) -> None:
        import time

        munge = self.folder / "munge"
        for sub in ("state", "spool", "log", "munge"):
            (self.folder / sub).mkdir(mode=0o700, exist_ok=True)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = munge / "munge.sock"
        subprocess.run(
            [
                slurm_program("munged") or "munged",
                "--force",
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'seed'}",
            ],
            check=True,
            capture_output=True,
        )
        f = self.folder
        self.conf.write_text(
            f"""ClusterName=lejepatest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={f / "state"}
SlurmdSpoolDir={f / "spool"}
SlurmctldPidFile={f / "slurmctld.pid"}
SlurmdPidFile={f / "slurmd.pid"}
SlurmctldLogFile={f / "log" / "slurmctld.log"}
SlurmdLogFile={f / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=30
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        )
        for daemon in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", self.host]):
            self.daemons.append(
                subprocess.Popen(
                    [slurm_program(daemon[0]) or daemon[0], *daemon[1:], "-f", str(self.conf)],
                    env=self.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout
        while self.run("sinfo", "-h", "-o", "%t").stdout.strip() != "idle":
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.5)

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(
            [slurm_program(args[0]) or args[0], *args[1:]], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def wait_for_job(self, job_id: str, timeout: float = 600) -> None:
        """Until job ``job_id`` has left the queue."""
        import time

        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-j", job_id).stdout.strip():
            assert time.monotonic() < deadline, f"job {job_id} still queued after {timeout} s"
            time.sleep(1)

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted((self.folder / "log").glob("*.log")))

    def stop(self) -> None:
        import signal

        self.run("scancel", "--full", "--partition=test")
        for proc in self.daemons:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pid = self.folder / "munge" / "munged.pid"
        if pid.is_file():
            os.kill(int(pid.read_text().strip()), signal.SIGTERM)


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL server's bin folder (Debian: /usr/lib/postgresql/<v>/bin)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0
    )
    return found[-1].parent if found else None


class Postgres:
    """A real PostgreSQL server on 127.0.0.1 in a temporary data directory (run as the ``postgres``
    user when the tests run as root: PostgreSQL refuses root). :meth:`stop` and :meth:`start` keep
    the data and the port."""

    def __init__(self, bin_dir: Path) -> None:
        import pwd
        import tempfile

        self.bin = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="lejepa-pg-"))
        self.port = free_port()
        self.owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        if self.owner is not None:
            os.chown(self.folder, self.owner.pw_uid, self.owner.pw_gid)
        self._run("initdb", "-D", str(self.folder / "data"), "-U", "lejepa", "--auth=trust", "-E", "UTF8")

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess:
        command = [str(self.bin / program), *args]
        if self.owner is not None:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.folder)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done

    def uri(self, database: str) -> str:
        return f"postgresql://lejepa@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "log"), "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "lejepa", name)
        return self.uri(name)

    def remove(self) -> None:
        import shutil

        subprocess.run(
            ([] if self.owner is None else ["runuser", "-u", "postgres", "--"])
            + [str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(self.folder, ignore_errors=True)


def fill_fs(mount: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of the file system at ``mount`` with one file, ``mount/ballast``."""
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(mount / "ballast", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(free - leave, 0))


def start_until_line(cmd: list[str], prefix: str, timeout: float, cwd: Path | None = None) -> tuple[subprocess.Popen, list[str]]:
    """Start ``cmd`` (own process group, the repo on PYTHONPATH, stderr into stdout) and read its
    output until a line starts with ``prefix``: the process and the lines so far. A process that
    exits, or prints no such line within ``timeout`` s, is killed and the test fails with its output."""
    import queue
    import signal
    import threading
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or ()], daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while not any(line.startswith(prefix) for line in seen):
        if time.monotonic() > deadline or proc.poll() is not None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("".join(seen)[-3000:])
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            pass
    return proc, seen


class TeamServer:
    """``lejepa server`` (an MLflow server on a database, artifacts proxied to ``artifacts``) on a free port."""

    def __init__(self, database_uri: str, artifacts: Path) -> None:
        self.database_uri = database_uri
        self.artifacts = artifacts
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []

    def start(self, timeout: float = 240) -> None:
        args = ["server", "--backend-store-uri", self.database_uri, "--artifacts-destination", str(self.artifacts)]
        self.proc, self.output = start_until_line(
            LEJEPA + [*args, "--port", str(self.port), "--workers", "2"], "MLflow team server: ", timeout
        )

    def stop(self) -> None:
        import signal

        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc = None
