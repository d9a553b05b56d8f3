"""The stability walk: does every catalog architecture learn under LeJEPA at a small budget?

The paper trained every timm model under 20 M parameters on ImageNet-10 and found all of them
stable. Here the walk is a sweep of this platform (``sweeps/stability.yaml``: every runnable
catalog entry under 20 M parameters, λ = 0.05, the same short budget on fashion-mnist-shifted at
32 px), and a second sweep (``sweeps/stability_seeds.yaml``) trains a few architectures with 3
seeds to measure the seed-to-seed spread. This script reads both from MLflow and writes, per
architecture: health verdict, final loss, frozen linear probe after training and at random init
(``train.eval_at_init``: the same run's untrained backbone, same data and probe), the gain,
kNN, images/s, wall time.

An architecture *learns* when its probe gain over its own random init exceeds the seed-to-seed
spread: the pooled standard deviation of the trained probe over the seeds of the seeds sweep
(the stricter largest max − min is reported beside it). Unhealthy runs (collapsed, dimensional
collapse, diverged) never count as learning.

    lejepa sweep sweeps/stability_seeds.yaml --name stability_seeds --tracking-uri sqlite:////abs/mlflow.db
    lejepa sweep sweeps/stability.yaml --name stability_walk --tracking-uri sqlite:////abs/mlflow.db
    # Ctrl-C, then: lejepa sweep --resume stability_walk (same --storage)
    .venv/bin/python benchmarks/stability.py --walk stability_walk --seeds stability_seeds \\
        --tracking-uri sqlite:////abs/mlflow.db --out benchmarks/results/stability

Writes ``<out>/stability.csv``, ``<out>/seeds.csv``, ``<out>/stability.md`` and
``<out>/stability.png`` (probe gain per architecture, grouped by family, the spread as a dashed
line). A part walked in an earlier session, whose MLflow store is gone, is given by the CSVs its
report wrote: ``--walk part1/stability.csv stability_walk2 --seeds part1/seeds.csv``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analysis.health import add_health  # noqa: E402
from lejepa.catalog import get_arch  # noqa: E402
from lejepa.errors import LejepaError  # noqa: E402

UNFINISHED = ("running", "killed", "scheduled", "interrupted")
"""Run states that are no outcome yet (``lejepa sweep --resume`` continues them)."""
MEASURES = ["status", "verdict", "loss", "collapse_ratio", "proj_rank", "init_probe", "probe"]
"""A trial's outcome columns, here and in benchmarks/stability_direct.py."""
COSTS = ["init_knn", "knn", "images_per_s", "wall_s"]
"""kNN accuracies and costs, here and in benchmarks/stability_direct.py."""
COLUMNS = ["arch", "family", "params", "adaptation", "sweep", "lr", *MEASURES, "gain", *COSTS, "learns", "learns_strict"]


def walk_rows(ref: str, tracking_uri: str) -> pd.DataFrame:
    """One row per trial of sweep ``ref``: finished ones with their metrics, the others (diverged,
    failed) with their status only; trials still running or interrupted are no outcome yet."""
    from analysis.loader import load_sweep  # MLflow only here: benchmarks/stability_direct.py runs without it

    sweep = load_sweep(ref, tracking_uri)
    epochs = add_health(sweep.epochs)
    speed = epochs.groupby("run_id")["images_per_sec"].median()
    rows = []
    for r in epochs[epochs["is_final"]].itertuples():
        rows.append(
            {
                "run_id": r.run_id,
                "sweep": sweep.name,
                "arch": r.arch,
                "lr": r.lr,
                "status": r.status,
                "verdict": r.verdict,
                "loss": r.loss,
                "collapse_ratio": r.collapse_ratio,
                "proj_rank": r.proj_rank,
                "init_probe": r.init_linear_probe_acc,
                "probe": r.linear_probe_acc,
                "init_knn": r.init_knn_acc,
                "knn": r.knn_acc,
                "images_per_s": speed.get(r.run_id, np.nan),
                "wall_s": r.wall_s,
            }
        )
    for run in sweep.excluded:
        status = str(run["status"])
        if status.split(" ")[0] in UNFINISHED:  # an interrupted part of the walk: resumed later, not an outcome
            continue
        rows.append(
            {
                "run_id": run["run_id"],
                "sweep": sweep.name,
                "arch": run["arch"],
                "status": status.split(" ")[0],
                "verdict": "diverged" if status.startswith("diverged") else status,
            }
        )
    out = pd.DataFrame(rows)
    for col in ("lr", "loss", "collapse_ratio", "proj_rank", "init_probe", "probe", "init_knn", "knn", "images_per_s", "wall_s"):
        out[col] = pd.to_numeric(out.get(col), errors="coerce")
    out["gain"] = out["probe"] - out["init_probe"]
    return out


