"""``lejepa runs``: list, filter, sort and export a sweep's trials, and compare two runs, on a real
MLflow store (SQLite, and one real ``mlflow server``) laid out the way a sweep logs it."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from lejepa.cli import main
from lejepa.config import load_config
from lejepa.record import (
    ARCH_TAG,
    DIVERGED_STEP_TAG,
    EPOCH,
    EPOCH_LOSS,
    FAILED,
    FINISHED,
    KIND_SWEEP,
    KIND_TAG,
    KIND_TRIAL,
    KNN_ACC,
    LINEAR_PROBE_ACC,
    ONLINE_PROBE_ACC,
    ONLINE_TEST_ACC,
    PARENT_TAG,
    STATUS_DIVERGED,
    STATUS_PRUNED,
    STATUS_TAG,
    SWEEP_TAG,
    TRAIN_SCORE,
    TRIAL_ID_TAG,
    label_free_score,
    sqlite_uri,
)

from helpers import MlflowServer

SWEEP = "demo-20260101-120000"
# trial: (λ, arch, batch size, status); λ=2e-05 is logged as the string "2e-05", which sorts after "0.1" as text
TRIALS = {
    "t0": (0.05, "resnet18", 64, None),
    "t1": (0.1, "resnet18", 128, None),
    "t2": (0.25, "vit_tiny_patch16_224", 64, None),
    "t3": (1e-2, "resnet34", 256, None),
    "t4": (2e-5, "vit_tiny_patch16_224", 128, STATUS_PRUNED),
    "t5": (0.5, "resnet18", 64, STATUS_DIVERGED),
}
EPOCHS = 3


def build_store(uri: str) -> None:
    """A sweep's parent run and its trial runs, tagged, with params and metrics as a sweep logs them:
    the flattened config as params, per-epoch metrics at each epoch's last step, final metrics at the end."""
    client = MlflowClient(uri)
    exp = client.create_experiment("lejepa-sweeps")
    parent = client.create_run(exp, run_name=SWEEP, tags={KIND_TAG: KIND_SWEEP, SWEEP_TAG: SWEEP}).info.run_id
    for i, (trial, (lam, arch, batch, status)) in enumerate(TRIALS.items()):
        cfg = load_config(
            None, [f"loss.lam={lam}", f"model.arch={arch}", f"optim.batch_size={batch}", f"optim.lr={0.001 * (i + 1)}"]
        )
        tags = {PARENT_TAG: parent, KIND_TAG: KIND_TRIAL, SWEEP_TAG: SWEEP, TRIAL_ID_TAG: trial, ARCH_TAG: arch}
        run_id = client.create_run(exp, run_name=f"{SWEEP}/{trial}", tags=tags).info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in cfg.flat().items()])
        now, epochs = int(time.time() * 1000), 2 if status == STATUS_PRUNED else EPOCHS
        metrics = []
        for epoch in range(1, epochs + 1):
            loss = 1.0 + i / 10 + 1 / epoch
            metrics += [
                Metric(k, v, now, 10 * epoch)
                for k, v in {
                    EPOCH: epoch,
                    EPOCH_LOSS: loss,
                    TRAIN_SCORE: label_free_score(loss, lam),
                    ONLINE_TEST_ACC: 0.1 * epoch,
                }.items()
            ]
        if status is None:
            metrics += [
                Metric(k, v, now, 10 * epochs)
                for k, v in {LINEAR_PROBE_ACC: 0.5 + i / 20, KNN_ACC: 0.4 + i / 20, ONLINE_PROBE_ACC: 0.3 + i / 20}.items()
            ]
        client.log_batch(run_id, metrics=metrics)
        if status is not None:
            client.set_tag(run_id, STATUS_TAG, status)
        if status == STATUS_DIVERGED:
            client.set_tag(run_id, DIVERGED_STEP_TAG, "12")
        client.set_terminated(run_id, FAILED if status == STATUS_DIVERGED else FINISHED)
    client.set_terminated(parent, FINISHED)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    build_store(sqlite_uri(db))
    return db


@pytest.fixture
def runs(store, capsys):
    """``lejepa runs ARGS`` in-process on the store: (exit code, stdout, stderr)."""

    def call(*args: str, uri: str | None = None) -> tuple[int, str, str]:
        code = main(["runs", *args, "--tracking-uri", uri or sqlite_uri(store)])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def listed(call, *args: str) -> pd.DataFrame:
    code, out, err = call("list", SWEEP, *args, "--csv")
    assert code == 0, err
    return pd.read_csv(io.StringIO(out))


