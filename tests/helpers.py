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

REPO = Path(__file__).resolve().parents[1]
LEJEPA = [sys.executable, "-m", "lejepa"]

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
