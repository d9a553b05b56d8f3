"""Pre-flight checks: is the output folder writable, does the tracking store answer, is the Ray
cluster there — asked before anything is created, so a bad path or a dead address fails in
seconds with one line instead of after a half-created run or minutes of retries.

Nothing here imports MLflow or Ray, and no check leaves anything behind: a folder that does not
exist yet is judged by its nearest existing ancestor (a temporary file is created and removed
there), a tracking server by one short HTTP request, a Ray address by one TCP connect.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from lejepa.errors import LejepaError
from lejepa.record import sqlite_path

TIMEOUT_S = 3.0
"""How long a tracking server or Ray address may take to accept a connection."""

ANSWER_TIMEOUT_S = 30.0
"""How long a tracking server that accepted the connection may take to answer: a server just
started, or busy on a loaded machine, takes seconds over its first search."""

URI_SCHEMES_WITHOUT_SLASHES = ("databricks",)
"""Tracking URIs MLflow accepts that have no ``://``."""


class PreflightError(LejepaError):
    """An output folder, tracking store or cluster address is not usable."""


def check_writable(path: str | Path, what: str) -> None:
    """Raise unless the folder ``path`` exists and is writable, or could be created (its nearest
    existing ancestor is a writable folder). Creates nothing that outlives the check."""
    path = Path(path).expanduser().absolute()
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise PreflightError(f"{what} {path} is not writable: {probe} is not a folder; choose another path")
    try:
        fd, name = tempfile.mkstemp(prefix=".lejepa-write-check-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise PreflightError(
            f"{what} {path} is not writable: {probe}: {exc.strerror or exc}; choose another folder or fix its permissions"
        ) from None


def check_tracking_uri(uri: str) -> None:
    """Raise unless the MLflow tracking store ``uri`` is usable: a SQLite file that can be created
    or written, or an http(s) server that accepts a connection within :data:`TIMEOUT_S` and answers
    within :data:`ANSWER_TIMEOUT_S`. Other schemes
    (databases, Databricks) are left to MLflow."""
    path = sqlite_path(uri)
    if path is not None:
        db = Path(path).expanduser()
        if db.is_dir():
            raise PreflightError(f"tracking store {uri}: {db} is a folder, not a SQLite file; use sqlite:///<folder>/mlflow.db")
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise PreflightError(
                f"tracking store {uri}: {db} is not readable and writable; fix its permissions or pass another --tracking-uri"
            )
        check_writable(db.parent, f"tracking store {uri}: the folder")
        if db.is_file() and db.stat().st_size > 0:
            _check_sqlite_store(db, uri)
        return
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_server(uri)
        return
    if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        raise PreflightError(
            f"tracking URI {uri!r} is a file store, which MLflow no longer writes to (maintenance "
            f"mode): use sqlite:///<folder>/mlflow.db (`mlflow migrate-filestore` moves old runs), "
            f"or set MLFLOW_ALLOW_FILE_STORE=true to use it anyway"
        )
    if "://" not in uri and not uri.startswith(URI_SCHEMES_WITHOUT_SLASHES):
        raise PreflightError(f"tracking URI {uri!r} is not a URI: use sqlite:///<path> or http://host:port")


SQLITE_MAGIC = b"SQLite format 3\x00"


def _check_sqlite_store(db: Path, uri: str) -> None:
    """A non-empty store file must be a whole SQLite database holding MLflow's tables: the header's
    magic, its page size × page count against the file's size (a truncated copy), then the
    table names, read-only."""
    import sqlite3

    fix = "restore it from a backup, or pass another --tracking-uri (a new file is created empty)"
    with open(db, "rb") as f:
        header = f.read(100)
    if not header.startswith(SQLITE_MAGIC):
        raise PreflightError(f"tracking store {uri}: {db} is not a SQLite database; {fix}")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    size = db.stat().st_size
    if len(header) == 100 and header[24:28] == header[92:96] and size < page_size * pages:
        raise PreflightError(f"tracking store {uri}: {db} is truncated ({size} of {page_size * pages} bytes); {fix}")
    try:
        with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=TIMEOUT_S) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise PreflightError(f"tracking store {uri}: {db} cannot be read ({exc}); {fix}") from None
    if tables and "experiments" not in tables:
        raise PreflightError(
            f"tracking store {uri}: {db} is a SQLite database but not an MLflow store "
            f"(tables: {', '.join(sorted(tables)[:4])}); pass the store's own file"
        )


def _check_server(uri: str) -> None:
    """One GET of MLflow's experiment search: a JSON answer (or an auth refusal, which is MLflow's
    or its proxy's business) means an MLflow server; no answer, or a page that is not MLflow's
    JSON, is refused."""
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        parts = urlsplit(url)
        if parts.hostname and not _proxied(parts.scheme, parts.hostname):  # a dead host is told in seconds
            socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), TIMEOUT_S).close()
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=ANSWER_TIMEOUT_S) as answer:
            body, status = answer.read(65536), answer.status
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return
        body, status = exc.read(65536), exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        raise PreflightError(
            f"MLflow tracking server {uri} does not answer ({text.splitlines()[0]}): start it "
            f"(mlflow server --host 127.0.0.1 --port PORT) or pass another --tracking-uri"
        ) from None
    try:
        json.loads(body)
    except ValueError:
        raise PreflightError(
            f"{uri} answers HTTP but is not an MLflow tracking server (GET "
            f"/api/2.0/mlflow/experiments/search gave {status}, not MLflow's JSON): check the "
            f"host and port, or pass another --tracking-uri"
        ) from None


def _proxied(scheme: str, host: str) -> bool:
    """Whether urllib reaches ``host`` through a proxy (the environment's ``*_proxy``, ``no_proxy``)."""
    return bool(urllib.request.getproxies().get(scheme)) and not urllib.request.proxy_bypass(host)


def check_ray_address(address: str | None) -> None:
    """Raise unless an explicit Ray address ``host:port`` (or ``ray://host:port``) accepts a TCP
    connection within :data:`TIMEOUT_S`; ``None``, ``local`` and ``auto`` are left to Ray."""
    if address is None or address.strip() in ("", "local", "auto"):
        return
    rest = address.strip()
    if "://" in rest:
        rest = rest.split("://", 1)[1]
    host, sep, port = rest.rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PreflightError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379) or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S):
            return
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc) or type(exc).__name__)
        raise PreflightError(
            f"cannot reach the Ray cluster at {address} ({reason}): start one with "
            f"`ray start --head` there, or check --address / RAY_ADDRESS"
        ) from None
