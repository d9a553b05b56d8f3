"""Benchmark: does the LeJEPA loss pick checkpoints as well as labels would? (issue 7)

Trains a sweep of ``len(archs) × len(lams) × len(lrs)`` runs (default 3 × 4 × 2 = 24) on
digits-shifted on CPU — real :class:`lejepa.trainer.Trainer` runs logged as children of one MLflow
sweep run, the schema the Ray Tune sweep layer writes — or reads an existing sweep
(``--sweep NAME``), then prints Spearman ρ and Kendall τ (95% bootstrap intervals) against the
frozen linear probe for the raw loss, loss/λ^0.4 and loss/λ^α̂ (α̂ out of fold), RankMe, LiDAR
and α-ReQ, pooled and per architecture; each score's pick with its regret and rank; and the
criteria's cost against the linear probe. Writes the Markdown report to ``--out``.

    .venv/bin/python benchmarks/selection.py --out bench-selection            # train and analyse
    .venv/bin/python benchmarks/selection.py --sweep NAME --tracking-uri URI    # analyse a sweep
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from datetime import datetime
from pathlib import Path

from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analysis.cli import DEFAULT_SCORE  # noqa: E402
from analysis.criteria import evaluate_checkpoints  # noqa: E402
from analysis.health import SAFE, replay_pruning  # noqa: E402
from analysis.loader import load_sweep  # noqa: E402
from analysis.report import analyse, health_comparison, markdown_table, terminal_table, write_report  # noqa: E402
from analysis.selection import select  # noqa: E402
from lejepa.config import load_config  # noqa: E402
from lejepa.errors import TrainingDiverged  # noqa: E402
from lejepa.record import (  # noqa: E402
    FINISHED,
    KIND_SWEEP,
    KIND_TAG,
    KIND_TRIAL,
    SWEEP_TAG,
    TRACKING_DB,
    TRIAL_ID_TAG,
    sqlite_uri,
)
from lejepa.tracking import MLflowCallback, get_or_create_experiment  # noqa: E402
from lejepa.trainer import Trainer  # noqa: E402

# Small enough for 24 runs on a 2-core CPU in about half an hour: the timm test_* nets at 16 px
# with their standard 4x stem, one thread per run (two threads thrash a busy 2-core machine).
BASE = [
    "data.name=digits-shifted",
    "data.resolution=16",
    "data.placements=2",
    "model.small_stem=false",
    "model.proj_hidden=64",
    "model.proj_dim=32",
    "views.global_views=2",
    "views.local_views=2",
    "loss.num_slices=256",
    "optim.batch_size=128",
    "optim.warmup_epochs=1",
    "train.epochs=6",
    "train.keep_checkpoints=3",
    "train.log_every=5",
    "train.eval_probe_epochs=30",
    "train.threads=1",
]
ARCHS = ["test_resnet", "test_efficientnet", "test_convnext"]
LAMS = [0.005, 0.02, 0.1, 0.5]
LRS = [5e-4, 3e-3]


def train_sweep(
    name: str,
    trials: list[list[str]],
    tracking_uri: str,
    out_dir: Path,
    experiment: str = "lejepa",
    callback=MLflowCallback,
    log=print,
) -> str:
    """Train every override list of ``trials`` as a child run of a new sweep parent run; its id.

    Tags follow the sweep layer's schema (:mod:`lejepa.record`: kind, sweep and trial id);
    the trial overrides are logged on the parent as ``spec.yaml``. Diverged trials are kept (the
    callback tags them) and the sweep goes on.
    """
    client = MlflowClient(tracking_uri)
    exp = get_or_create_experiment(client, experiment, tracking_uri)
    parent = client.create_run(exp, run_name=name, tags={KIND_TAG: KIND_SWEEP, SWEEP_TAG: name}).info.run_id
    client.log_dict(parent, {"name": name, "trials": trials}, "spec.yaml")
    for i, overrides in enumerate(trials):
        trial = f"{i:03d}"
        cfg = load_config(None, [*overrides, f"train.out_dir={out_dir}", f"train.run_name={name}-{trial}"])
        tags = {KIND_TAG: KIND_TRIAL, SWEEP_TAG: name, TRIAL_ID_TAG: trial}
        tracker = callback(tracking_uri, experiment, run_name=f"{name}-{trial}", parent_run_id=parent, tags=tags)
        start = time.perf_counter()
        try:
            final = Trainer(cfg, [tracker], run_dir=out_dir / name / trial).fit()
            log(f"[{i + 1}/{len(trials)}] {' '.join(overrides[-3:])}: {final} ({time.perf_counter() - start:.0f}s)")
        except TrainingDiverged as exc:
            log(f"[{i + 1}/{len(trials)}] {' '.join(overrides[-3:])}: {exc}")
    client.set_terminated(parent, FINISHED)
    return parent


def pruning_figures(a, patience: int, score: str = DEFAULT_SCORE) -> str:
    """Replay ``prune_collapsed: patience`` on the full sweep: trial-epochs not run, and the pick of
    the healthy-only ``score`` among what the pruned sweep would have left, against the full oracle."""
    kept, runs = replay_pruning(a.epochs, patience)
    saved = int((runs["epochs_full"] - runs["epochs_run"]).sum())
    total = int(runs["epochs_full"].sum())
    key = SAFE + score
    survivors = a.candidates.merge(kept[["run_id", "epoch"]], on=["run_id", "epoch"])
    full, pruned = select(a.candidates, key, a.pick_acc), select(survivors, key, a.pick_acc)
    lines = [
        f"\nlabel-free pruning replayed (prune_collapsed: {patience}): {int(runs['stopped_at'].notna().sum())} "
        f"of {len(runs)} runs stopped, {saved} of {total} trial-epochs not run ({100 * saved / total:.0f}% of the "
        f"compute, excluding final evaluations)"
    ]
    for label, pick in (("full sweep", full), ("pruned sweep", pruned)):
        if pick is not None:
            regret = 100 * (full.oracle_accuracy - pick.accuracy)
            lines.append(
                f"  {label}: {a.label(key)} picks {pick.trial} epoch {pick.epoch} at "
                f"{100 * pick.accuracy:.2f}%, regret {regret:.2f} pts against the full sweep's oracle"
            )
    return "\n".join(lines)


def grid(archs: list[str], lams: list[float], lrs: list[float], base: list[str] = BASE) -> list[list[str]]:
    """The trial overrides: ``base`` plus every (arch, λ, lr)."""
    return [[*base, f"model.arch={a}", f"loss.lam={lam}", f"optim.lr={lr}"] for a, lam, lr in itertools.product(archs, lams, lrs)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", help="analyse this existing sweep (name, parent run id or experiment) instead of training")
    p.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///<out>/mlflow.db)")
    p.add_argument("--out", default="bench-selection", help="folder for runs, store and report")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--lams", default=",".join(map(str, LAMS)))
    p.add_argument("--lrs", default=",".join(map(str, LRS)))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides for every run")
    p.add_argument("--no-criteria", action="store_true", help="skip RankMe / LiDAR / α-ReQ")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument(
        "--final-only",
        action="store_true",
        help="candidates are the runs' final checkpoints only (criteria and frozen probe on those)",
    )
    p.add_argument(
        "--prune-patience",
        type=int,
        default=2,
        help="replay label-free pruning (prune_collapsed) with this patience on the full sweep",
    )
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or sqlite_uri(out / TRACKING_DB)
    name = args.sweep
    if name is None:
        name = f"bench-selection-{datetime.now():%Y%m%d-%H%M%S}"
        trials = grid(
            args.archs.split(","),
            [float(v) for v in args.lams.split(",")],
            [float(v) for v in args.lrs.split(",")],
            BASE + args.set,
        )
        print(f"training {len(trials)} runs into sweep {name} ({uri})", flush=True)
        start = time.perf_counter()
        train_sweep(name, trials, uri, out / "runs", log=lambda m: print(m, flush=True))
        print(f"sweep trained in {time.perf_counter() - start:.0f}s", flush=True)
    sweep = load_sweep(name, uri)
    if args.final_only:
        sweep.epochs.loc[~sweep.epochs["is_final"], ["checkpoint", "checkpoint_uri"]] = None
    criteria = None
    if not args.no_criteria:
        paths = sweep.checkpoints["checkpoint"].dropna().tolist()
        criteria = evaluate_checkpoints(paths, log=lambda m: print(m, flush=True))
    a = analyse(sweep, criteria, n_boot=args.bootstrap)
    report = write_report(a, out / "report")
    print()
    print(terminal_table(a))
    if a.correlations is not None:
        print("\nper architecture (Spearman ρ / Kendall τ):")
        table = a.correlations.assign(score=a.correlations["score"].map(a.label))
        print(table.pivot(index="score", columns="group", values="rho").round(3).to_string())
        print(table.pivot(index="score", columns="group", values="tau").round(3).to_string())
        print(
            f"\nfitted α: {a.alpha_scheme}; per fold: "
            + ", ".join(f"{f}={v:.2f}" for f, v in a.alphas.groupby("fold")["alpha"].first().items())
            + f"; in-sample α̂ = {a.alpha_in_sample:.2f}"
        )
    if criteria is not None:
        from analysis.criteria import cost_table

        print("\ncost per checkpoint:\n" + cost_table(criteria).round(3).to_string(index=False))
    print("\nold scores and their healthy-only twins (pooled over all runs; ruled-out runs rank last):")
    print(markdown_table(health_comparison(a)))
    if a.pick_acc is not None:
        print(pruning_figures(a, args.prune_patience))
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
