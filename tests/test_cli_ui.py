"""`lejepa ui` serves the local MLflow store on 127.0.0.1 (a real mlflow server process)."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request

import pytest
import yaml
from mlflow import MlflowClient

from lejepa.record import (
    ARCH_PARAM,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    KIND_SWEEP,
    KIND_TAG,
    KIND_TRIAL,
    LINEAR_PROBE_ACC,
    OVERVIEW_ARTIFACT,
    PARENT_TAG,
    SWEEP_TAG,
    TRACKING_DB,
    TRAIN_SCORE,
    TRIAL_ID_TAG,
    label_free_score,
    sqlite_uri,
)
from lejepa.tracking import get_or_create_experiment
from sweeps.layout import RESOLVED_SPEC, Sweep
from sweeps.mlflow_runs import create_parent_run
from sweeps.outcome import SweepOutcome, TrialSummary
from sweeps.overview import FIGURES, log_overview

from helpers import descendants, free_port, run_cli, start_until_line, sweep_spec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FIGURE = next(iter(FIGURES))  # overview/lam_vs_accuracy.png


def _start_ui(out, port: int) -> tuple[subprocess.Popen, str, list[str]]:
    """``lejepa ui`` on the store in ``out``: the process, the URL it printed, and its output so far."""
    cmd = [sys.executable, "-m", "lejepa", "ui", "--out-dir", str(out), "--port", str(port)]
    proc, seen = start_until_line(cmd, "MLflow UI: ", 180, cwd=out.parent)
    (url,) = [line.split()[2] for line in seen if line.startswith("MLflow UI: ")]
    return proc, url, seen


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_ui_serves_the_store_on_loopback_and_prints_the_runs_view_once_it_answers(tmp_path):
    """The printed URL opens the newest sweep's experiment on its runs table (MLflow 3 lands on its
    GenAI overview otherwise), and is printed only once the server answers."""
    out = tmp_path / "runs"
    out.mkdir()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("visible-experiment")
    sweeps = get_or_create_experiment(client, "sweeps", uri)
    client.create_run(sweeps, tags={KIND_TAG: KIND_SWEEP})
    assert client.get_experiment(sweeps).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    port = free_port()
    proc, url, _ = _start_ui(out, port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:  # answering already
            assert resp.status == 200
        assert url == f"http://127.0.0.1:{port}/#/experiments/{sweeps}/runs?workflowType=machine_learning"
        remote = MlflowClient(f"http://127.0.0.1:{port}")
        assert remote.get_experiment_by_name("visible-experiment") is not None
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        local_addresses = [line.split()[3] for line in listening.splitlines() if line.strip()]
        assert local_addresses and all(a.startswith("127.0.0.1:") for a in local_addresses), listening
        # MLflow's job execution (a job runner and huey consumers per server) is off: no LeJEPA run uses it
        below = b"\n".join(descendants(proc.pid).values())
        assert b"mlflow server" in below.replace(b"\x00", b" ") and b"huey" not in below and b"_job_runner" not in below
    finally:
        _stop(proc)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make install adds it where apt-get and root are)")
def test_the_printed_link_shows_the_sweeps_trials_with_lambda_and_accuracy_in_a_browser(tmp_path):
    """Headless Chromium renders the printed link: the sweep's trials, told apart by name, with
    their λ and frozen linear-probe accuracy as columns, best label-free score first; the parent
    run's λ-vs-accuracy figure loads as an image, and its page shows the trials table with links."""
    spec = sweep_spec(tmp_path, space={"loss.lam": [0.01, 0.05, 0.25]})
    out = tmp_path / "runs"
    out.mkdir()
    uri = sqlite_uri(out / TRACKING_DB)
    folder = tmp_path / "storage" / "demo"
    folder.mkdir(parents=True)
    (folder / RESOLVED_SPEC).write_text(yaml.safe_dump(spec.resolved(), sort_keys=False))
    parent = create_parent_run(spec, "demo", folder, uri)
    client = MlflowClient(uri)
    experiment = client.get_run(parent).info.experiment_id
    trials = {f"a7ed2_0000{i}": (lam, acc) for i, (lam, acc) in enumerate([(0.01, 0.613), (0.05, 0.721), (0.25, 0.587)])}
    summaries = []
    for trial, (lam, acc) in trials.items():
        tags = {KIND_TAG: KIND_TRIAL, SWEEP_TAG: "demo", PARENT_TAG: parent, TRIAL_ID_TAG: trial}
        run = client.create_run(experiment, run_name=f"{trial} λ={lam:g} test_resnet", tags=tags).info.run_id
        client.log_param(run, "loss.lam", str(lam))
        client.log_param(run, ARCH_PARAM, "test_resnet")
        client.log_metric(run, LINEAR_PROBE_ACC, acc)
        client.log_metric(run, TRAIN_SCORE, label_free_score(1.0, lam))
        client.set_terminated(run)
        summaries.append(
            TrialSummary(
                trial,
                "finished",
                {"loss.lam": lam},
                2,
                1.0,
                label_free_score(1.0, lam),
                None,
                acc,
                run,
                health="healthy",
                arch="test_resnet",
                lam=lam,
                init_acc=0.4,
            )
        )
    sweep = Sweep("demo", folder, uri, client.get_experiment(experiment).name, parent)
    log_overview(client, SweepOutcome(sweep, spec, summaries))  # what settle writes on the parent at the end
    client.set_terminated(parent)
    proc, url, _ = _start_ui(out, free_port())
    base = url.split("/#/")[0]
    try:
        assert url.endswith("&viewStateShareKey=demo"), url
        dump = _dump_dom(url)
        figure = _dump_dom(f"{base}/#/experiments/{experiment}/runs/{parent}/artifacts/{OVERVIEW_ARTIFACT}/{FIGURE}")
        with urllib.request.urlopen(  # the bytes that image shows: a real PNG from the server
            f"{base}/get-artifact?path={OVERVIEW_ARTIFACT}/{FIGURE}&run_uuid={parent}", timeout=30
        ) as resp:
            png = resp.read()
        overview = _dump_dom(f"{base}/#/experiments/{experiment}/runs/{parent}")
    finally:
        _stop(proc)
    text = _text(dump)
    assert "Run Name" in text, text[:2000]
    assert "loss.lam" in text and LINEAR_PROBE_ACC in text, text[:4000]  # the view's columns
    names = [f"{trial} λ={lam:g} test_resnet" for trial, (lam, _) in trials.items()]
    assert all(name in text for name in names), text[:4000]
    by_score = sorted(names, key=lambda name: label_free_score(1.0, trials[name.split()[0]][0]))
    assert sorted(names, key=text.index) == by_score  # best label-free score first
    assert all(str(acc) in text for _, acc in trials.values())
    # The parent run's overview figure loads in MLflow's artifact viewer as an image.
    (img,) = re.findall(rf'<img[^>]*alt="{OVERVIEW_ARTIFACT}/{FIGURE}"[^>]*>', figure) or [figure[-3000:]]
    assert re.search(r'src="(blob|data):', img), img
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    # The parent run's page renders the description: a table of the trials, each linked to its run.
    assert "<table" in overview, _text(overview)[:3000]
    assert all(f"#/experiments/{experiment}/runs/{t.run_id}" in overview for t in summaries)


def _dump_dom(url: str) -> str:
    """The DOM headless Chromium has rendered from ``url`` after 30 s of virtual time."""
    assert CHROMIUM is not None
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=2400,1200", "--virtual-time-budget=30000"]
    return subprocess.run([CHROMIUM, *args, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout


def _text(dom: str) -> str:
    """The visible text of a DOM dump, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", "", dom, flags=re.S))))


def test_ui_without_a_store_is_one_line(tmp_path):
    proc = run_cli(["ui", "--out-dir", str(tmp_path / "nothing")], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no MLflow store at") and len(proc.stderr.strip().splitlines()) == 1


def test_ui_on_a_taken_port_is_one_line_and_exit_2(tmp_path):
    import socket

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mlflow.db").write_bytes(b"")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = run_cli(["ui", "--out-dir", str(tmp_path / "runs"), "--port", str(port)], tmp_path, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: port {port} on 127.0.0.1 is taken")