def latest_per_arch(walks: list[pd.DataFrame]) -> pd.DataFrame:
    """The walk parts together, one row per architecture: a later part's trial of an architecture
    supersedes an earlier one's (a rerun with, e.g., its family's learning rate)."""
    return pd.concat(walks, ignore_index=True).drop_duplicates("arch", keep="last").reset_index(drop=True)


def seed_spread(seeds: pd.DataFrame) -> tuple[float, float, pd.DataFrame]:
    """(spread, strict spread, per-architecture table) of the trained probe over training seeds:
    the pooled standard deviation (root mean of the per-architecture variances), and the largest
    max − min of any architecture."""
    done = seeds[seeds["probe"].notna()]
    table = done.groupby("arch").agg(
        seeds=("probe", "size"),
        probe_mean=("probe", "mean"),
        probe_sd=("probe", "std"),
        probe_range=("probe", lambda s: s.max() - s.min()),
        gain_mean=("gain", "mean"),
        gain_min=("gain", "min"),
        init_range=("init_probe", lambda s: s.max() - s.min()),
    )
    table = table[table["seeds"] >= 2]
    if table.empty:
        raise LejepaError("the seeds sweep has no architecture with 2 or more finished seeds")
    return (*spread_of(table), table.reset_index())


def spread_of(table: pd.DataFrame) -> tuple[float, float]:
    """(pooled standard deviation, largest max − min) of a per-architecture seeds table."""
    return float(np.sqrt((table["probe_sd"] ** 2).mean())), float(table["probe_range"].max())


def is_csv(ref: str) -> bool:
    """A walk part or seeds table given as the CSV an earlier report wrote (not a sweep in MLflow)."""
    return ref.endswith(".csv")


def load_walk(ref: str, tracking_uri: str | None) -> pd.DataFrame:
    """One walk part: a sweep read from MLflow, or an earlier report's ``stability.csv``."""
    if is_csv(ref):
        if not Path(ref).is_file():
            raise LejepaError(f"walk part {ref} does not exist")
        part = pd.read_csv(ref)
        return part.assign(**{col: part.get(col, default) for col, default in (("sweep", ref), ("lr", np.nan))})
    if tracking_uri is None:
        raise LejepaError(f"--tracking-uri is needed to read sweep {ref!r} (or give an earlier part's stability.csv)")
    return walk_rows(ref, tracking_uri)


def load_seeds(ref: str, tracking_uri: str | None) -> tuple[float, float, pd.DataFrame]:
    """(spread, strict spread, table) from the seeds sweep, or from an earlier report's ``seeds.csv``."""
    if is_csv(ref):
        if not Path(ref).is_file():
            raise LejepaError(f"seeds table {ref} does not exist")
        table = pd.read_csv(ref)
        return (*spread_of(table), table)
    return seed_spread(load_walk(ref, tracking_uri))


def describe(walk: pd.DataFrame, spread: float, strict: float) -> pd.DataFrame:
    """``walk`` with catalog columns (family, params, adaptation), ``learns`` (healthy and gain >
    ``spread``) and ``learns_strict`` (healthy and gain > ``strict``)."""
    infos = {}
    for arch in walk["arch"].unique():
        try:
            infos[arch] = get_arch(arch)
        except LejepaError:
            infos[arch] = None
    walk = walk.assign(
        family=[infos[a].family if infos[a] else "?" for a in walk["arch"]],
        params=[infos[a].params if infos[a] else np.nan for a in walk["arch"]],
        adaptation=[infos[a].notes if infos[a] else "" for a in walk["arch"]],
    )
    healthy = walk["verdict"] == "healthy"
    walk["learns"] = healthy & (walk["gain"] > spread)
    walk["learns_strict"] = healthy & (walk["gain"] > strict)
    return walk.sort_values(["family", "params", "arch"]).reset_index(drop=True)


