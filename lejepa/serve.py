"""``lejepa ui`` (the local SQLite store in a browser) and ``lejepa server`` (a team's MLflow
tracking server on a database): both start ``mlflow server``, print its address once ``/health``
answers, refuse a taken port in one line, and warn when bound beyond this machine (MLflow has no
authentication)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from lejepa.errors import ConfigError, LejepaError


def _cmd_ui(args: argparse.Namespace) -> int:
    from lejepa.record import default_tracking_uri, sqlite_path
    from lejepa.tracking import artifact_root

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


def server_env() -> dict[str, str]:
    """The environment an MLflow server is started with: this one, with MLflow's job execution off
    unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` is set. Those jobs (GenAI scorers, trace rollups)
    serve no LeJEPA run, and each server would start more processes for them (a job runner and huey
    consumers, each importing MLflow) and leave a folder in /dev/shm behind."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}


def _serve(cmd: list[str], host: str, port: int, announce) -> int:
    """Run the MLflow server ``cmd``; print ``announce(base URL)`` once it answers; stop it on Ctrl-C."""
    server = subprocess.Popen(cmd, env=server_env())
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


def register_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="serve the MLflow UI for the local store on 127.0.0.1")
    p.add_argument("--out-dir", default="runs", help="runs folder holding mlflow.db (default: runs)")
    p.add_argument("--tracking-uri", help="an explicit sqlite:/// store")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=_cmd_ui)


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


def register_server(sub: argparse._SubParsersAction) -> None:
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