def test_lists_one_row_per_trial_sorted_by_the_label_free_score(runs):
    code, out, err = runs(SWEEP)  # the shorthand of `lejepa runs list SWEEP`
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "trial",
        "run_name",
        "status",
        "arch",
        "lam",
        "lr",
        "num_slices",
        "batch_size",
        "epoch",
        "loss",
        "score",
        "linear_probe_acc",
        "knn_acc",
        "online_probe_acc",
        "run_id",
        "checkpoint",
    ]
    table = listed(runs)
    assert sorted(table["trial"]) == ["t0", "t1", "t2", "t3", "t4"]  # t5 diverged: left out, with a note
    assert "note: excluded t5" in err and "diverged at step 12" in err
    assert table["score"].is_monotonic_increasing
    final = table.set_index("trial")
    assert final.loc["t0", "epoch"] == EPOCHS and final.loc["t4", "epoch"] == 2
    assert final.loc["t4", "status"] == STATUS_PRUNED and pd.isna(final.loc["t4", "linear_probe_acc"])
    assert final.loc["t2", "linear_probe_acc"] == pytest.approx(0.6) and final.loc["t3", "knn_acc"] == pytest.approx(0.55)
    assert final.loc["t1", "loss"] == pytest.approx(1.1 + 1 / EPOCHS)
    assert final.loc["t3", "batch_size"] == 256 and final.loc["t3", "lam"] == pytest.approx(0.01)


def test_where_compares_numbers_as_numbers(runs):
    assert set(listed(runs, "--where", "lam < 0.1")["trial"]) == {"t0", "t3", "t4"}  # "2e-05" < "0.1" as text is False
    assert set(listed(runs, "--where", "lam <= 0.1")["trial"]) == {"t0", "t1", "t3", "t4"}
    assert set(listed(runs, "--where", "lam == 1e-2")["trial"]) == {"t3"}  # logged as "0.01"
    assert set(listed(runs, "--where", "params.optim.batch_size > 64")["trial"]) == {"t1", "t3", "t4"}  # "128" < "64" as text
    assert set(listed(runs, "--where", "optim.batch_size >= 128 and lam != 0.1")["trial"]) == {"t3", "t4"}
    assert set(listed(runs, "--where", "linear_probe_acc > 0")["trial"]) == {"t0", "t1", "t2", "t3"}  # t4 has none


def test_where_globs_text_and_joins_with_or(runs):
    assert set(listed(runs, "--where", "arch ~ resnet*")["trial"]) == {"t0", "t1", "t3"}
    assert set(listed(runs, "--where", "lam < 0.1 and arch ~ 'resnet*'")["trial"]) == {"t0", "t3"}
    assert set(listed(runs, "--where", "arch ~ vit* or lam > 0.09 and arch == resnet18")["trial"]) == {"t1", "t2", "t4"}
    assert set(listed(runs, "--where", "(arch ~ vit* or lam > 0.09) and status != pruned")["trial"]) == {"t1", "t2"}
    assert listed(runs, "--where", "arch ~ convnext*").empty


def test_sort_top_and_columns(runs):
    table = listed(runs, "--sort=-lam", "--top", "3", "--columns", "trial,lam,loss.lam,arch")
    assert list(table.columns) == ["trial", "lam", "params.loss.lam", "arch"]
    assert table["trial"].tolist() == ["t2", "t1", "t0"]
    by_acc = listed(runs, "--sort=-knn_acc", "--columns", "trial,knn_acc")
    assert by_acc["trial"].tolist() == ["t3", "t2", "t1", "t0", "t4"]  # no value: last, either way


def test_json_and_file_output_round_trip(runs, tmp_path):
    code, out, err = runs("list", SWEEP, "--json", "--where", "arch ~ resnet*")
    assert code == 0, err
    records = json.loads(out)
    assert {r["trial"] for r in records} == {"t0", "t1", "t3"}
    assert all(r["run_name"] == f"{SWEEP}/{r['trial']}" and len(r["run_id"]) == 32 for r in records)
    assert pd.DataFrame(records).set_index("trial").loc["t0", "lam"] == 0.05
    target = tmp_path / "out" / "trials.csv"
    code, out, err = runs("list", SWEEP, "--csv", "--out", str(target))
    assert code == 0 and out == "" and f"wrote 5 rows to {target}" in err
    assert pd.read_csv(target)["trial"].tolist() == listed(runs)["trial"].tolist()


