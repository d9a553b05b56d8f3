"""Bad input, table-driven: every case runs the real `lejepa` CLI in a fresh folder.

The cases in :data:`IN_SUBPROCESS` (one or more per command, and every case that must fail fast
counting the interpreter's start) run ``python -m lejepa`` in a subprocess; the others call
:func:`lejepa.cli.main` in this process with the same arguments, folder and environment, and
the same checks on its exit code and on everything written to file descriptors 1 and 2 (a
subprocess per case costs 4-5 s of imports: 53 of them were 4 min of the suite).

Each case must exit non-zero with exactly one line on stderr (``error: ...``, no traceback) that
names the problem, and write nothing: the folder tree it ran in (which holds every path the
command was pointed at) is the same before and after, and a pre-existing MLflow store holds the
same runs. Failures that need a server or a cluster (tracking URI, Ray address) must come within
seconds, before anything is created.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lejepa.config import is_plain_name
from lejepa.data import FASHION_MNIST_DIR
from lejepa.errors import ConfigError
from lejepa.preflight import PreflightError, check_ray_address, check_tracking_uri, check_writable
from sweeps.spec import check_name, sanitize_name

from helpers import TINY, free_port, run_cli

FAST_S = 30.0
"""Upper bound for a case that must fail fast (interpreter start and imports included, busy 2-core box)."""

SPEC = {"name": "bad", "base": {"model": {"arch": "resnet10t"}, "train": {"epochs": 1}}, "space": {"loss.lam": [0.02, 0.2]}}


def spec(**fields) -> str:
    """A small valid sweep spec with ``fields`` replaced (``None`` removes one)."""
    body = {**SPEC, **fields}
    return yaml.safe_dump({k: v for k, v in body.items() if v is not None})


# Each case: id, CLI arguments, files to write first ({name: text or bytes}), expected fragment of the line.
# Placeholders in arguments: {tmp} the case's folder, {port} a free TCP port (nothing answers),
# {unwritable} a folder that cannot be created or written, {store} a sqlite URI of an MLflow store
# holding one run, {run} a run folder whose checkpoint was written by test_resnet.
CASES = [
    # --- config files and overrides (lejepa train)
    ("train-malformed-yaml", ["train", "bad.yaml"], {"bad.yaml": "loss: {lam: 0.1\n"}, "bad.yaml: malformed YAML at line"),
    (
        "train-yaml-python-tag-not-run",
        ["train", "evil.yaml"],
        {"evil.yaml": "loss: !!python/object/apply:os.system ['touch pwned']\n"},
        "could not determine a constructor",
    ),
    ("train-config-not-utf8", ["train", "bin.yaml"], {"bin.yaml": b"\xff\xfe\x00\x81loss"}, "not a YAML text file"),
    (
        "train-unknown-key-in-file",
        ["train", "c.yaml"],
        {"c.yaml": "loss:\n  lamda: 0.1\n"},
        "unknown config key 'loss.lamda' (did you mean 'loss.lam'",
    ),
    ("train-unknown-key-override", ["train", "optim.lrr=0.1"], {}, "unknown config key 'optim.lrr' (did you mean 'optim.lr'"),
    ("train-override-without-equals", ["train", "loss.lam"], {}, "'loss.lam' is neither a config file (.yaml) nor a key=value"),
    (
        "train-wrong-type",
        ["train", "optim.batch_size=abc"],
        {},
        "optim.batch_size='abc' is invalid: input should be a valid integer",
    ),
    (
        "train-boolean-as-number",
        ["train", "train.epochs=true"],
        {},
        "train.epochs=True is invalid: expected a number, got a boolean",
    ),
    ("train-lambda-above-1", ["train", "loss.lam=1.5"], {}, "loss.lam=1.5 is invalid: input should be less than or equal to 1"),
    (
        "train-lambda-negative",
        ["train", "loss.lam=-0.1"],
        {},
        "loss.lam=-0.1 is invalid: input should be greater than or equal to 0",
    ),
    ("train-lambda-nan", ["train", "loss.lam=.nan"], {}, "loss.lam=nan is invalid: input should be a finite number"),
    (
        "train-slices-zero",
        ["train", "loss.num_slices=0"],
        {},
        "loss.num_slices=0 is invalid: input should be greater than or equal to 1",
    ),
    ("train-knots-even", ["train", "loss.knots=16"], {}, "loss.knots=16 is invalid: must be odd"),
    ("train-knots-below-3", ["train", "loss.knots=1"], {}, "loss.knots=1 is invalid: input should be greater than or equal to 3"),
    ("train-zero-global-views", ["train", "views.global_views=0"], {}, "views.global_views=0 is invalid"),
    # an arch's own minimum input is met by upsampling the views (see backbones.py); below 8 px nothing trains
    (
        "train-resolution-below-minimum",
        ["train", "data.resolution=4"],
        {},
        "data.resolution=4 is invalid: input should be greater than or equal to 8",
    ),
    (
        "train-negative-epochs",
        ["train", "train.epochs=-1"],
        {},
        "train.epochs=-1 is invalid: input should be greater than or equal to 1",
    ),
    (
        "train-run-name-escapes",
        ["train", "train.run_name=../../escape"],
        {},
        "train.run_name='../../escape' is invalid: must be a plain folder name",
    ),
    ("train-unknown-arch", ["train", "model.arch=resnet_18"], {}, "unknown architecture 'resnet_18'; closest: resnet18"),
    ("train-unknown-dataset", ["train", "data.name=mnist2"], {}, "unknown dataset 'mnist2'"),
    ("train-idx-dataset-without-root", ["train", "data.name=mnist"], {}, "MNIST needs data.root"),
    (
        "train-missing-idx-files",
        ["train", "data.name=fashion-mnist", "data.root={tmp}/empty"],
        {"empty/": ""},
        "install Debian's package dataset-fashion-mnist",
    ),
    (
        "train-subset-larger-than-split",
        ["train", "data.train_size=5000", "data.resolution=16"],
        {},
        "data.train_size=5000 exceeds the 1347 images",
    ),
    (
        "train-missing-dataset-files",
        ["train", "data.name=cifar10", "data.root={tmp}/empty"],
        {"empty/": ""},
        "CIFAR-10 not found under",
    ),
    (
        "train-batch-larger-than-dataset",
        ["train", "optim.batch_size=100000", "data.resolution=16", "model.arch=test_resnet"],
        {},
        "optim.batch_size=100000 exceeds the",
    ),
    (
        "train-unreachable-tracking-server",
        ["train", "--tracking-uri", "http://127.0.0.1:{port}"],
        {},
        "MLflow tracking server http://127.0.0.1:{port} does not answer",
    ),
    ("train-unwritable-sqlite-store", ["train", "--tracking-uri", "sqlite:///{unwritable}/mlflow.db"], {}, "is not writable"),
    ("train-unwritable-out-dir", ["train", "train.out_dir={unwritable}"], {}, "train.out_dir {unwritable} is not writable"),
    # 8 x 2^43 float32 weights: 256 TiB, beyond any machine's address space, refused at allocation
    (
        "train-projector-beyond-memory",
        ["train", "model.arch=test_resnet", "data.resolution=16", "model.proj_hidden=8", "model.proj_dim=8796093022208"],
        {},
        "out of memory (an allocation of 256.0 TiB)",
    ),
    (
        "train-file-tracking-store",
        ["train", "--tracking-uri", "file://{tmp}/mlruns"],
        {},
        "is a file store, which MLflow no longer writes to",
    ),
    (
        "train-resume-other-arch",
        ["train", "--resume", "{run}", "model.arch=test_vit"],
        {},
        "is for architecture 'test_resnet', the config asks for 'test_vit'",
    ),
    ("train-resume-missing-folder", ["train", "--resume", "{tmp}/nope"], {}, "no such run folder"),
    # --- sweeps
    ("sweep-missing-spec", ["sweep", "missing.yaml"], {}, "sweep spec 'missing.yaml' does not exist"),
    (
        "sweep-unknown-top-level-key",
        ["sweep", "s.yaml"],
        {"s.yaml": spec(schedulr={"type": "asha"})},
        "schedulr: unknown key (did you mean 'scheduler'",
    ),
    (
        "sweep-empty-catalog-query",
        ["sweep", "s.yaml"],
        {"s.yaml": spec(space={"model.arch": {"catalog": {"family": "vit", "max_params": "1k"}}})},
        "no catalog architecture matches family=vit max_params=1k",
    ),
    (
        "sweep-missing-dataset-files-in-base",
        ["sweep", "s.yaml"],
        {"empty/": "", "s.yaml": spec(base={**SPEC["base"], "data": {"name": "cifar10", "root": "empty"}})},
        "CIFAR-10 not found under empty",
    ),
    (
        "sweep-missing-dataset-files-in-space",
        ["sweep", "s.yaml", "--dry-run"],
        {
            "empty/": "",
            "s.yaml": spec(
                base={**SPEC["base"], "data": {"name": "fashion-mnist"}}, space={"data.root": [FASHION_MNIST_DIR, "empty"]}
            ),
        },
        "space.data.root: Fashion-MNIST not found under empty",
    ),
    ("sweep-zero-trials", ["sweep", "s.yaml"], {"s.yaml": spec(space={"loss.lam": []})}, "expected a non-empty list"),
    (
        "sweep-name-dotdot",
        ["sweep", "s.yaml", "--name", "../x", "--storage", "{tmp}/storage"],
        {"s.yaml": spec()},
        "--name '../x' is not a plain folder name",
    ),
    (
        "sweep-name-slash",
        ["sweep", "s.yaml", "--name", "a/b", "--storage", "{tmp}/storage"],
        {"s.yaml": spec()},
        "--name 'a/b' is not a plain folder name",
    ),
    (
        "sweep-resume-missing",
        ["sweep", "--resume", "nope", "--storage", "{tmp}/storage"],
        {},
        "--resume nope: no resumable sweep",
    ),
    (
        "sweep-unreachable-tracking-server",
        ["sweep", "s.yaml", "--tracking-uri", "http://127.0.0.1:{port}"],
        {"s.yaml": spec()},
        "does not answer",
    ),
    (  # checked before the spec (whose architecture check imports timm): reported even though the spec is also wrong
        "sweep-unreachable-tracking-server-before-the-spec",
        ["sweep", "s.yaml", "--tracking-uri", "http://127.0.0.1:{port}"],
        {"s.yaml": spec(space={"model.arch": ["resnet10t", "resnet10x"]})},
        "does not answer",
    ),
    (
        "sweep-unwritable-storage",
        ["sweep", "s.yaml", "--storage", "{unwritable}"],
        {"s.yaml": spec()},
        "sweep storage (--storage) {unwritable} is not writable",
    ),
    (
        "sweep-unwritable-sqlite-store",
        ["sweep", "s.yaml", "--tracking-uri", "sqlite:///{unwritable}/mlflow.db"],
        {"s.yaml": spec()},
        "is not writable",
    ),
    (
        "sweep-dead-ray-address",
        ["sweep", "s.yaml", "--address", "127.0.0.1:{port}", "--tracking-uri", "{store}"],
        {"s.yaml": spec()},
        "cannot reach the Ray cluster at 127.0.0.1:{port}",
    ),
    (
        "sweep-gpu-trials-on-a-cpu-machine",
        ["sweep", "s.yaml", "--tracking-uri", "{store}"],
        {"s.yaml": spec(resources={"cpus_per_trial": 1, "gpus_per_trial": 1})},
        "needs 1 GPU but this machine has 0",
    ),
    # --- selection, catalog, the command line itself
    (
        "select-unknown-sweep",
        ["select", "nope", "--tracking-uri", "{store}"],
        {},
        "no sweep, parent run or experiment named 'nope'",
    ),
    ("select-unknown-score", ["select", "x", "--score", "rankm"], {}, "unknown score 'rankm' (did you mean 'rankme'"),
    (
        "select-out-is-a-file",
        ["select", "x", "--out", "taken.txt", "--tracking-uri", "{store}"],
        {"taken.txt": "x"},
        "taken.txt is not writable",
    ),
    (
        "select-out-under-a-file",
        ["select", "x", "--out", "taken.txt/report", "--tracking-uri", "{store}"],
        {"taken.txt": "x"},
        "taken.txt is not a folder",
    ),
    # python -m puts the working folder first on sys.path: a researcher's analysis.py must not pass for ours
    (
        "select-analysis-shadowed-by-a-local-file",
        ["select", "x"],
        {"analysis.py": "x = 1\n"},
        "'analysis' resolves to {tmp}/analysis.py, not to this installation's",
    ),
    ("archs-unknown-family", ["archs", "--family", "vti"], {}, "unknown architecture family 'vti' (did you mean 'vit'"),
    # an empty listing is an error: a filter that matches nothing is almost always a typo (e.g. no '*')
    ("archs-filter-matches-nothing", ["archs", "--pattern", "resnet"], {}, "no catalog architecture matches pattern='resnet'"),
    ("unknown-command", ["trian"], {}, "invalid choice: 'trian'"),
    # --- server, sync
    (
        "server-database-not-answering",
        ["server", "--backend-store-uri", "postgresql://mlflow:secret@127.0.0.1:{port}/mlflow", "--artifacts-destination", "a"],
        {},
        "cannot connect to the database postgresql://mlflow:***@127.0.0.1:{port}/mlflow",
    ),
    (
        "server-store-not-a-database",
        ["server", "--backend-store-uri", "http://127.0.0.1:{port}", "--artifacts-destination", "a"],
        {},
        "expected a database URI, e.g. postgresql://",
    ),
    (
        "server-artifacts-unwritable",
        ["server", "--backend-store-uri", "sqlite:///{tmp}/team.db", "--artifacts-destination", "{unwritable}/a"],
        {},
        "--artifacts-destination {unwritable}/a is not writable",
    ),
    ("sync-missing-folder", ["sync", "{tmp}/nope"], {}, "{tmp}/nope: no such folder"),
]


IN_SUBPROCESS = {
    "train-malformed-yaml",
    "train-unreachable-tracking-server",
    "train-projector-beyond-memory",
    "sweep-unknown-top-level-key",
    "sweep-dead-ray-address",
    "sweep-unreachable-tracking-server",
    "select-unknown-sweep",
    "select-analysis-shadowed-by-a-local-file",
    "archs-unknown-family",
    "unknown-command",
}
"""Cases run as a real ``python -m lejepa`` process."""


def run_in_process(args: list[str], cwd: Path, monkeypatch, capfd) -> subprocess.CompletedProcess:
    """:func:`lejepa.cli.main` on ``args`` in ``cwd``, as :func:`helpers.run_cli` would run it:
    its exit code and what it wrote to stdout and stderr (file descriptors, so C-level writes count)."""
    from lejepa.cli import main

    capfd.readouterr()
    with monkeypatch.context() as patch:
        patch.chdir(cwd)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setattr(sys, "argv", ["lejepa", *args])
        handler = signal.getsignal(signal.SIGTERM)
        try:
            code = main(args)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            signal.signal(signal.SIGTERM, handler)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["lejepa", *args], code, out, err)


@pytest.fixture(scope="module")
def store_template(tmp_path_factory) -> Path:
    """An MLflow SQLite store holding one experiment with one finished run."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.create_experiment("lejepa-sweeps", artifact_location=(db.parent / "mlartifacts").as_uri())
    client.set_terminated(client.create_run(exp, run_name="existing").info.run_id)
    return db


