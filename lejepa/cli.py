"""The ``lejepa`` command.

Sub-commands are plug-ins: each is a ``register(subparsers)`` function published under the
``lejepa.commands`` entry-point group (see pyproject.toml), so ``sweeps`` and ``analysis`` add
``sweep`` and ``select`` without the core importing them. Every user error is a
:class:`~lejepa.errors.LejepaError`, printed as one line with a non-zero exit and no traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import NoReturn

from lejepa.errors import ConfigError, LejepaError, first_line, out_of_memory


def split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """Positional arguments → (config file or None, ``key=value`` overrides)."""
    paths = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    for item in paths:
        if Path(item).suffix.lower() not in (".yaml", ".yml") and not Path(item).exists():
            raise ConfigError(f"{item!r} is neither a config file (.yaml) nor a key=value override (e.g. loss.lam=0.02)")
    if len(paths) > 1:
        raise ConfigError(f"expected one config file and key=value overrides, got several files: {paths}")
    return (paths[0] if paths else None), overrides


# --------------------------------------------------------------------------- train
def _cmd_train(args: argparse.Namespace) -> int:
    from lejepa.config import CONFIG_FILE, load_config  # torch loads after the config is known to be valid

    config_path, overrides = split_config_args(args.items)
    run_dir = resume = None
    if args.resume:
        run_dir = resume = Path(args.resume).expanduser().resolve()
        if not run_dir.is_dir():
            raise ConfigError(f"--resume {args.resume}: no such run folder")
        if run_dir.parent.name == "checkpoints" and (run_dir.parent.parent / CONFIG_FILE).is_file():
            # one checkpoint of a run: continue that run (its folder, config, MLflow run) from it
            run_dir = run_dir.parent.parent
            print(f"lejepa: resuming run {run_dir} from its checkpoint {resume.name}", file=sys.stderr)
        if config_path is None and (run_dir / CONFIG_FILE).is_file():
            config_path = str(run_dir / CONFIG_FILE)
    cfg = load_config(config_path, overrides)
    from lejepa.callbacks import ConsoleProgress
    from lejepa.trainer import Trainer

    if args.no_tracking:
        cfg.tracking.enabled = False
    uri = _train_preflight(cfg, run_dir, args.tracking_uri)
    from lejepa.health import collapse_risk

    risk = collapse_risk(cfg.loss.lam, cfg.optim.batch_size)
    if risk is not None:
        print(f"lejepa: warning: {risk}", file=sys.stderr)
    callbacks = [] if args.quiet else [ConsoleProgress()]
    trainer = Trainer(cfg, callbacks=callbacks, run_dir=run_dir, resume=resume)
    if uri is not None and trainer.rt.is_main:
        from lejepa.tracking import MLflowCallback

        experiment = args.experiment or cfg.tracking.experiment
        trainer.add_callback(
            MLflowCallback(uri, experiment=experiment, flush_every=cfg.tracking.flush_every, final_wait=cfg.tracking.final_wait_s)
        )
    metrics = trainer.fit()
    if trainer.rt.is_main and args.quiet:
        print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


def _train_preflight(cfg, run_dir: Path | None, tracking_uri: str | None) -> str | None:
    """Before any data is loaded or anything written: the architecture exists, the run folder can
    be written, the tracking store answers. Returns the tracking URI (None without tracking)."""
    from lejepa.backbones import check_arch_name
    from lejepa.preflight import check_tracking_uri, check_writable

    check_arch_name(cfg.model.arch)
    check_writable(run_dir or Path(cfg.train.out_dir), "run folder" if run_dir else "train.out_dir")
    if not cfg.tracking.enabled:
        return None
    from lejepa.tracking import default_tracking_uri

    uri = tracking_uri or cfg.tracking.uri or default_tracking_uri(cfg.train.out_dir)
    check_tracking_uri(uri)
    return uri


def _register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one LeJEPA model",
        description="Train one LeJEPA model. CONFIG is a YAML file; key=value pairs override "
        "fields by dotted path (e.g. loss.lam=0.02 model.arch=vit_tiny_patch16_224).",
    )
    p.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest valid checkpoint")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or <out_dir>/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment name (default: tracking.experiment)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--quiet", action="store_true", help="no progress lines; print the final metrics only")
    p.set_defaults(func=_cmd_train)


# --------------------------------------------------------------------------- archs
def _cmd_archs(args: argparse.Namespace) -> int:
    from lejepa.catalog import format_table, query

    entries = query(
        family=args.family,
        max_params=args.max_params,
        min_params=args.min_params,
        pattern=args.pattern,
        include_gpu_scale=args.all,
        runnable_only=not args.all,
    )
    print(format_table(entries))
    return 0


def _register_archs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "archs",
        help="list the architecture catalog",
        description="List catalog architectures, filtered by family, parameter budget and name.",
    )
    p.add_argument("--family", action="append", help="family name (repeatable), e.g. vit, resnet, convnext")
    p.add_argument("--max-params", help="parameter budget, e.g. 20M")
    p.add_argument("--min-params", help="lower parameter bound, e.g. 1M")
    p.add_argument("--pattern", help="glob on the name, e.g. 'resnet*'")
    p.add_argument("--all", action="store_true", help="include GPU-scale and not-runnable-small entries")
    p.set_defaults(func=_cmd_archs)


# --------------------------------------------------------------------------- ui
def _cmd_ui(args: argparse.Namespace) -> int:
    from lejepa.record import sqlite_path
    from lejepa.tracking import artifact_root, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(args.out_dir)
    path = sqlite_path(uri)
    if path is None:
        raise ConfigError(f"lejepa ui serves a local SQLite store; {uri!r} is already a server: open it in a browser")
    db = Path(path)
    if not db.is_file():
        raise ConfigError(f"no MLflow store at {db}: train something first, or pass --out-dir/--tracking-uri")
    from lejepa.preflight import check_tracking_uri

    check_tracking_uri(uri)  # a truncated or foreign SQLite file: one line, not MLflow's traceback
    _warn_if_public(args.host)
    _check_port_free(args.host, args.port)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        artifact_root(uri),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    print(f"starting the MLflow UI on http://{args.host}:{args.port} (store {db}) ...", file=sys.stderr)

    def announce(base: str) -> str:
        from mlflow import MlflowClient

        from lejepa.tracking import runs_view_url

        return f"MLflow UI: {runs_view_url(MlflowClient(uri), base)}  (Ctrl-C to stop)"

    return _serve(cmd, args.host, args.port, announce)


def _serve(cmd: list[str], host: str, port: int, announce) -> int:
    """Run the MLflow server ``cmd``; print ``announce(base URL)`` once it answers; stop it on Ctrl-C."""
    server = subprocess.Popen(cmd)
    try:
        base = _wait_for_server(server, host, port)
        print(announce(base), file=sys.stderr, flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def _warn_if_public(host: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving MLflow on {host}: MLflow has no authentication; anyone who can reach this "
            f"address can read and change your runs (keep 127.0.0.1 and use an SSH tunnel, or an authenticating proxy)",
            file=sys.stderr,
        )


def _wait_for_server(server: subprocess.Popen, host: str, port: int, timeout: float = 300.0) -> str:
    """The server's base URL once ``/health`` answers (the UI is usable then, not when it was
    launched); a server that exits first is one error line."""
    import time
    import urllib.request

    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise LejepaError(f"the MLflow server stopped before answering (exit {server.returncode}); see its output above")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return base
        except OSError:
            time.sleep(0.5)
    raise LejepaError(f"the MLflow server did not answer on {base} within {timeout:.0f} s")


def _check_port_free(host: str, port: int) -> None:
    """Refuse in one line when something already listens on host:port (MLflow would only log it
    in its server's output and keep running without a UI)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot serve on {host}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"port {port} on {host} is taken ({exc.strerror}): another `lejepa ui` or MLflow server? pass --port <free port>"
            ) from None


