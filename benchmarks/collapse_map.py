"""Where LeJEPA collapses in λ × batch size: the measurement behind the collapse warning.

For every (λ, N) cell, trains resnet10t on fashion-mnist-shifted (the quickstart's data and
recipe: 32 px, 2 global views, 256 slices, lr 2e-3) for a fixed number of steps of batch N,
then records
  - the collapse ratio: mean training SIGReg of the last 10 steps over the EP of a constant
    column at the same N (:func:`lejepa.health.collapse_ratio`; 1 = constant, ~0 = Gaussian),
  - the projector's effective rank over its dimension, on one batch of N training images,
  - the kNN top-1 of the backbone features (2,000 train / 1,000 test items), beside the
    random-init backbone's.
Writes collapse_map.csv, collapse_map.md and collapse_map.png (the ratio over λ × N, with the
verdict boundary) to ``--out``.

    .venv/bin/python benchmarks/collapse_map.py --out benchmarks/results/collapse_map
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch

from lejepa.config import load_config
from lejepa.data import build_datasets
from lejepa.health import (
    COLLAPSED,
    COLLAPSED_RATIO,
    DIMENSIONAL,
    DIMENSIONAL_RANK,
    HEALTHY,
    LAMBDA_BATCH_MIN,
    collapse_ratio,
    effective_rank,
    verdict,
)
from lejepa.probes import knn_accuracy
from lejepa.trainer import Trainer

TESTBED = [
    "tracking.enabled=false",
    "data.name=fashion-mnist-shifted",
    "data.placements=1",
    "data.train_size=4000",
    "data.test_size=2000",
    "views.local_views=0",
    "model.proj_hidden=256",
    "model.proj_dim=64",
    "loss.num_slices=256",
]
"""The small Fashion-MNIST testbed of the health measures (also benchmarks/health_overhead.py's)."""
BASE = [*TESTBED, "train.out_dir=/tmp/lejepa-collapse-map", "optim.lr=2e-3"]


def knn(trainer: Trainer) -> float:
    train = torch.utils.data.Subset(trainer.data.train, range(0, len(trainer.data.train), 2))
    test = torch.utils.data.Subset(trainer.data.test, range(0, len(trainer.data.test), 2))
    return knn_accuracy(*trainer.features(train), *trainer.features(test), k=trainer.cfg.train.eval_knn_k)


def cell(lam: float, n: int, steps: int, data, overrides: list[str]) -> dict[str, float]:
    per_epoch = len(data.train) // n  # the loader drops the last partial batch
    epochs = math.ceil(steps / per_epoch)
    cfg = load_config(
        None,
        [
            *BASE,
            f"loss.lam={lam}",
            f"optim.batch_size={n}",
            f"train.epochs={epochs}",
            f"optim.warmup_epochs={min(10 / per_epoch, epochs)}",
            *overrides,
        ],
    )
    trainer = Trainer(cfg, [], data=data)
    start = time.perf_counter()
    sigregs: list[float] = []
    done = 0
    for epoch in range(epochs):
        trainer.sampler.set_epoch(epoch)
        for images, labels in trainer.loader:
            if done == steps:
                break
            loss, _, reg, *_ = trainer._train_step(images, labels)
            if not math.isfinite(float(loss)):
                return {
                    "lam": lam,
                    "batch": n,
                    "steps": done,
                    "collapse_ratio": float("nan"),
                    "proj_rank": float("nan"),
                    "knn": float("nan"),
                    "seconds": time.perf_counter() - start,
                }
            sigregs.append(float(reg))
            done += 1
    seconds = time.perf_counter() - start
    images = torch.stack([data.train[i][0] for i in range(n)])
    with torch.no_grad():
        views = trainer.views(images, trainer.view_gen).global_views
        _, proj = trainer.model([views[0]])
    tail = sigregs[-10:]
    return {
        "lam": lam,
        "batch": n,
        "steps": done,
        "collapse_ratio": collapse_ratio(sum(tail) / len(tail), n, cfg.loss.t_max, cfg.loss.knots),
        "proj_rank": effective_rank(proj[0]) / min(proj[0].shape),
        "knn": knn(trainer),
        "seconds": seconds,
    }


def table(rows: list[dict[str, float]], key: str, fmt: str) -> str:
    lams = sorted({r["lam"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    lines = ["| λ \\ N | " + " | ".join(str(int(b)) for b in batches) + " |", "|---" * (len(batches) + 1) + "|"]
    for lam in lams:
        cells = []
        for b in batches:
            hit = [r for r in rows if r["lam"] == lam and r["batch"] == b]
            cells.append(format(hit[0][key], fmt) if hit else "")
        lines.append(f"| {lam:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_of(row: dict[str, float]) -> str:
    return verdict(row["collapse_ratio"], row["proj_rank"])


def plot(rows: list[dict[str, float]], path: Path) -> None:
    """The collapse ratio over λ × N; each cell names its verdict; the dashed line is λ·N = 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lams = sorted({r["lam"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    grid = np.full((len(lams), len(batches)), np.nan)
    labels = {}
    for r in rows:
        i, j = lams.index(r["lam"]), batches.index(r["batch"])
        grid[i, j] = r["collapse_ratio"]
        labels[i, j] = {HEALTHY: "", DIMENSIONAL: "\ndim.", COLLAPSED: "\ncollapsed"}.get(verdict_of(r), "\n?")
    fig, ax = plt.subplots(figsize=(6.5, 5))
    im = ax.imshow(grid, origin="lower", cmap="magma_r", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(batches)), [str(int(b)) for b in batches])
    ax.set_yticks(range(len(lams)), [f"{x:g}" for x in lams])
    ax.set_xlabel("batch size N")
    ax.set_ylabel("λ")
    for (i, j), text in labels.items():
        ax.text(
            j, i, f"{grid[i, j]:.2f}{text}", ha="center", va="center", color="white" if grid[i, j] > 0.5 else "black", fontsize=8
        )
    # λ·N = 1 in index coordinates: interpolate log λ over the rows, log N over the columns
    xs = np.linspace(0, len(batches) - 1, 50)
    lam_line = LAMBDA_BATCH_MIN / np.exp(np.interp(xs, range(len(batches)), np.log(batches)))
    ax.plot(
        xs,
        np.interp(np.log(lam_line), np.log(lams), range(len(lams))),
        "c--",
        lw=2,
        label=f"λ·N = {LAMBDA_BATCH_MIN:g} (warning below)",
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.colorbar(im, label="collapse ratio (SIGReg / constant column)")
    ax.set_title(f"Collapse map (collapsed: ratio ≥ {COLLAPSED_RATIO}; dim.: projector rank < {DIMENSIONAL_RANK})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lams", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03, 0.1, 0.2])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--from-csv", type=Path, help="redraw the tables and plot from a collapse_map.csv")
    parser.add_argument("overrides", nargs="*", help="config key=value for every cell")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_csv:
        with open(args.from_csv) as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        return report(rows, args.out, int(rows[0]["steps"]), rows[0]["random_init_knn"])
    data = build_datasets(load_config(None, [*BASE, *args.overrides]).data)
    random_knn = knn(Trainer(load_config(None, [*BASE, *args.overrides]), [], data=data))
    print(f"random-init resnet10t kNN: {random_knn:.3f}", flush=True)
    rows = []
    for lam in args.lams:
        for n in args.batches:
            row = cell(lam, n, args.steps, data, args.overrides)
            row["random_init_knn"] = random_knn
            rows.append(row)
            print(
                f"λ={lam:g} N={n}: collapse ratio {row['collapse_ratio']:.3f}, projector rank "
                f"{row['proj_rank']:.2f}, kNN {row['knn']:.3f} ({row['seconds']:.0f} s)",
                flush=True,
            )
            with open(args.out / "collapse_map.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    report(rows, args.out, args.steps, random_knn)


def report(rows: list[dict[str, float]], out: Path, steps: int, random_knn: float) -> None:
    for r in rows:
        r["verdict"] = verdict_of(r)
    text = (
        f"# Collapse map: resnet10t, fashion-mnist-shifted, {steps} steps per cell\n\n"
        f"Verdicts with today's thresholds (collapsed: ratio ≥ {COLLAPSED_RATIO}; dimensional collapse: "
        f"projector rank < {DIMENSIONAL_RANK} of min(N, D)). Random-init kNN: {random_knn:.3f}.\n\n"
        f"## Verdict\n\n{table(rows, 'verdict', 's')}\n\n"
        f"## Collapse ratio\n\n{table(rows, 'collapse_ratio', '.2f')}\n\n"
        f"## Projector effective rank / min(N, dimension)\n\n{table(rows, 'proj_rank', '.2f')}\n\n"
        f"## kNN top-1\n\n{table(rows, 'knn', '.3f')}\n\n![collapse map](collapse_map.png)\n"
    )
    (out / "collapse_map.md").write_text(text)
    plot(rows, out / "collapse_map.png")
    print(text)


if __name__ == "__main__":
    main()