def _unwritable(tmp: Path) -> Path:
    """A folder path that cannot be created or written: under a read-only folder, or (as root,
    where permissions do not stop writes) under a regular file."""
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        (locked / "probe").touch()
    except PermissionError:
        return locked / "sub"
    (locked / "probe").unlink()
    locked.chmod(stat.S_IRWXU)
    shutil.rmtree(locked)
    (tmp / "file.txt").write_text("a regular file\n")
    return tmp / "file.txt" / "sub"


def _run_folder(tmp: Path) -> Path:
    """A run folder as `lejepa train` leaves it, its checkpoint written by test_resnet."""
    from lejepa.checkpoint import save_checkpoint
    from lejepa.config import load_config

    cfg = load_config(None, [*TINY, f"train.out_dir={tmp / 'runs'}", "train.run_name=r"])
    run = tmp / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    meta = {"step": 18, "arch": "test_resnet", "metrics": {}, "config": cfg.model_dump(mode="json")}
    save_checkpoint(run / "checkpoints", 1, {"epoch": 1, "step": 18}, meta, keep=2)
    return run


def _tree(root: Path) -> dict[str, int | None]:
    """Every path under ``root`` (relative) with its size; None for folders."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.stat().st_size) for p in root.rglob("*")}


def _run_count(db: Path) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


@pytest.mark.parametrize("case, args, files, fragment", [pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(
    tmp_path, store_template, monkeypatch, capfd, case, args, files, fragment
):
    work = tmp_path / "work"
    work.mkdir()
    for name, content in files.items():
        if name.endswith("/"):
            (work / name).mkdir()
        elif isinstance(content, bytes):
            (work / name).write_bytes(content)
        else:
            (work / name).write_text(content)
    text = " ".join(args)
    values = {"tmp": work, "port": free_port()}
    if "{unwritable}" in text:
        values["unwritable"] = _unwritable(work)
    if "{store}" in text:
        shutil.copy(store_template, work / "mlflow.db")
        values["store"] = f"sqlite:///{work / 'mlflow.db'}"
    if "{run}" in text:
        values["run"] = _run_folder(work)
    args = [a.format(**values) for a in args]
    fragment = fragment.format(**values)
    runs_before = _run_count(work / "mlflow.db") if "store" in values else None
    before = _tree(work)

    start = time.monotonic()
    proc = run_cli(args, work) if case in IN_SUBPROCESS else run_in_process(args, work, monkeypatch, capfd)
    elapsed = time.monotonic() - start

    lines = proc.stderr.splitlines()
    assert proc.returncode != 0, f"exit 0 for {args}: {proc.stdout[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: "), proc.stderr[-3000:]
    assert fragment in lines[0], lines[0]
    assert _tree(work) == before, f"{args} wrote or changed files"
    if runs_before is not None:
        assert _run_count(work / "mlflow.db") == runs_before
    if "{port}" in text:  # a dead server or cluster is reported at once, not after retries
        assert elapsed < FAST_S, f"{args} took {elapsed:.0f} s"


@pytest.fixture
def restore_modes(tmp_path):
    """Give write permission back to everything under tmp_path so pytest can remove it."""
    yield
    for p in tmp_path.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            p.chmod(stat.S_IRWXU)


@pytest.mark.parametrize(
    "name, clean",
    [
        ("../x", "x"),
        ("a/b", "a-b"),
        ("a\\b", "a-b"),
        ("..", ""),
        (".", ""),
        (".hidden", "hidden"),
        ("/etc/passwd", "etc-passwd"),
        ("../../../../tmp/evil", "tmp-evil"),
        ("a/../b", "a-..-b"),
        ("-rf", "rf"),
        ("x\x00y", "x-y"),
        ("naïve sweep", "na-ve-sweep"),
        ("  ", ""),
        ("ok_name-1.2", "ok_name-1.2"),
        ("a" * 300, "a" * 128),
        ("." * 50 + "/" + "b", "b"),
    ],
)
def test_sanitize_name_leaves_one_plain_folder_name(name, clean):
    out = sanitize_name(name)
    assert out == clean
    assert out == "" or is_plain_name(out)
    assert "/" not in out and "\\" not in out and not out.startswith(".") and out not in (".", "..")
    if out:
        assert (Path("/storage") / out).resolve().parent == Path("/storage")


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", ".", ".hidden", "-rf", "", "x\x00y", "a" * 129, "/abs"])
def test_check_name_refuses_what_is_not_already_plain(name):
    with pytest.raises(ConfigError, match="is not a plain folder name"):
        check_name(name, "--name")


def test_check_name_keeps_plain_names():
    for name in ("quickstart-20261125-120000", "a..b", "_x", "v1.2"):
        assert check_name(name, "--name") == name


def test_check_writable_leaves_nothing_behind(tmp_path, restore_modes):
    check_writable(tmp_path / "not" / "yet", "storage")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("")
    with pytest.raises(PreflightError, match=r"is not writable: .*f is not a folder"):
        check_writable(tmp_path / "f" / "sub", "storage")
    if os.geteuid() != 0:  # root writes through permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(PreflightError, match="is not writable"):
            check_writable(ro / "sub", "storage")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"] + (["ro"] if os.geteuid() != 0 else [])


def test_check_tracking_uri_local_and_remote(tmp_path, monkeypatch):
    check_tracking_uri(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert not (tmp_path / "new").exists()
    with pytest.raises(PreflightError, match="is a folder, not a SQLite file"):
        check_tracking_uri(f"sqlite:///{tmp_path}")
    with pytest.raises(PreflightError, match="is not a URI"):
        check_tracking_uri("mlruns")
    with pytest.raises(PreflightError, match="use sqlite:///<folder>/mlflow.db"):
        check_tracking_uri(f"file://{tmp_path}/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-out is honoured
    check_tracking_uri(f"file://{tmp_path}/mlruns")
    start = time.monotonic()
    with pytest.raises(PreflightError, match="does not answer"):
        check_tracking_uri(f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - start < 5


def test_sweep_checks_its_tracking_uri_once(tmp_path, store_template, monkeypatch, capfd):
    """`lejepa sweep --tracking-uri` checks the store before it loads the spec; the sweep's preflight
    does not check it again (a second connection to the server). Any other store is still checked."""
    import lejepa.preflight
    import sweeps.runner

    checked: list[str] = []
    real = lejepa.preflight.check_tracking_uri

    def counting(uri: str) -> None:
        checked.append(uri)
        real(uri)

    monkeypatch.setattr(lejepa.preflight, "check_tracking_uri", counting)
    monkeypatch.setattr(sweeps.runner, "check_tracking_uri", counting)
    shutil.copy(store_template, tmp_path / "mlflow.db")
    # a spec the machine can never grant: refused just after the preflight, before Ray or MLflow start
    (tmp_path / "s.yaml").write_text(spec(resources={"cpus_per_trial": 4096}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_in_process(["sweep", "s.yaml", "--tracking-uri", uri], tmp_path, monkeypatch, capfd)
    assert proc.returncode == 2 and "needs 4096 CPUs" in proc.stderr, proc.stderr
    assert checked == [uri]
    checked.clear()
    (tmp_path / "s.yaml").write_text(spec(resources={"cpus_per_trial": 4096}, tracking={"uri": uri}))
    proc = run_in_process(["sweep", "s.yaml"], tmp_path, monkeypatch, capfd)  # the spec's store: checked by the preflight
    assert proc.returncode == 2 and "needs 4096 CPUs" in proc.stderr, proc.stderr
    assert checked == [uri]


def test_check_ray_address():
    for address in (None, "", "auto", "local"):
        check_ray_address(address)
    for address in ("nohost", "host:port", "127.0.0.1:99999"):
        with pytest.raises(PreflightError, match="is not host:port"):
            check_ray_address(address)
    start = time.monotonic()
    with pytest.raises(PreflightError, match="cannot reach the Ray cluster"):
        check_ray_address(f"ray://127.0.0.1:{free_port()}")
    assert time.monotonic() - start < 5


def _sqlite_bytes(tables: dict[str, int]) -> bytes:
    """A real SQLite file with ``tables`` (name → rows of 1 kB), as bytes."""
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.db"
        con = sqlite3.connect(path)
        for name, rows in tables.items():
            con.execute(f"CREATE TABLE {name} (v TEXT)")
            con.executemany(f"INSERT INTO {name} VALUES (?)", [("x" * 1000,)] * rows)
        con.commit()
        con.close()
        return path.read_bytes()


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"this is not a database at all, just text", "is not a SQLite database"),
        ("truncated", "is truncated"),
        (_sqlite_bytes({"inventory": 3}), "is a SQLite database but not an MLflow store (tables: inventory)"),
    ],
)
def test_broken_tracking_stores_are_one_line(tmp_path, store_template, content, fragment):
    db = tmp_path / "mlflow.db"
    if content == "truncated":  # a real MLflow store cut in half (a copy interrupted, a full disk)
        whole = store_template.read_bytes()
        content = whole[: len(whole) // 2]
    db.write_bytes(content)
    with pytest.raises(PreflightError, match=re.escape(fragment)):
        check_tracking_uri(f"sqlite:///{db}")
    proc = run_cli(["train", *TINY, f"train.out_dir={tmp_path / 'runs'}", "--tracking-uri", f"sqlite:///{db}"], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: tracking store") and fragment in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_an_http_server_that_is_not_mlflow_is_refused_and_a_real_one_passes(tmp_path, mlflow_server):
    import http.server
    import threading

    check_tracking_uri(mlflow_server.url)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(PreflightError, match="answers HTTP but is not an MLflow tracking server"):
            check_tracking_uri(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()


def test_a_server_that_answers_slowly_passes_and_one_that_never_answers_is_refused(monkeypatch):
    """A tracking server that accepts the connection gets ANSWER_TIMEOUT_S to answer, not the
    3 s of the connection: a just-started or busy MLflow takes seconds over its first search."""
    import http.server
    import threading

    from lejepa import preflight

    delay = {"s": preflight.TIMEOUT_S + 1.0}

    class SlowMlflow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(delay["s"])
            body = b'{"experiments": []}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowMlflow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        start = time.monotonic()
        check_tracking_uri(url)
        assert time.monotonic() - start >= delay["s"]
        delay["s"] = 30.0
        monkeypatch.setattr(preflight, "ANSWER_TIMEOUT_S", 1.0)
        with pytest.raises(PreflightError, match=r"does not answer \(timed out\)"):
            check_tracking_uri(url)
    finally:
        server.shutdown()


def test_allocator_failures_are_named_with_their_size_and_others_are_not():
    import torch

    from lejepa.errors import out_of_memory

    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139 GiB")
    assert out_of_memory(cuda).startswith("out of memory (an allocation of 20.00 GiB): ")
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: refused by the CPU allocator
    assert out_of_memory(cpu.value).startswith("out of memory (an allocation of 1.0 PiB)")
    assert out_of_memory(MemoryError()).startswith("out of memory: ")
    assert out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert out_of_memory(ValueError("out of memory")) is None
