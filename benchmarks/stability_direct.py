"""The stability walk run directly by the core trainer: several trainer processes share one device.

``lejepa sweep sweeps/stability.yaml`` is the walk as a sweep of this platform (Ray Tune, MLflow).
This script trains the same trials without Ray or MLflow, for a machine that has only PyTorch
and timm, such as a GPU lent for a few minutes: each of ``--workers`` processes takes the next
(architecture, seed) from a queue, trains it with ``sweeps/stability_base.yaml`` plus
``--set`` overrides (a larger budget on a GPU) and the family values of the walk spec's
``arch_overrides`` (``sweeps/stability.yaml``, as ``lejepa sweep`` applies them), and reports the same columns as
``benchmarks/stability.py``. Architectures are taken in the catalog's round-robin order, so a
walk cut short by ``--deadline`` still covers every family; 3 seeds of ``--seed-archs`` give
the seed-to-seed spread. Each finished trial is appended to ``<out>/trials.csv`` at once;
then the CSV, Markdown table and plot are written as by ``benchmarks/stability.py``.

    python benchmarks/stability_direct.py --workers 8 --deadline 300 \\
        --set optim.batch_size=256 data.train_size=10000 train.epochs=5 --out runs/stability_gpu
"""

from __future__ import annotations

import argparse
import csv
import functools
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (HERE, ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import stability  # noqa: E402  (benchmarks/stability.py: the report)

from lejepa.catalog import query  # noqa: E402
from lejepa.config import parse_override  # noqa: E402
from lejepa.errors import ConfigError, LejepaError, first_line  # noqa: E402
from lejepa.record import (  # noqa: E402
    COLLAPSE_RATIO,
    EPOCH_IMAGES_PER_SEC,
    EPOCH_LOSS,
    INIT_KNN_ACC,
    INIT_LINEAR_PROBE_ACC,
    KNN_ACC,
    LINEAR_PROBE_ACC,
    PROJ_RANK,
    STATUS_FAILED,
    STATUS_FINISHED,
    VERDICT,
    VERDICTS,
)

BASE = ROOT / "sweeps" / "stability_base.yaml"
SPEC = ROOT / "sweeps" / "stability.yaml"
SEEDS_SPEC = ROOT / "sweeps" / "stability_seeds.yaml"
TRIAL_COLUMNS = ["arch", "seed", *stability.MEASURES, *stability.COSTS, "lr", "error"]


@functools.cache
def seed_archs() -> tuple[str, ...]:
    """The seeds sweep's architectures (``model.arch`` of sweeps/stability_seeds.yaml), sorted."""
    from sweeps.spec import load_spec

    (arch,) = [p for p in load_spec(SEEDS_SPEC).space if p.key == "model.arch"]
    return tuple(sorted(arch.values))


@functools.cache
def _spec_arch_params() -> dict[str, dict]:
    from sweeps.spec import load_spec

    return load_spec(SPEC).arch_params


def family_overrides(arch: str) -> list[str]:
    """``key=value`` for the values the walk spec's ``arch_overrides`` set for ``arch`` (none: not listed)."""
    return [f"{key}={value}" for key, value in _spec_arch_params().get(arch, {}).items()]


def train_one(arch: str, seed: int, overrides: list[str], out: Path) -> dict:
    """One trial: the walk's base config with ``overrides``, then the family values of the walk
    spec; its row (status ``failed`` with the error's first line when training raised)."""
    from lejepa.callbacks import Callback
    from lejepa.config import load_config
    from lejepa.trainer import Trainer

    class Epochs(Callback):
        def __init__(self) -> None:
            self.last: dict[str, float] = {}
            self.speeds: list[float] = []

        def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
            self.last = metrics
            self.speeds.append(metrics[EPOCH_IMAGES_PER_SEC])

    row: dict = {"arch": arch, "seed": seed}
    start = time.perf_counter()
    try:
        cfg = load_config(
            BASE,
            [
                "tracking.enabled=false",
                f"train.out_dir={out}",
                "train.keep_checkpoints=1",
                *overrides,
                *family_overrides(arch),
                f"model.arch={arch}",
                f"train.seed={seed}",
            ],
        )
        row["lr"] = cfg.optim.lr
        epochs = Epochs()
        final = Trainer(cfg, [epochs], run_dir=out / f"{arch}-s{seed}").fit()
        last = epochs.last
        row.update(
            status=STATUS_FINISHED,
            verdict=VERDICTS[int(last[VERDICT])],
            loss=last[EPOCH_LOSS],
            collapse_ratio=last[COLLAPSE_RATIO],
            proj_rank=last[PROJ_RANK],
            init_probe=final.get(INIT_LINEAR_PROBE_ACC),
            probe=final[LINEAR_PROBE_ACC],
            init_knn=final.get(INIT_KNN_ACC),
            knn=final[KNN_ACC],
            images_per_s=statistics.median(epochs.speeds),
        )
    except Exception as exc:  # one architecture failing is an outcome of the walk, not its end
        row.update(status=STATUS_FAILED, verdict=STATUS_FAILED, error=f"{type(exc).__name__}: {first_line(exc, '')}"[:300])
    row["wall_s"] = time.perf_counter() - start
    return row


def _worker(tasks, results, overrides: list[str], out: str, deadline: float, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    while time.time() < deadline:
        try:
            arch, seed = tasks.get_nowait()
        except queue.Empty:
            return
        results.put(train_one(arch, seed, overrides, Path(out)))


def plan(max_params: str, seed_archs: tuple[str, ...], seeds: int, limit: int | None) -> list[tuple[str, int]]:
    """(arch, seed) tasks: seed 0 of every runnable architecture under ``max_params`` in round-robin
    family order, then the extra seeds of ``seed_archs``."""
    archs = [a.name for a in query(max_params=max_params, order="round-robin")][:limit]
    archs += [a for a in seed_archs if a not in archs]
    return [(a, 0) for a in archs] + [(a, s) for a in seed_archs for s in range(1, seeds)]


def run(
    tasks: list[tuple[str, int]],
    overrides: list[str],
    workers: int,
    deadline_s: float,
    out: Path,
    threads: int,
    append: bool = False,
) -> pd.DataFrame:
    """Train ``tasks`` in ``workers`` processes until done or ``deadline_s`` has passed (a trial
    already started finishes); rows are written to ``out/trials.csv`` as they come (after the
    rows already there when ``append``)."""
    ctx = mp.get_context("spawn")
    task_q, result_q = ctx.Queue(), ctx.Queue()
    for t in tasks:
        task_q.put(t)
    deadline = time.time() + deadline_s
    scratch = tempfile.mkdtemp(prefix="lejepa-walk-")
    procs = [ctx.Process(target=_worker, args=(task_q, result_q, overrides, scratch, deadline, threads)) for _ in range(workers)]
    for p in procs:
        p.start()
    rows: list[dict] = []
    out.mkdir(parents=True, exist_ok=True)
    trials_csv = out / "trials.csv"
    with open(trials_csv, "a" if append and trials_csv.exists() else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TRIAL_COLUMNS)
        if f.tell() == 0:
            writer.writeheader()
        while any(p.is_alive() for p in procs) or not result_q.empty():
            try:
                row = result_q.get(timeout=1.0)
            except queue.Empty:
                continue
            rows.append(row)
            writer.writerow({k: row.get(k, "") for k in TRIAL_COLUMNS})
            f.flush()
            probe = f"{row['init_probe']:.3f} -> {row['probe']:.3f}" if row["status"] == "finished" else row["error"]
            print(
                f"[{len(rows)}/{len(tasks)}] {row['arch']} seed {row['seed']}: {row['verdict']}, probe {probe}, "
                f"{row['wall_s']:.0f} s",
                flush=True,
            )
    for p in procs:
        p.join()
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


def report(trials: pd.DataFrame, out: Path, title: str, note: str) -> tuple[str, pd.DataFrame]:
    """The walk's CSV, Markdown page and plot, as ``benchmarks/stability.py`` writes them;
    returns (page, one row per architecture)."""
    trials = trials.copy()
    for col in ("loss", "collapse_ratio", "proj_rank", "init_probe", "probe", "init_knn", "knn", "images_per_s", "wall_s", "lr"):
        trials[col] = pd.to_numeric(trials[col], errors="coerce")
    trials["gain"] = trials["probe"] - trials["init_probe"]
    trials["sweep"] = "direct"
    spread, strict, seeds = stability.seed_spread(trials[trials["arch"].isin(trials.loc[trials["seed"] > 0, "arch"])])
    walk = stability.describe(trials[trials["seed"] == 0].reset_index(drop=True), spread, strict)
    walk[stability.COLUMNS].to_csv(out / "stability.csv", index=False, float_format="%.4f")
    page = stability.markdown(walk, spread, strict, seeds, f"# {title}\n\n{note}")
    (out / "stability.md").write_text(page)
    stability.plot(walk, spread, out / "stability.png")
    return page, walk


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the walk's base config")
    p.add_argument("--workers", type=int, default=2, help="trainer processes at once (they share the device)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--deadline", type=float, default=7200, help="seconds after which no new trial starts")
    p.add_argument("--max-params", default="20M")
    p.add_argument("--limit", type=int, help="walk only the first N architectures (round-robin order)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of each --seed-archs architecture")
    p.add_argument("--seed-archs", nargs="*", help="default: the seeds sweep's architectures")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "stability_direct")
    p.add_argument("--title", default="LeJEPA stability walk (direct)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep <out>/trials.csv: train only the trials not finished there (failed ones again), then report on all",
    )
    p.add_argument("--report-only", action="store_true", help="write the report from <out>/trials.csv, train nothing")
    p.add_argument(
        "--update-catalog",
        choices=("cpu", "gpu"),
        help="write each finished architecture's outcome and "
        "gain into the catalog's walk_* (cpu) or gpu_walk_* (gpu) columns; failed trials are left out",
    )
    args = p.parse_args(argv)
    ruled = {key for params in _spec_arch_params().values() for key in params}
    for item in args.set:
        try:
            key, _ = parse_override(item)
        except ConfigError as exc:
            print(f"error: --set: {exc}", file=sys.stderr)
            return 2
        if key in ruled:  # family_overrides come after --set, so the rule would win where it applies
            print(
                f"error: --set {key}: the walk spec sets it per family ({SPEC.name}: arch_overrides), "
                f"which wins over --set for those architectures; change the rule there",
                file=sys.stderr,
            )
            return 2
    trials_csv = args.out / "trials.csv"
    previous = pd.DataFrame(columns=TRIAL_COLUMNS)
    if args.resume or args.report_only:
        if not trials_csv.is_file():
            print(
                f"error: {trials_csv} does not exist: nothing to resume or report (run without --resume first)", file=sys.stderr
            )
            return 2
        previous = pd.read_csv(trials_csv)
    try:
        if args.seed_archs is None:
            args.seed_archs = list(seed_archs())
        tasks = plan(args.max_params, tuple(args.seed_archs), args.seeds, args.limit)
        seed_tasks = [t for t in tasks if t[1] > 0]
        tasks = (
            [t for t in tasks if t[1] == 0 and t[0] in args.seed_archs]
            + seed_tasks
            + [t for t in tasks if t[1] == 0 and t[0] not in args.seed_archs]
        )  # the spread first: the report needs it
    except LejepaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = {(r.arch, int(r.seed)) for r in previous.itertuples() if r.status == "finished"}
    todo = [] if args.report_only else [t for t in tasks if t not in done]
    start = time.perf_counter()
    if todo:
        print(
            f"{len(todo)} trials ({len(done)} done before), {args.workers} workers, deadline {args.deadline:.0f} s, "
            f"overrides: {' '.join(args.set) or '(none)'}; cpus {os.cpu_count()}",
            flush=True,
        )
        new = run(todo, args.set, args.workers, args.deadline, args.out, args.threads, append=args.resume)
        previous = pd.concat([previous, new], ignore_index=True) if len(previous) else new
    wall = time.perf_counter() - start
    trials = previous.drop_duplicates(["arch", "seed"], keep="last").reset_index(drop=True)
    note = (
        f"Generated by `benchmarks/stability_direct.py` ({args.workers} workers on one device, overrides "
        f"`{' '.join(args.set) or 'none'}`): {len(trials)} of {len(tasks)} trials"
        + (f"; this part {len(todo)} trials in {wall:.0f} s wall." if todo else ".")
    )
    try:
        page, walk = report(trials, args.out, args.title, note)
    except LejepaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(page.split("## Per architecture")[0])
    if args.update_catalog:
        finished = walk[walk["status"] == "finished"]
        changed = stability.update_catalog(finished, budget="" if args.update_catalog == "cpu" else "gpu")
        print(
            f"catalog: {changed} architectures' {args.update_catalog} walk outcome updated "
            f"({len(walk) - len(finished)} failed, left out)"
        )
    print(f"wrote {args.out}/trials.csv, stability.csv, stability.md, stability.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