def test_compare_marks_the_rows_that_differ(runs):
    ids = listed(runs, "--columns", "trial,run_id").set_index("trial")["run_id"]
    code, out, err = runs("compare", ids["t0"], f"{SWEEP}/t3", "--csv")
    assert code == 0, err
    rows = pd.read_csv(io.StringIO(out), dtype=str, keep_default_na=False).set_index("field")
    differ = set(rows.index[rows["diff"] == "*"])
    assert {
        "run_id",
        "trial",
        "arch",
        "params.loss.lam",
        "params.model.arch",
        "params.optim.batch_size",
        "params.optim.lr",
        "loss",
        "score",
        "linear_probe_acc",
        "knn_acc",
    } <= differ
    assert {"status", "params.loss.num_slices", "params.data.name", "epoch"}.isdisjoint(differ)
    assert rows.loc["params.loss.lam", ["a", "b"]].tolist() == ["0.05", "0.01"]
    code, out, err = runs("compare", f"{SWEEP}/t0", f"{SWEEP}/t3", "--diff-only")
    assert code == 0, err
    table = out.splitlines()
    assert table[0].split() == ["field", "a", "b", "diff"] and all(line.rstrip().endswith("*") for line in table[1:])
    assert any(line.startswith("params.loss.lam") for line in table) and not any("num_slices" in line for line in table)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--where", "lamb < 0.1"], "--where: unknown column 'lamb' (did you mean 'lam'"),
        (["--where", "lam < 0.1 and"], "expected a column after 'and', found the end"),
        (["--where", "lam 0.1"], "expected an operator (<, <=, >, >=, ==, !=, ~) after 'lam', found '0.1'"),
        (["--where", "lam <"], "expected a value after '<'"),
        (["--where", "lam < 0.1 arch"], "expected 'and', 'or' or the end after '0.1', found 'arch'"),
        (["--where", "(lam < 0.1"], "expected ')'"),
        (["--where", "arch ~ 'resnet*"], "unclosed quote"),
        (["--where", "arch < resnet18"], "< compares numbers, and 'resnet18' is not one"),
        (["--where", "lam ! 0.1"], "unexpected '!'"),
        (["--sort=-scor"], "--sort: unknown column 'scor' (did you mean 'score'"),
        (["--columns", "trial,acc"], "--columns: unknown column 'acc'"),
        (["--top", "0"], "--top must be ≥ 1"),
    ],
)
def test_bad_queries_are_one_error_line(runs, args, message):
    code, out, err = runs("list", SWEEP, *args)
    assert code != 0 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["list", "nosuch"], "no sweep, parent run or experiment named 'nosuch'"),
        (["compare", f"{SWEEP}/t9", f"{SWEEP}/t0"], f"sweep '{SWEEP}' has no trial 't9'"),
        (["compare", "0" * 32, f"{SWEEP}/t0"], f"no run '{'0' * 32}'"),
        (["compare", "t0", "t1"], "'t0' is neither a run id (32 hex digits) nor SWEEP/TRIAL_ID"),
    ],
)
def test_unknown_sweeps_and_runs_are_one_error_line(runs, args, message):
    code, out, err = runs(*args)
    assert code != 0 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_a_missing_store_is_one_error_line(runs, tmp_path):
    code, _, err = runs(SWEEP, uri=sqlite_uri(tmp_path / "none.db"))
    assert code != 0 and err.startswith("error: no MLflow store at") and len(err.splitlines()) == 1
    assert not (tmp_path / "none.db").exists()


@pytest.mark.slow
def test_lists_and_filters_over_a_real_mlflow_server(runs, store, tmp_path):
    shutil.copy(store, tmp_path / "server.db")  # the same store, served over HTTP
    server = MlflowServer(tmp_path)
    server.start()
    try:
        code, out, err = runs("list", SWEEP, "--where", "lam < 0.1 and arch ~ resnet*", "--csv", uri=server.url)
        assert code == 0, err
        assert pd.read_csv(io.StringIO(out))["trial"].tolist() == ["t0", "t3"]
        code, out, err = runs("compare", f"{SWEEP}/t0", f"{SWEEP}/t3", "--json", "--diff-only", uri=server.url)
        assert code == 0, err
        assert {r["field"] for r in json.loads(out)} >= {"params.loss.lam", "params.model.arch"}
    finally:
        server.stop()
