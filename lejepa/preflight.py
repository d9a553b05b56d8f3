"""Pre-flight checks: is the output folder writable, does the tracking store answer, is the Ray
cluster there — asked before anything is created, so a bad path or a dead address fails in
seconds with one line instead of after a half-created run or minutes of retries.

Nothing here imports MLflow or Ray, and no check leaves anything behind: a folder that does not
exist yet is judged by its nearest existing ancestor (a temporary file is created and removed
there), a tracking server by one short HTTP request, a Ray address by one TCP connect.
"""

from __future__ import annotations

import os
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from lejepa.errors import LejepaError

TIMEOUT_S = 3.0
"""How long a tracking server or Ray address may take to answer."""

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
        raise PreflightError(f"{what} {path} is not writable: {probe}: {exc.strerror or exc}; "
                             f"choose another folder or fix its permissions") from None


def check_tracking_uri(uri: str) -> None:
    """Raise unless the MLflow tracking store ``uri`` is usable: a SQLite file that can be created
    or written, or an http(s) server that answers within :data:`TIMEOUT_S`. Other schemes
    (databases, Databricks) are left to MLflow."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).expanduser()
        if db.is_dir():
            raise PreflightError(f"tracking store {uri}: {db} is a folder, not a SQLite file; "
                                 f"use sqlite:///<folder>/mlflow.db")
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise PreflightError(f"tracking store {uri}: {db} is not readable and writable; fix its permissions "
                                 f"or pass another --tracking-uri")
        check_writable(db.parent, f"tracking store {uri}: the folder")
        return
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_server(uri)
        return
    if "://" not in uri and not uri.startswith(URI_SCHEMES_WITHOUT_SLASHES):
        raise PreflightError(f"tracking URI {uri!r} is not a URI: use sqlite:///<path> or http://host:port")


def _check_server(uri: str) -> None:
    """One GET of ``<uri>/health``: any HTTP answer means the server is up (auth is MLflow's business)."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        raise PreflightError(f"MLflow tracking server {uri} does not answer ({text.splitlines()[0]}): start it "
                             f"(mlflow server --host 127.0.0.1 --port PORT) or pass another --tracking-uri") from None


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
        raise PreflightError(f"cannot reach the Ray cluster at {address} ({reason}): start one with "
                             f"`ray start --head` there, or check --address / RAY_ADDRESS") from None
