"""``lejepa select SWEEP``: choose a checkpoint of a finished sweep without labels.

Prints the summary table and the chosen checkpoint (its folder, or its MLflow artifact URI
when the folder is not on this disk), writes the Markdown report, logs it on the sweep's parent
run, and with ``--register NAME`` adds the checkpoint to the MLflow model registry as a new
version of NAME (source ``runs:/<trial run>/<checkpoint artifact>``; a non-final checkpoint is
logged to its trial run first). With ``--criteria`` it prints one progress line per checkpoint
on stderr and keeps each checkpoint's criteria, as soon as they are computed, in the report
folder's ``criteria_cache.csv`` (:data:`~lejepa.record.CRITERIA_CACHE`): interrupted (Ctrl-C,
SIGTERM), it exits 130, and the same command resumes where it stopped. Published through the
``lejepa.commands`` entry-point group.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lejepa.errors import LejepaError, did_you_mean
from lejepa.preflight import check_tracking_uri, check_writable
from lejepa.record import (
    ARCH_TAG,
    CHECKPOINT_ARTIFACT,
    CHECKPOINTS_DIR,
    CRITERIA_CACHE,
    MODEL_EPOCH_TAG,
    MODEL_LAM_TAG,
    MODEL_SCORE_TAG,
    TRIAL_ID_TAG,
    sqlite_path,
)

if TYPE_CHECKING:  # pandas and MLflow load when the command runs, not with every `lejepa` command
    import pandas as pd
    from mlflow.entities.model_registry import ModelVersion

DEFAULT_SCORE = "loss"
"""The base score of the default pick: the training loss, compared only among healthy checkpoints
on one loss scale (its healthy-only twin ``safe_loss``, :mod:`analysis.health`; every ``--score``
picks through its twin, so an unhealthy checkpoint is never chosen). Of the loss-based scores it
was the best healthy-only twin over three benchmark sweeps (regret 0.0, 0.4 and 5.6 points
against 0.0, 7.6 and 13.2 for loss/λ^0.4; see benchmarks/results/selection_fashion)."""


def register_checkpoint(tracking_uri: str, row: pd.Series, name: str, score: str) -> ModelVersion:
    """Register the checkpoint of ``row`` (a candidate) as a new version of model ``name``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    if isinstance(row.get("checkpoint_uri"), str):
        artifact = CHECKPOINT_ARTIFACT
    else:
        folder = Path(row["checkpoint"])
        artifact = f"{CHECKPOINTS_DIR}/{folder.name}"
        client.log_artifacts(row["run_id"], str(folder), artifact_path=artifact)
    try:
        client.create_registered_model(name, description="LeJEPA checkpoints chosen by `lejepa select`")
    except MlflowException as exc:
        if "already exists" not in str(exc).lower():
            raise
    tags = {
        MODEL_SCORE_TAG: score,
        MODEL_EPOCH_TAG: str(row["epoch"]),
        ARCH_TAG: str(row["arch"]),
        TRIAL_ID_TAG: str(row["trial"]),
        MODEL_LAM_TAG: str(row["lam"]),
    }
    return client.create_model_version(name, f"runs:/{row['run_id']}/{artifact}", run_id=row["run_id"], tags=tags)


def check_store(uri: str) -> None:
    """A SQLite store must exist (reading must not create an empty one); a server must answer."""
    db = sqlite_path(uri)
    if db is not None and not Path(db).is_file():
        raise LejepaError(f"no MLflow store at {db}: pass --tracking-uri (or set MLFLOW_TRACKING_URI)")
    check_tracking_uri(uri)  # a truncated or foreign SQLite file, a server that is not MLflow: one line


