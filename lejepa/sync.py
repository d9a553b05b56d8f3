"""``lejepa sync``: deliver to MLflow what runs kept in their folders (:mod:`lejepa.spool`) while
the tracking store was unreachable, each run under its folder's lock (a live run delivers its own)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lejepa.errors import ConfigError, LejepaError, first_line


def _cmd_sync(args: argparse.Namespace) -> int:
    paths = [Path(p).expanduser().resolve() for p in args.paths]
    for path in paths:
        if not path.is_dir():
            raise ConfigError(f"{path}: no such folder (give run folders, or a folder holding them)")
    from lejepa import spool
    from lejepa.locks import ProcessLock
    from lejepa.preflight import PreflightError, check_tracking_uri
    from lejepa.record import RUN_LOCK

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


def register_sync(sub: argparse._SubParsersAction) -> None:
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
