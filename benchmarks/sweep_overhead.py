"""Sweep overhead: a trial inside a Ray Tune sweep against the same training outside Ray and MLflow.

1. Throughput. One config (the spec's base plus its first trial's grid values, ``--epochs``
   epochs, torch threads = the spec's ``cpus_per_trial``) trains two ways at the same time, side
   by side, so that whatever else loads the machine hits both alike: as the single trial of a
   sweep on a local Ray ("inside": MLflow child run, ``tune.report`` with a checkpoint every
   epoch) and, in a separate process started when the trial starts training, directly with
   :class:`~lejepa.trainer.Trainer` and no callbacks ("outside"). Images/s is the trainer's own
   ``epoch/images_per_sec`` (the training loop); the epoch wall time, from one epoch end to the
   next, also counts everything between epochs (test-set probe, checkpoint, Tune report).
   Medians over epochs after the first, then over ``--repeats``. Target: inside ≥ 0.95 × outside.
2. MLflow logging cost at the config's ``train.log_every`` (default 10): the time spent in the
   MLflow callback's hooks (buffering, batched ``log_batch`` flushes, epoch metrics) against the
   training time, on an embedded SQLite store, outside Ray. Target ≤ 2 %.
3. ``--quickstart``: wall time of ``lejepa sweep sweeps/quickstart.yaml`` (store and storage in a
   temporary folder), the README's main job. Target: about 10 minutes on 2 CPU cores.

Run: python benchmarks/sweep_overhead.py [--spec SPEC] [--epochs 3] [--repeats 1] [--quickstart]
(exit status 1 if a target is missed). The side-by-side pair needs 2 × cpus_per_trial cores;
the load average is printed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from lejepa.callbacks import Callback
from lejepa.config import build_config
from lejepa.record import EPOCH_IMAGES_PER_SEC, EPOCH_TIME_S, sqlite_uri
from lejepa.tracking import MLflowCallback
from lejepa.trainer import Trainer
from sweeps.spec import SweepSpec, load_spec, trial_tree

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO, TARGET_LOGGING, TARGET_QUICKSTART_S = 0.95, 0.02, 600


class EpochClock(Callback):
    """Images/s and wall-clock time of every epoch end (the outside run's only callback)."""

    def __init__(self) -> None:
        self.images_per_sec: list[float] = []
        self.ends: list[float] = []

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.images_per_sec.append(metrics[EPOCH_IMAGES_PER_SEC])
        self.ends.append(time.time())


class TimedMLflow(MLflowCallback):
    """MLflowCallback that adds up the time spent in its per-step and per-epoch hooks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = 0.0
        self.epoch_end_seconds = 0.0
        self.step_events = 0
        self.loop_seconds = 0.0

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        start = time.perf_counter()
        super().on_step_end(step, metrics)
        self.seconds += time.perf_counter() - start
        self.step_events += 1

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        start = time.perf_counter()
        super().on_epoch_end(epoch, step, metrics)
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self.epoch_end_seconds += elapsed
        self.loop_seconds += metrics[EPOCH_TIME_S]  # includes the per-step hooks, not the epoch end


def trial_tree_of(spec: SweepSpec, epochs: int) -> dict:
    """The spec's base with its first trial's grid values (sampled values stay at the base's)."""
    first = {k: v for k, v in spec.trials()[0].items() if not (isinstance(v, str) and v.startswith("~"))}
    tree = trial_tree(spec.base, first)
    tree.setdefault("train", {})["epochs"] = epochs
    return tree


def outside(tree: dict, threads: int, run_dir: Path) -> tuple[list[float], list[float]]:
    cfg = build_config(tree)
    cfg.train.threads = threads
    clock = EpochClock()
    Trainer(cfg, [clock], run_dir=run_dir).fit()
    return clock.images_per_sec, [b - a for a, b in zip(clock.ends, clock.ends[1:])]


def inside(tree: dict, cpus: float, work: Path, name: str) -> tuple[list[float], list[float]]:
    from mlflow import MlflowClient

    from sweeps.runner import run_sweep

    spec_path = work / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump({"name": name, "base": tree, "resources": {"cpus_per_trial": cpus}}))
    uri = sqlite_uri(work / "inside.db")
    outcome = run_sweep(load_spec(spec_path), storage=work / "sweeps", name=name, tracking_uri=uri)
    (trial,) = outcome.trials
    client = MlflowClient(uri)
    history = client.get_metric_history(trial.run_id, EPOCH_IMAGES_PER_SEC)
    images = [m.value for m in sorted(history, key=lambda m: m.step)]
    ends = [m.timestamp / 1000 for m in sorted(client.get_metric_history(trial.run_id, "epoch"), key=lambda m: m.step)]
    return images, [b - a for a, b in zip(ends, ends[1:])]


def side_by_side(tree: dict, cpus: float, threads: int, work: Path, name: str) -> tuple[tuple, tuple]:
    """(outside, inside) results of the two runs, the outside one started when the trial starts training."""
    found: dict = {}

    def sweep() -> None:
        try:
            found["inside"] = inside(tree, cpus, work, name)
        except BaseException as exc:  # re-raised below, in the main thread
            found["error"] = exc

    thread = threading.Thread(target=sweep)
    thread.start()
    while thread.is_alive() and not list((work / "sweeps" / name / "trials").glob("*/config.yaml")):
        time.sleep(0.2)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        found["outside"] = pool.apply(outside, (tree, threads, work / f"outside-{name}"))
    thread.join()
    if "error" in found:
        raise found["error"]
    return found["outside"], found["inside"]


def logging_cost(tree: dict, threads: int, work: Path) -> TimedMLflow:
    cfg = build_config(tree)
    cfg.train.threads = threads
    uri = sqlite_uri(work / "logging.db")
    tracking = TimedMLflow(uri, experiment="benchmark", log_checkpoint=False)
    Trainer(cfg, [tracking], run_dir=work / "logging").fit()
    return tracking


def quickstart(work: Path) -> tuple[float, subprocess.CompletedProcess]:
    cmd = [
        sys.executable,
        "-m",
        "lejepa",
        "sweep",
        str(REPO / "sweeps" / "quickstart.yaml"),
        "--storage",
        str(work / "quickstart"),
        "--tracking-uri",
        sqlite_uri(work / "quickstart.db"),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - start, proc


def _median_after_first(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(REPO / "sweeps" / "quickstart.yaml"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quickstart", action="store_true", help="also time the whole quickstart sweep")
    args = parser.parse_args()

    import ray

    spec = load_spec(args.spec)
    tree = trial_tree_of(spec, args.epochs)
    cfg = build_config(tree)
    cpus = spec.resources_for(cfg.model.arch).cpus
    threads = max(1, int(cpus))
    print(
        f"config: {cfg.model.arch} on {cfg.data.name} @ {cfg.data.resolution}px, batch {cfg.optim.batch_size}, "
        f"λ={cfg.loss.lam}, {args.epochs} epochs, {threads} thread(s); load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
    )
    missed = False
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp:
        work = Path(tmp)
        ray.init(address="local", num_cpus=max(1, int(cpus + 0.999)), include_dashboard=False)
        try:
            rows = []
            for i in range(args.repeats):
                (out_ips, out_wall), (in_ips, in_wall) = side_by_side(tree, cpus, threads, work, f"overhead-{i}")
                rows.append(
                    (
                        _median_after_first(out_ips),
                        _median_after_first(in_ips),
                        statistics.median(out_wall) if out_wall else float("nan"),
                        statistics.median(in_wall) if in_wall else float("nan"),
                    )
                )
        finally:
            ray.shutdown()
        print("\nthroughput, side by side: training-loop images/s and epoch wall time (s), medians over epochs after the first")
        print(
            f"{'repeat':>6}  {'outside img/s':>13}  {'inside img/s':>12}  {'ratio':>5}  "
            f"{'outside epoch s':>15}  {'inside epoch s':>14}  {'speed ratio':>11}"
        )
        for i, (o, n, ow, iw) in enumerate(rows, 1):
            print(f"{i:>6}  {o:>13.1f}  {n:>12.1f}  {n / o:>5.3f}  {ow:>15.2f}  {iw:>14.2f}  {ow / iw:>11.3f}")
        ratio = statistics.median(n / o for o, n, _, _ in rows)
        missed |= ratio < TARGET_RATIO
        print(f"inside / outside images/s: {ratio:.3f} (target ≥ {TARGET_RATIO}) {'OK' if ratio >= TARGET_RATIO else 'MISSED'}")

        tracking = logging_cost(tree, threads, work)
        share = tracking.seconds / (tracking.loop_seconds + tracking.epoch_end_seconds)
        missed |= share > TARGET_LOGGING
        print(
            f"\nMLflow logging at log_every={cfg.train.log_every}: {tracking.seconds:.3f} s in the callback over "
            f"{tracking.step_events} step events and {args.epochs} epochs, training {tracking.loop_seconds:.1f} s: "
            f"{100 * share:.2f} % (target ≤ {100 * TARGET_LOGGING:.0f} %) {'OK' if share <= TARGET_LOGGING else 'MISSED'}"
        )

        if args.quickstart:
            wall, proc = quickstart(work)
            ok = proc.returncode == 0 and wall <= TARGET_QUICKSTART_S
            missed |= not ok
            print(
                f"\nquickstart.yaml: {wall / 60:.1f} min wall, exit {proc.returncode} "
                f"(target ≈ {TARGET_QUICKSTART_S // 60} min) {'OK' if ok else 'MISSED'}"
            )
            print("\n".join(proc.stdout.strip().splitlines()[-12:]))
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