def _cmd_select(args: argparse.Namespace) -> int:
    from analysis.criteria import CriteriaInterrupted, evaluate_checkpoints
    from analysis.health import SAFE
    from analysis.loader import load_sweep
    from analysis.report import LABELS, analyse, log_report, terminal_table, write_report
    from lejepa.record import default_tracking_uri

    args.score = args.score.removeprefix(SAFE)
    if args.score not in LABELS:
        raise LejepaError(f"unknown score {args.score!r}{did_you_mean(args.score, LABELS)}; choose one of: {', '.join(LABELS)}")
    if args.last_k < 1 or args.bootstrap < 0 or args.sample_size < 2 or args.lidar_images < 2:
        raise LejepaError("--last-k, --sample-size and --lidar-images must be ≥ 1, 2 and 2; --bootstrap ≥ 0")
    if args.out:  # before any work: a file in the way is one line, not a traceback at the end
        check_writable(args.out, "--out")
    uri = args.tracking_uri or default_tracking_uri("runs")
    check_store(uri)
    sweep = load_sweep(args.sweep, uri)
    out = Path(args.out or f"selection-{re.sub(r'[^A-Za-z0-9_.-]+', '_', sweep.name)}").resolve()
    check_writable(out, "report folder")  # before the criteria: it holds their cache
    criteria = None
    if args.criteria:
        paths = sweep.checkpoints["checkpoint"].dropna().tolist()
        if not paths:
            raise LejepaError("--criteria needs the checkpoint folders on this disk; none of the sweep's are")
        try:
            criteria = evaluate_checkpoints(
                paths,
                sample_size=args.sample_size,
                lidar_images=args.lidar_images,
                log=lambda m: print(m, file=sys.stderr, flush=True),
                cache=out / CRITERIA_CACHE,
            )
        except CriteriaInterrupted as stop:
            print(
                f"interrupted: {stop.kept} of {stop.total} checkpoints' criteria kept in {stop.cache}; "
                f"rerun the same command to resume",
                file=sys.stderr,
            )
            return 130
    analysis = analyse(sweep, criteria, last_k=args.last_k, n_boot=args.bootstrap)
    if args.score not in analysis.scores:
        need = "--criteria" if args.score in ("rankme", "lidar", "alpha_req") else "probe accuracy (labels) to fit α"
        raise LejepaError(f"score {args.score!r} is not available for this sweep: it needs {need}")
    if args.score not in set(analysis.selection.get("score", [])):
        raise LejepaError(
            f"no checkpoint of sweep {sweep.name!r} has a {analysis.label(args.score)} score "
            f"(are its checkpoint folders or artifacts missing?)"
        )
    key = SAFE + args.score
    if key not in set(analysis.selection.get("score", [])):
        print(terminal_table(analysis), file=sys.stderr)
        raise LejepaError(
            f"no checkpoint of sweep {sweep.name!r} is healthy (and on the compared loss scale): "
            f"nothing to select; raise loss.lam or optim.batch_size (see the ruled-out runs above)"
        )
    analysis.pick_score = key  # marked in the tables: the score that made the pick
    report = write_report(analysis, out)
    print(terminal_table(analysis))
    if not args.no_log:
        logged = log_report(analysis, out, key)
        print(
            f"report logged to run {sweep.parent_run_id} under selection/"
            if logged
            else "no sweep parent run: the report is not logged to MLflow"
        )
    pick = analysis.selection.set_index("score").loc[key]
    row = analysis.candidates[(analysis.candidates["run_id"] == pick.run_id) & (analysis.candidates["epoch"] == pick.epoch)].iloc[
        0
    ]
    if args.register:
        version = register_checkpoint(uri, row, args.register, key)
        print(f"registered: models:/{version.name}/{version.version}")
    print(f"selected by {analysis.label(key)}: {pick.trial} ({pick.arch}, λ={pick.lam:g}) epoch {pick.epoch}")
    if analysis.pick_acc is not None:
        from analysis.selection import EVIDENCE, random_regret

        print(
            f"  {EVIDENCE[analysis.pick_acc]}: {100 * pick.accuracy:.1f}% (oracle {pick.oracle_trial} epoch "
            f"{pick.oracle_epoch}: {100 * pick.oracle_accuracy:.1f}%; regret {pick.regret:.1f} pts, a random pick "
            f"{random_regret(analysis.candidates, analysis.pick_acc):.1f})"
        )
    print(f"report: {report}")
    print(f"checkpoint: {pick.checkpoint}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``select`` sub-command to the ``lejepa`` parser."""
    p = sub.add_parser(
        "select",
        help="choose a sweep's checkpoint without labels, with the evidence",
        description="Rank a sweep's checkpoints by a label-free score, print the chosen one, "
        "write a report (correlations with probe accuracy, regret of each score's "
        "pick) and log it on the sweep's parent run.",
    )
    p.add_argument("sweep", metavar="SWEEP", help="sweep name, sweep parent run id, or MLflow experiment name")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or runs/mlflow.db)")
    p.add_argument("--out", metavar="DIR", help="report folder (default: ./selection-<sweep>)")
    p.add_argument("--register", metavar="NAME", help="register the chosen checkpoint as a version of model NAME")
    p.add_argument(
        "--score",
        default=DEFAULT_SCORE,
        help="label-free score that picks, among healthy checkpoints only: loss (default: the "
        "training loss), loss_lastk, loss_lam (loss/λ^0.4), loss_lam_fit, rankme, lidar, alpha_req",
    )
    p.add_argument(
        "--criteria",
        action="store_true",
        help="also compute RankMe, LiDAR, α-ReQ and the frozen linear probe on every checkpoint on disk; "
        f"each checkpoint's are kept in the report folder's {CRITERIA_CACHE}, so rerunning an interrupted "
        "command computes only the rest",
    )
    p.add_argument(
        "--sample-size",
        type=int,
        default=1024,
        help="--criteria: unlabeled training images embedded per checkpoint (default 1024)",
    )
    p.add_argument("--lidar-images", type=int, default=128, help="--criteria: images × 8 augmentations for LiDAR (default 128)")
    p.add_argument("--last-k", type=int, default=3, help="epochs averaged by the loss_lastk score (default 3)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (default 1000)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")
    p.set_defaults(func=_cmd_select)
