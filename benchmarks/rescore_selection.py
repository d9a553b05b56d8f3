"""Re-score a finished selection benchmark with the health-aware scores (issue 13).

Reads the ``epochs.csv`` a selection report wrote (one row per run × epoch with losses, SIGReg,
probe accuracies and, where measured, RankMe / LiDAR / α-ReQ), adds the run health that the
sweep did not log (collapse ratio = SIGReg over the EP of a constant column at the sweep's batch
size; no projector rank, so no ``dimensional collapse`` verdict) and prints, per score, pooled
Spearman ρ and Kendall τ against the frozen probe and the regret of the pick, for the old score
and its healthy-only twin side by side.

    .venv/bin/python benchmarks/rescore_selection.py benchmarks/results/selection_cpu/epochs.csv --batch-size 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analysis.loader import Sweep  # noqa: E402
from analysis.report import analyse, health_comparison, markdown_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("epochs_csv", type=Path)
    p.add_argument("--batch-size", type=int, required=True, help="the sweep's optim.batch_size")
    p.add_argument("--views", default="2+0", help="global+local views of the sweep (default 2+0)")
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    epochs = pd.read_csv(args.epochs_csv)
    epochs = epochs.drop(columns=[c for c in epochs if c.startswith("score.")] + ["alpha_fit"], errors="ignore")
    global_views, local_views = (int(v) for v in args.views.split("+"))
    epochs = epochs.assign(batch_size=args.batch_size, global_views=global_views, local_views=local_views)
    for col in ("rankme", "lidar", "alpha_req"):
        if col in epochs:
            epochs[f"score.{col}"] = epochs[col] if col != "alpha_req" else -(epochs[col] - 1).abs()
    a = analyse(Sweep(args.epochs_csv.parent.name, str(args.epochs_csv), None, epochs), n_boot=args.bootstrap)
    runs = a.runs
    print(
        f"{args.epochs_csv}: {len(runs)} runs, batch {args.batch_size}; verdicts: "
        + ", ".join(f"{n} {v}" for v, n in runs["verdict"].value_counts().items())
    )
    print(
        runs.groupby("lam")["collapse_ratio"]
        .agg(["min", "max"])
        .round(3)
        .rename(columns={"min": "collapse ratio min", "max": "max"})
        .to_string()
    )
    print()
    print(markdown_table(health_comparison(a)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