def _register_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="serve the MLflow UI for the local store on 127.0.0.1")
    p.add_argument("--out-dir", default="runs", help="runs folder holding mlflow.db (default: runs)")
    p.add_argument("--tracking-uri", help="an explicit sqlite:/// store")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=_cmd_ui)


# --------------------------------------------------------------------------- server
def _cmd_server(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from lejepa.preflight import check_writable

    uri = args.backend_store_uri
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme not in ("postgresql", "mysql", "sqlite", "mssql"):
        raise ConfigError(f"--backend-store-uri {uri!r}: expected a database URI, e.g. postgresql://user@host:5432/mlflow")
    artifacts = args.artifacts_destination
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).expanduser().resolve())
        check_writable(Path(artifacts), "--artifacts-destination")
    if scheme == "sqlite":  # a file: checked without creating it
        from lejepa.preflight import check_tracking_uri

        check_tracking_uri(uri)
    else:
        _check_database(uri)
    _warn_if_public(args.host)
    _check_port_free(args.host, args.port)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--artifacts-destination", artifacts]
    cmd += ["--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    shown = _hide_password(uri)
    print(f"starting the MLflow team server (store {shown}, artifacts {artifacts}) ...", file=sys.stderr)
    return _serve(
        cmd,
        args.host,
        args.port,
        lambda base: f"MLflow team server: {base}  (train/sweep with --tracking-uri {base}; Ctrl-C to stop)",
    )


def _hide_password(uri: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _check_database(uri: str) -> None:
    """One line unless the database answers within 10 s (MLflow creates its tables on first start)."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 10} if uri.startswith("postgresql") else {})
        with engine.connect():
            pass
    except Exception as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"cannot connect to the database {_hide_password(uri)}: {reason}") from None


def _register_server(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "server",
        help="serve an MLflow tracking server for a team (a database store, an artifact folder)",
        description="An MLflow tracking server on a database (PostgreSQL for a team) with its artifacts "
        "proxied to a folder or bucket. Bound to 127.0.0.1 unless --host says otherwise: MLflow has no "
        "authentication of its own.",
    )
    p.add_argument("--backend-store-uri", required=True, help="e.g. postgresql://mlflow@db-host:5432/mlflow")
    p.add_argument("--artifacts-destination", required=True, help="a shared folder (or s3://...) for checkpoints and reports")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=4, help="server worker processes")
    p.set_defaults(func=_cmd_server)


# --------------------------------------------------------------------------- sync
def _cmd_sync(args: argparse.Namespace) -> int:
    from lejepa import spool
    from lejepa.locks import ProcessLock
    from lejepa.preflight import PreflightError, check_tracking_uri
    from lejepa.trainer import RUN_LOCK

    paths = [Path(p).expanduser().resolve() for p in args.paths]
    for path in paths:
        if not path.is_dir():
            raise ConfigError(f"{path}: no such folder (give run folders, or a folder holding them)")
    found = list(dict.fromkeys(spool.find(paths)))
    if not found:
        print(f"lejepa: nothing to deliver under {', '.join(map(str, paths))}")
        return 0
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # one line per run, ours
    from mlflow import MlflowClient

    failed: list[str] = []
    for run_dir in found:
        try:
            with ProcessLock(run_dir / RUN_LOCK, f"run folder {run_dir}"):
                kept = spool.read(run_dir)
                if kept is None:  # delivered meanwhile
                    continue
                check_tracking_uri(kept.tracking_uri)
                left = spool.deliver(MlflowClient(kept.tracking_uri), kept)
                spool.write(run_dir, left)
        except LejepaError as exc:  # a live run holds the folder (it delivers its own), or the store is gone
            failed.append(f"{run_dir}: {exc}")
            continue
        except Exception as exc:
            failed.append(f"{run_dir}: {first_line(exc)}")
            continue
        note = f"; still kept: {left.summary()} (the artifact store refused them)" if left else ""
        print(f"lejepa: {run_dir}: delivered {kept.summary()} to run {kept.run_id}{note}")
    if failed:
        raise PreflightError(
            f"{len(failed)} of {len(found)} run folders still hold undelivered MLflow records (kept; "
            f"run lejepa sync again once the store answers): {failed[0]}"
        )
    return 0


def _register_sync(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sync",
        help="deliver to MLflow what runs kept while it was unreachable",
        description="Deliver the metrics, tags, artifacts and final status that runs kept in their "
        "folders (mlflow_undelivered.json) while MLflow was unreachable or their artifact store full.",
    )
    p.add_argument(
        "paths", nargs="*", default=["runs"], metavar="FOLDER", help="run folders, or folders holding them (default: runs)"
    )
    p.set_defaults(func=_cmd_sync)


# --------------------------------------------------------------------------- main
CORE_COMMANDS = (_register_train, _register_archs, _register_ui, _register_server, _register_sync)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line (``error: ...``, exit 2) like every other user error;
    sub-command parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lejepa", description="LeJEPA training, sweeps and label-free selection.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in CORE_COMMANDS:
        register(sub)
    for ep in sorted(entry_points(group="lejepa.commands"), key=lambda e: e.name):
        try:
            _check_not_shadowed(ep.module.partition(".")[0])
            ep.load()(sub)
        except Exception as exc:  # one broken plug-in must not take the other commands down
            _unavailable(sub, ep.name, exc)
    return parser


class ShadowedPackage(ImportError):
    """A plug-in's package name resolves to someone else's file or package."""


def _check_not_shadowed(top: str) -> None:
    """Raise if the top-level package ``top`` (``sweeps``, ``analysis``: installed beside ``lejepa``)
    would be imported from somewhere else: a user's ``analysis.py`` in the working folder (first
    on ``sys.path`` under ``python -m``) or another distribution's package of that name."""
    ours = Path(__file__).resolve().parents[1] / top
    spec = importlib.util.find_spec(top) if top not in sys.modules else sys.modules[top].__spec__
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if origin is not None and origin.parent != ours:
        raise ShadowedPackage(
            f"'{top}' resolves to {origin}, not to this installation's {ours}: a file or package of "
            f"that name shadows it; rename it or run lejepa from another folder"
        )


def _unavailable(sub: argparse._SubParsersAction, name: str, exc: Exception) -> None:
    """Register ``name`` as a command that reports, in one line, why its plug-in could not be loaded."""
    reason = f"{type(exc).__name__}: {first_line(exc, '')}".rstrip(": ")

    def fail(_args: argparse.Namespace) -> int:
        fix = "" if isinstance(exc, ShadowedPackage) else "; reinstall with `pip install -e .`"
        raise LejepaError(f"the '{name}' command is unavailable: its plug-in failed to load ({reason}){fix}")

    if name in sub.choices:  # it registered itself before failing
        sub.choices[name].set_defaults(func=fail)
        return
    # no option prefix: whatever follows the name is taken as-is, so the reason is always what is shown
    parser = sub.add_parser(name, help=f"unavailable ({reason})", add_help=False, prefix_chars="\x00")
    parser.add_argument("rest", nargs="*")
    parser.set_defaults(func=fail)


def _stop_on_sigterm_as_on_sigint() -> None:
    """A scheduler's preemption (SIGTERM: SLURM, Kubernetes, ``kill``) stops a command as Ctrl-C
    does: the signal is re-raised as SIGINT, so training ends between steps with its checkpoints
    consistent and its MLflow run KILLED, and a sweep stops through Ray Tune's own SIGINT handler;
    ``--resume`` continues both. Only the first SIGTERM is passed on: a scheduler may send it twice
    (SLURM signals both a batch script, which forwards it, and its children), and a second SIGINT
    would make Ray Tune stop without saving; a forced stop is SIGKILL's job."""
    passed: list[int] = []

    def as_sigint(signum, frame) -> None:
        if not passed:
            passed.append(signum)
            os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, as_sigint)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a sub-command; user errors → one line on stderr and their exit code."""
    _stop_on_sigterm_as_on_sigint()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LejepaError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        message = out_of_memory(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
