"""What a run could not deliver to MLflow, kept on disk beside it until it can be.

``<run_dir>/mlflow_undelivered.json`` (:data:`~lejepa.record.SPOOL_FILE`) holds, for the MLflow
run it names: the metrics not yet accepted (key, value, timestamp, step, in the order they were
logged), the tags, the artifacts (a local path and its artifact folder) and the final status to
set last (or none while the run goes on). It is written atomically (a temporary file, then a
rename), so a crash leaves the previous spool or the new one, never half of one.

:func:`deliver` sends what the run does not hold yet: for each metric key only the steps above the
highest step the run already has for that key (a run logs a key's steps in increasing order, so
re-delivering a spool, or a batch that reached the server just before a timeout, adds no
duplicate), then the tags, the artifacts and the status. An artifact that cannot be written (a
full artifact store) stays in the spool and is named on the run (``lejepa.undelivered``); the
status is set anyway. The file is removed once nothing is left. ``lejepa sync`` and the next
start or ``--resume`` of the run deliver it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from lejepa.checkpoint import SPACE_MARGIN, check_free_space
from lejepa.errors import ConfigError, first_line
from lejepa.record import SPOOL_FILE, UNDELIVERED_TAG

BATCH = 1000
"""Metrics per ``log_batch`` (MLflow's limit)."""


@dataclass
class Spool:
    """A run's undelivered records (see the module docstring)."""

    run_id: str
    tracking_uri: str
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)
    status: str | None = None

    def __bool__(self) -> bool:
        return bool(self.metrics or self.tags or self.artifacts or self.status)

    def summary(self) -> str:
        """``"118 metrics, 2 artifacts and the final status FINISHED"``: what it holds, in words."""
        counts = {"metric": len(self.metrics), "tag": len(self.tags), "artifact": len(self.artifacts)}
        parts = [f"{n} {what}{'s' if n != 1 else ''}" for what, n in counts.items() if n]
        if self.status:
            parts.append(f"the final status {self.status}")
        if len(parts) > 1:
            return f"{', '.join(parts[:-1])} and {parts[-1]}"
        return parts[0] if parts else "nothing"


def spool_path(run_dir: Path) -> Path:
    return Path(run_dir) / SPOOL_FILE


def as_rows(metrics: list[Metric]) -> list[tuple[str, float, int, int]]:
    return [(m.key, float(m.value), int(m.timestamp), int(m.step)) for m in metrics]


def read(run_dir: Path) -> Spool | None:
    """The spool kept in ``run_dir``, or None. A file that is not a spool is one :class:`ConfigError`."""
    path = spool_path(run_dir)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return Spool(
            run_id=str(raw["run_id"]),
            tracking_uri=str(raw["tracking_uri"]),
            metrics=[(str(k), float(v), int(t), int(s)) for k, v, t, s in raw.get("metrics", [])],
            tags={str(k): str(v) for k, v in raw.get("tags", {}).items()},
            artifacts=[(str(p), None if a is None else str(a)) for p, a in raw.get("artifacts", [])],
            status=raw.get("status"),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a readable record of undelivered MLflow data ({first_line(exc)})") from None


def write(run_dir: Path, spool: Spool) -> None:
    """Keep ``spool`` in ``run_dir`` (atomically); an empty spool removes the file."""
    path = spool_path(run_dir)
    if not spool:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(asdict(spool)))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def find(paths: list[Path]) -> Iterator[Path]:
    """The run folders holding a spool: each of ``paths`` that holds one, and every one below them."""
    for path in paths:
        if spool_path(path).is_file():
            yield path
        else:
            yield from sorted(p.parent for p in Path(path).rglob(SPOOL_FILE))


def _local_artifact_folder(client: MlflowClient, run_id: str) -> Path | None:
    uri = client.get_run(run_id).info.artifact_uri
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return Path(uri) if parsed.scheme == "" else None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def deliver(client: MlflowClient, spool: Spool) -> Spool:
    """Send ``spool`` to its run; returns what is left (the artifacts that could not be written).

    Metric and tag failures raise (the server is unreachable or refuses: the caller keeps the spool
    as it was). Free space is checked before each write to a local artifact store (the size of
    what is written plus 16 MiB)."""
    run_id = spool.run_id
    held: dict[str, int] = {}
    for key in dict.fromkeys(k for k, *_ in spool.metrics):
        held[key] = max((int(m.step) for m in client.get_metric_history(run_id, key)), default=-1)
    fresh = [Metric(k, v, t, s) for k, v, t, s in spool.metrics if s > held[k]]
    for start in range(0, len(fresh), BATCH):
        client.log_batch(run_id, metrics=fresh[start : start + BATCH])
    if spool.tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in spool.tags.items()])
    left: list[tuple[str, str | None]] = []
    reasons: list[str] = []
    folder = _local_artifact_folder(client, run_id) if spool.artifacts else None
    for local, artifact_path in spool.artifacts:
        path = Path(local)
        if not path.exists():
            continue  # removed since (a pruned checkpoint): nothing left to send
        try:
            if folder is not None:
                check_free_space(folder, _size(path) + SPACE_MARGIN, f"the artifact {path.name}")
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=artifact_path)
            else:
                client.log_artifact(run_id, str(path), artifact_path=artifact_path)
        except Exception as exc:  # a full or unwritable artifact store: keep it for later
            if folder is not None:
                _remove_partial(folder, path, artifact_path)
            left.append((local, artifact_path))
            reasons.append(f"{path.name}: {first_line(exc)}"[:300])
    if left:
        client.set_tag(run_id, UNDELIVERED_TAG, "; ".join(reasons)[:5000])
    elif spool.artifacts:
        try:
            client.delete_tag(run_id, UNDELIVERED_TAG)
        except Exception:  # the tag was never set
            pass
    if spool.status:
        client.set_terminated(run_id, spool.status)
    return Spool(run_id, spool.tracking_uri, artifacts=left)


def _remove_partial(folder: Path, path: Path, artifact_path: str | None) -> None:
    """Remove what a failed artifact write left in a local artifact store (it will be written whole later)."""
    target = folder / (artifact_path or "") if path.is_dir() else folder / (artifact_path or "") / path.name
    if target.resolve() != folder.resolve() and target.exists():
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