def outcome(row) -> str:
    """``learns``, ``no gain`` or the verdict of a run that went wrong (the catalog's ``walk_outcome``)."""
    if row.verdict != "healthy":
        return str(row.verdict)
    return "learns" if row.learns else "no gain"


def update_catalog(walk: pd.DataFrame, path: Path | None = None, budget: str = "") -> int:
    """Write each walked architecture's outcome and gain into the catalog CSV (default: the
    packaged one; other columns and rows untouched): the ``walk_*`` columns, or ``gpu_walk_*``
    with ``budget="gpu"``; returns how many rows changed."""
    from dataclasses import replace

    from lejepa.catalog import CATALOG_CSV, ArchInfo, load_catalog
    from lejepa.catalog.build import write_csv

    results = {r.arch: r for r in walk.itertuples()}
    entries, changed = [], 0
    if path is not None and path.is_file():  # that file's rows, not the packaged catalog's
        with path.open(newline="") as fh:
            current = [ArchInfo.from_row(row) for row in csv.DictReader(fh)]
    else:
        current = load_catalog()
    for a in current:
        r = results.get(a.name)
        if r is not None:
            gain = round(float(r.gain), 4) if np.isfinite(r.gain) else None
            prefix = f"{budget}_walk" if budget else "walk"
            a, changed = replace(a, **{f"{prefix}_outcome": outcome(r), f"{prefix}_gain": gain}), changed + 1
        entries.append(a)
    write_csv(entries, path or CATALOG_CSV)
    return changed


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return "" if not np.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def markdown(walk: pd.DataFrame, spread: float, strict: float, seeds: pd.DataFrame, header: str) -> str:
    """The results page: targets, per-family summary, the seeds table, the per-architecture table."""
    done = walk[walk["probe"].notna()]
    unhealthy = walk[walk["verdict"] != "healthy"]
    families = done.groupby("family").agg(
        archs=("arch", "size"),
        learn=("learns", "sum"),
        gain_median=("gain", "median"),
        gain_min=("gain", "min"),
        probe_median=("probe", "median"),
    )
    share = done["learns"].mean() if len(done) else float("nan")
    lines = [
        header,
        "",
        f"- **Walked:** {len(done)} architectures with a final probe in {done['family'].nunique()} families "
        f"({len(walk)} trials; wall time {walk['wall_s'].sum() / 3600:.2f} h of trial time).",
        f"- **Unhealthy (collapsed, dimensional collapse, diverged, failed):** {len(unhealthy)}"
        + (f": {', '.join(f'{r.arch} ({r.verdict})' for r in unhealthy.itertuples())}" if len(unhealthy) else ""),
        f"- **Seed-to-seed spread** of the trained probe ({len(seeds)} architectures × "
        f"{int(seeds['seeds'].max())} seeds): pooled standard deviation {spread:.3f}; largest max − min "
        f"{strict:.3f}.",
        f"- **Learn** (healthy and probe gain over own random init > {spread:.3f}, the pooled standard "
        f"deviation): {int(done['learns'].sum())} of {len(done)} = {share:.0%} (target ≥ 90 %). With the "
        f"strict spread (gain > {strict:.3f}): {int(done['learns_strict'].sum())} of {len(done)} = "
        f"{done['learns_strict'].mean() if len(done) else float('nan'):.0%}.",
        "",
        "## Per family",
        "",
        "| family | archs | learn | median gain | min gain | median probe |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for fam, r in families.iterrows():
        lines.append(
            f"| {fam} | {int(r.archs)} | {int(r.learn)} | {r.gain_median:+.3f} | {r.gain_min:+.3f} | {r.probe_median:.3f} |"
        )
    lines += [
        "",
        "## Seed-to-seed spread",
        "",
        "| arch | seeds | probe mean | probe sd | probe max − min | random-init max − min | gain mean | gain min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in seeds.itertuples():
        lines.append(
            f"| {r.arch} | {r.seeds} | {r.probe_mean:.3f} | {r.probe_sd:.3f} | {r.probe_range:.3f} | "
            f"{r.init_range:.3f} | {r.gain_mean:+.3f} | {r.gain_min:+.3f} |"
        )
    lines += [
        "",
        "## Per architecture",
        "",
        "| arch | family | params | lr | verdict | loss | collapse | rank | random init | trained | gain | learns "
        "| images/s | wall s | adaptation |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in walk.itertuples():
        params = f"{r.params / 1e6:.1f}M" if np.isfinite(r.params) else ""
        lr = f"{r.lr:g}" if np.isfinite(r.lr) else ""
        lines.append(
            f"| {r.arch} | {r.family} | {params} | {lr} | {r.verdict} | {_fmt(r.loss)} | {_fmt(r.collapse_ratio, 2)} "
            f"| {_fmt(r.proj_rank, 2)} | {_fmt(r.init_probe)} | {_fmt(r.probe)} | "
            f"{'' if not np.isfinite(r.gain) else f'{r.gain:+.3f}'} | {'yes' if r.learns else 'NO'} | "
            f"{_fmt(r.images_per_s, 1)} | {_fmt(r.wall_s, 0)} | {r.adaptation} |"
        )
    return "\n".join(lines) + "\n"


def plot(walk: pd.DataFrame, spread: float, path: Path) -> None:
    """Horizontal bars: probe gain over random init per architecture, coloured and grouped by family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = walk[walk["gain"].notna()].sort_values(["family", "gain"])
    families = sorted(done["family"].unique())
    colours = dict(zip(families, plt.cm.tab20(np.linspace(0, 1, max(len(families), 2)))))
    fig, ax = plt.subplots(figsize=(8, max(4.0, 0.16 * len(done) + 1.5)))
    y = np.arange(len(done))
    ax.barh(
        y,
        done["gain"],
        color=[colours[f] for f in done["family"]],
        edgecolor=["black" if not ok else "none" for ok in done["learns"]],
    )
    ax.set_yticks(y, [f"{a} ({f})" for a, f in zip(done["arch"], done["family"])], fontsize=6)
    ax.axvline(spread, color="black", linestyle="--", linewidth=1, label=f"seed-to-seed sd {spread:.3f}")
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("frozen linear probe: trained − random init (fashion-mnist-shifted, 32 px)")
    ax.set_title("LeJEPA stability walk: probe gain per architecture")
    ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--walk",
        required=True,
        nargs="+",
        help="the walk's parts: sweeps (name, name prefix or parent run id) or an earlier report's "
        "stability.csv; a later part's trial of an architecture supersedes an earlier one's",
    )
    p.add_argument("--seeds", required=True, help="the seeds sweep, or an earlier report's seeds.csv")
    p.add_argument("--tracking-uri", help="the MLflow store of the sweeps (not needed for CSV parts)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stability")
    p.add_argument("--title", default="LeJEPA stability walk (CPU)")
    p.add_argument(
        "--update-catalog",
        action="store_true",
        help="write each architecture's outcome and gain into lejepa/catalog/architectures.csv",
    )
    args = p.parse_args(argv)
    try:
        spread, strict, seeds = load_seeds(args.seeds, args.tracking_uri)
        walk = describe(latest_per_arch([load_walk(ref, args.tracking_uri) for ref in args.walk]), spread, strict)
    except LejepaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    walk[COLUMNS].to_csv(args.out / "stability.csv", index=False, float_format="%.4f")
    seeds.to_csv(args.out / "seeds.csv", index=False, float_format="%.4f")
    page = markdown(
        walk,
        spread,
        strict,
        seeds,
        f"# {args.title}\n\nGenerated by `benchmarks/stability.py` from walk parts "
        f"{', '.join(f'`{w}`' for w in args.walk)} and seeds `{args.seeds}`.",
    )
    (args.out / "stability.md").write_text(page)
    plot(walk, spread, args.out / "stability.png")
    print(page.split("## Per architecture")[0])
    print(f"wrote {args.out / 'stability.csv'}, stability.md, stability.png")
    if args.update_catalog:
        print(f"catalog: {update_catalog(walk)} architectures' walk outcome updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
