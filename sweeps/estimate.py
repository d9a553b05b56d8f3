"""How long a sweep will take on this machine, measured (``lejepa sweep SPEC --dry-run``).

Every distinct trial set-up (architecture, batch size, resolution, views, threads: every config
value that changes what a step costs) is built once as the trial builds it, a real
:class:`~lejepa.trainer.Trainer` on the trial's real data at the trial's thread count, and timed:
a warm-up step, then up to :data:`MEASURE_STEPS` of the trainer's own training steps (views,
model, objective, online probe, optimisers), the frozen backbone's forward on up to
:data:`EVAL_SAMPLE` test images, one checkpoint, one epoch of the final linear probe and a kNN on
random features of the backbone's width. Then, per trial::

    trial    = start-up + step_s × steps + epochs_run × (online eval + checkpoint + EPOCH_OVERHEAD_S) + final eval
    start-up = process start + TRIAL_OVERHEAD_S + data build + model build + (warm-up step − step_s)
    final    = (1 + eval_at_init) × (forward of the train and test images + probe epochs + kNN)
    steps    = min(steps_per_epoch × epochs, max_steps), steps_per_epoch = ⌊n_train / batch⌋

and for the sweep: process start + RAY_START_S (unless it joins a running Ray) + DRIVER_OVERHEAD_S
+ the makespan of the trials scheduled longest first on the expected concurrency
(:func:`schedule`). "Process start" is what a fresh ``lejepa`` process took to import torch and
lejepa and load the spec: the CLI passes its own age; else :data:`PROCESS_START_S`.

Set-ups measured after :data:`MEASURE_BUDGET_S` seconds of measuring are scaled from a measured
one by the per-architecture step times of ``benchmarks/results/architectures.csv`` (the catalog's
measured throughput) where both architectures are in it; set-ups that fail to build or run, or
cannot be scaled, are skipped and the estimate is marked partial. With the ASHA scheduler or
``prune_collapsed`` trials may stop early: the estimate is then an upper bound. Sampled values
(ranges, choices) take their slowest probe (both ends of a range, every choice).
"""

from __future__ import annotations

import csv
import heapq
import itertools
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from lejepa.config import Config, build_config
from lejepa.errors import first_line
from sweeps.resources import TrialResources
from sweeps.space import trial_tree

MEASURE_STEPS = 3
"""Timed training steps per set-up (after one warm-up step)."""
STEP_BUDGET_S = 2.0
"""Stop timing steps once the timed ones took this long (at least one is timed)."""
MEASURE_BUDGET_S = 90.0
"""Seconds of measuring after which the remaining set-ups are scaled from the architecture table."""
EVAL_SAMPLE = 128
"""Test images whose frozen forward is timed (per-image cost, scaled to the evaluated sets)."""
PROBE_SAMPLE = 1024
"""Rows of random features one epoch of the final linear probe is timed on (scaled to n_train)."""
KNN_SAMPLE = (2048, 512)
"""(train, test) rows of random features the kNN is timed on (scaled by n_train × n_test)."""

# Fixed costs that a dry run cannot measure without starting Ray and MLflow. Measured on the
# development machine (2 shared CPU cores, 1-minute load average below 1.5, warm file caches) from
# the timestamps of `lejepa sweep` runs on tiny specs (16 px, test_resnet/test_efficientnet, 2-3
# trials of 2-4 epochs, 1 or 2 at a time): command start, Ray's "Started a local Ray instance",
# MLflow's table creation, Tune's trial start/end lines, each trial's result.json, command exit.
PROCESS_START_S = 11.0
"""A fresh ``lejepa`` process: Python and the torch/timm/sklearn/lejepa imports, then loading the spec
(used when the caller does not pass its own age): 10-11 s warm, 15-20 s with cold file caches."""
RAY_START_S = 8.0
"""``ray.init`` of a fresh local Ray (GCS, raylet, prestarted workers): 6-7 s idle, 14 s under load."""
DRIVER_OVERHEAD_S = 17.0
"""The driver beyond its process start and Ray: ray/mlflow imports and pre-flight (about 1-2 s), a new
SQLite MLflow store's tables, the parent run and the Tuner (about 7 s), settling the trials'
statuses, closing the parent run and shutting Ray down (about 8-9 s)."""
TRIAL_OVERHEAD_S = 5.0
"""A trial beyond its process start, data and model: the Ray actor's start and the trainable's
unpickling (about 5 s from Tune's "started" line to the trainable's clock); the MLflow child run
and the trainable's mlflow import fall within the process start's import time."""
EPOCH_OVERHEAD_S = 0.5
"""Per epoch beyond the online eval and checkpoint: Tune's report with its checkpoint, MLflow's epoch
metrics and flushes."""

ARCH_TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "architectures.csv"
"""Measured ms per training step per catalog architecture (``benchmarks/architectures.py``)."""

_NEUTRAL = {
    "loss.lam",
    "loss.t_max",
    "optim.lr",
    "optim.weight_decay",
    "optim.betas",
    "optim.warmup_epochs",
    "optim.final_lr_ratio",
    "optim.probe_lr",
    "train.seed",
    "train.epochs",
    "train.max_steps",
    "train.eval_knn_k",
    "train.eval_probe_epochs",
    "train.eval_at_init",
    "train.online_eval_images",
    "train.keep_checkpoints",
    "train.out_dir",
    "train.run_name",
    "train.collapse_patience",
}
"""Config keys that leave a step's and an image's cost unchanged (the arithmetic uses the counts)."""


@dataclass(frozen=True)
class Timing:
    """What one set-up measured: seconds per training step (mean after the warm-up), the warm-up's
    excess, model and data build, per-image frozen forward, one checkpoint, one final-probe epoch
    over n_train rows and the kNN over n_train × n_test; ``steps`` timed (0: scaled, ``source``)."""

    label: str
    step_s: float
    warmup_extra_s: float
    model_s: float
    data_s: float
    image_s: float
    checkpoint_s: float
    probe_epoch_s: float
    knn_s: float
    n_train: int
    n_test: int
    steps: int
    source: str = "measured"


@dataclass(frozen=True)
class TrialTime:
    """One trial's estimate: start-up (process, data, model, warm-up), training steps, per-epoch
    extras, final evaluation; ``total_s`` their sum."""

    label: str
    startup_s: float
    train_s: float
    epochs_s: float
    eval_s: float

    @property
    def total_s(self) -> float:
        return self.startup_s + self.train_s + self.epochs_s + self.eval_s


@dataclass
class Estimate:
    """The sweep's estimated wall time (``total_s``; None when no trial could be estimated), the
    per-set-up timings, per-trial times (estimable trials only), the schedule's concurrency, the fixed
    costs, what was skipped and why, and the assumptions."""

    total_s: float | None
    timings: dict[str, Timing]
    trials: list[TrialTime]
    num_trials: int
    concurrency: int
    fixed_s: float
    skipped: dict[str, str] = field(default_factory=dict)
    upper_bound: str | None = None
    assumptions: list[str] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return bool(self.skipped)

    def line(self) -> str:
        """One line for the dry run: ``estimated wall time on this machine: about 4 min (...)``."""
        head = "estimated wall time on this machine: "
        if self.total_s is None:
            why = "; ".join(f"{k}: {v}" for k, v in self.skipped.items()) or "no trial could be measured"
            return head + f"not available ({why})"
        measured = [t for t in self.timings.values() if t.steps]
        steps = {t.steps for t in measured}
        parts = []
        if measured:
            count = f"{steps.pop()}" if len(steps) == 1 else f"≤ {max(steps)}"
            per = ", ".join(f"{t.label} {_seconds(t.step_s, 2)} s/step" for t in measured)
            parts.append(f"measured {count} step{'s' if count != '1' else ''} per architecture: {per}")
        scaled = [t for t in self.timings.values() if not t.steps]
        if scaled:
            parts.append(
                f"scaled from {ARCH_TABLE.name}: " + ", ".join(f"{t.label} {_seconds(t.step_s, 2)} s/step" for t in scaled)
            )
        totals = [t.total_s for t in self.trials]
        fixed = [t.startup_s + t.eval_s for t in self.trials]
        parts.append(f"per trial ≈ {_range(totals)} incl. ≈ {_range(fixed)} start-up and evaluation")
        trials = _plural(self.num_trials, "trial")
        parts.append(f"{trials}, {self.concurrency} at a time, plus ≈ {_duration(self.fixed_s)} sweep start-up")
        if self.upper_bound:
            parts.append(f"an upper bound: {self.upper_bound}")
        if self.skipped:
            parts.append(
                "partial: not counted "
                + ", ".join(f"{k} ({v})" for k, v in self.skipped.items())
                + f" ({_plural(self.num_trials - len(self.trials), 'trial')})"
            )
        return head + f"about {_duration(self.total_s)} (" + "; ".join(parts) + ")"


def schedule(durations: Sequence[float], slots: int) -> float:
    """Makespan of longest-first greedy list scheduling: the trials, longest first, each start on
    the slot that frees first; 0 for no trials."""
    finish = [0.0] * max(1, slots)
    for d in sorted(durations, reverse=True):
        heapq.heappush(finish, heapq.heappop(finish) + d)
    return max(finish)


def trial_time(t: Timing, cfg: Config, res: TrialResources, process_start_s: float) -> TrialTime:
    """The arithmetic of the module docstring for one trial of config ``cfg`` with timing ``t``."""
    steps_per_epoch = max(1, (t.n_train // res.workers) // max(1, cfg.optim.batch_size // res.workers))
    steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        steps = min(steps, cfg.train.max_steps)
    epochs_run = math.ceil(steps / steps_per_epoch)
    online = t.n_test if cfg.train.online_eval_images is None else min(t.n_test, cfg.train.online_eval_images)
    per_epoch = online * t.image_s + t.checkpoint_s + EPOCH_OVERHEAD_S
    final = (t.n_train + t.n_test) * t.image_s + cfg.train.eval_probe_epochs * t.probe_epoch_s + t.knn_s
    startup = process_start_s + TRIAL_OVERHEAD_S + t.data_s + t.model_s + t.warmup_extra_s
    evals = 2 if cfg.train.eval_at_init else 1
    return TrialTime(t.label, startup, steps * t.step_s, epochs_run * per_epoch, evals * final)


def estimate_wall_time(
    spec: Any,
    *,
    cpus: float | None = None,
    gpus: float | None = None,
    process_start_s: float | None = None,
    joins_ray: bool = False,
    budget_s: float = MEASURE_BUDGET_S,
    progress: Callable[[str], None] | None = None,
) -> Estimate:
    """Measure ``spec``'s set-ups here and estimate the sweep's wall time (module docstring).

    ``cpus``/``gpus``: what the schedule runs on (default this machine's); ``process_start_s``: a
    fresh process's start-up (default :data:`PROCESS_START_S`); ``joins_ray``: the sweep joins a
    running Ray (no Ray start); ``progress`` receives one line per set-up measured."""
    if cpus is None or gpus is None:
        here = _local_resources()
        cpus = here[0] if cpus is None else cpus
        gpus = here[1] if gpus is None else gpus
    start_s = PROCESS_START_S if process_start_s is None else process_start_s
    trials = _trial_configs(spec)
    setups: dict[tuple, tuple[Config, TrialResources]] = {}
    for candidates in trials:
        for cfg, res in candidates:
            setups.setdefault(_setup_key(cfg, res), (cfg, res))
    labels = _labels(setups)
    timings: dict[tuple, Timing] = {}
    skipped: dict[str, str] = {}
    data: dict[str, Any] = {}
    began = time.perf_counter()
    for i, (key, (cfg, res)) in enumerate(setups.items(), 1):
        reason = _cannot_run(cfg, res)
        if reason is not None:
            skipped[labels[key]] = reason
            continue
        if timings and time.perf_counter() - began > budget_s:
            continue  # scaled below (the first set-up is always measured)
        if progress:
            progress(f"estimating wall time: measuring {labels[key]} ({i}/{len(setups)})")
        try:
            timings[key] = _measure(labels[key], cfg, res, data)
        except Exception as exc:  # an architecture that does not build or run here: skipped, the estimate partial
            skipped[labels[key]] = first_line(exc, type(exc).__name__)[:200]
    for key, (cfg, _) in setups.items():
        if key not in timings and labels[key] not in skipped:
            scaled = _scaled(key, cfg, setups, timings, labels[key])
            if scaled is None:
                skipped[labels[key]] = f"not measured within {budget_s:g} s and not in {ARCH_TABLE.name}"
            else:
                timings[key] = scaled

    times: list[TrialTime] = []
    per_setup: dict[int, TrialTime | None] = {}  # trials of one grid point share their candidates' list
    for candidates in trials:
        if id(candidates) not in per_setup:
            keys = [_setup_key(cfg, res) for cfg, res in candidates]
            options = [trial_time(timings[k], cfg, res, start_s) for k, (cfg, res) in zip(keys, candidates) if k in timings]
            # a sampled trial counts when all its probes could be estimated: its slowest
            per_setup[id(candidates)] = max(options, key=lambda t: t.total_s) if len(options) == len(candidates) else None
        estimated = per_setup[id(candidates)]
        if estimated is not None:
            times.append(estimated)
    concurrency = spec.expected_concurrency(cpus, gpus)
    fixed = start_s + (0.0 if joins_ray else RAY_START_S) + DRIVER_OVERHEAD_S
    total = fixed + schedule([t.total_s for t in times], concurrency) if times and concurrency > 0 else None
    if concurrency <= 0:
        skipped["schedule"] = f"no trial fits this machine ({cpus:g} CPUs, {gpus:g} GPUs)"
    stops = []
    if spec.scheduler.type != "none":
        stops.append(f"the {spec.scheduler.type} scheduler may stop trials early")
    if spec.base_config.train.collapse_patience is not None:
        stops.append("collapsed trials stop early")
    assumptions = [
        f"process start {start_s:.1f} s ({'measured' if process_start_s is not None else 'PROCESS_START_S'})",
        "Ray started locally" if not joins_ray else "joins a running Ray",
        "trials scheduled longest first",
    ]
    if any(p.kind != "grid" for p in spec.space):
        assumptions.append("sampled values at their slowest probe")
    if any(res.workers > 1 for _, res in setups.values()):
        assumptions.append("multi-worker trials: one rank's batch measured alone, communication not counted")
    return Estimate(
        total_s=total,
        timings={labels[k]: t for k, t in timings.items()},
        trials=times,
        num_trials=len(trials),
        concurrency=concurrency,
        fixed_s=fixed,
        skipped=skipped,
        upper_bound="; ".join(stops) or None,
        assumptions=assumptions,
    )


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``); None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- internals
def _local_resources() -> tuple[int, int]:
    """(CPUs, GPUs) of this machine, as the dry run counts them."""
    gpus = 0
    if os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        import torch

        gpus = torch.cuda.device_count()
    return os.cpu_count() or 1, gpus


def _trial_configs(spec: Any) -> list[list[tuple[Config, TrialResources]]]:
    """Per trial, its (config, resources); a trial with sampled values has one per combination of
    its sampled parameters' probes (both ends of a range, every choice)."""
    sampled = [p for p in spec.space if not p.is_grid]
    probes = list(itertools.product(*(p.probes() for p in sampled)))
    cache: dict[str, list[tuple[Config, TrialResources]]] = {}
    out = []
    for row in spec.trials():
        grid = {k: row[k] for k in spec.keys() if not any(p.key == k for p in sampled)}
        memo = repr(sorted(grid.items(), key=lambda kv: kv[0]))
        if memo not in cache:
            options = []
            for combo in probes:
                params = spec.trial_params({**grid, **{p.key: v for p, v in zip(sampled, combo)}})
                cfg = build_config(trial_tree(spec.base, params), source="estimate")
                options.append((cfg, spec.resources_for(cfg.model.arch)))
            cache[memo] = options
        out.append(cache[memo])
    return out


def _setup_key(cfg: Config, res: TrialResources) -> tuple:
    """What a step's cost depends on: the config less :data:`_NEUTRAL` and tracking, and the resources."""
    flat = {k: v for k, v in cfg.flat().items() if k not in _NEUTRAL and not k.startswith("tracking.")}
    return (repr(sorted(flat.items())), res.cpus, res.gpus, res.workers)


def _labels(setups: dict[tuple, tuple[Config, TrialResources]]) -> dict[tuple, str]:
    """The architecture's name, plus the values that tell its set-ups apart (``resnet10t [data.resolution=64]``)."""
    by_arch: dict[str, list[tuple]] = {}
    for key, (cfg, _) in setups.items():
        by_arch.setdefault(cfg.model.arch, []).append(key)
    labels = {}
    for arch, keys in by_arch.items():
        flats = [{**setups[k][0].flat(), "cpus": setups[k][1].cpus, "gpus": setups[k][1].gpus} for k in keys]
        varying = [k for k in flats[0] if k not in _NEUTRAL and len({repr(f.get(k)) for f in flats}) > 1]
        for key, flat in zip(keys, flats):
            labels[key] = arch + (f" [{', '.join(f'{k}={flat[k]}' for k in varying)}]" if varying else "")
    return labels


def _cannot_run(cfg: Config, res: TrialResources) -> str | None:
    """Why this set-up cannot be measured here (its trials train on a GPU and there is none), or None."""
    if res.gpus > 0 and cfg.train.device in ("auto", "cuda"):
        import torch

        if not torch.cuda.is_available():
            return "its trials train on a GPU and this machine has none"
    return None


def _measure(label: str, cfg: Config, res: TrialResources, data_cache: dict[str, Any]) -> Timing:
    """Build the trial's Trainer here (in a temporary run folder) and time it (module docstring)."""
    import torch
    from torch.utils.data import Subset

    from lejepa.data import build_datasets
    from lejepa.model import LeJEPAModel
    from lejepa.probes import knn_accuracy, linear_probe
    from lejepa.trainer import Trainer

    cfg = cfg.model_copy(deep=True)
    cfg.train.threads = max(1, int(res.cpus))  # as run_trial sets it
    if res.gpus == 0 and cfg.train.device == "auto":
        cfg.train.device = "cpu"  # Ray hides the GPUs from a trial that asks for none
    cfg.optim.batch_size = max(2, cfg.optim.batch_size // res.workers)  # one rank's share
    data_key = repr(sorted(cfg.data.model_dump().items()))
    if data_key not in data_cache:
        t0 = time.perf_counter()
        data_cache[data_key] = (build_datasets(cfg.data), time.perf_counter() - t0)
    data, data_s = data_cache[data_key]
    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="lejepa-estimate-") as tmp, torch.random.fork_rng(devices=[]):
            t0 = time.perf_counter()
            trainer = Trainer(cfg, run_dir=tmp, data=data)
            model_s = time.perf_counter() - t0
            cuda = trainer.rt.device.type == "cuda"
            batches = iter(trainer.loader)
            durations: list[float] = []
            for i in range(1 + MEASURE_STEPS):
                t0 = time.perf_counter()
                try:
                    images, labels = next(batches)
                except StopIteration:
                    batches = iter(trainer.loader)
                    images, labels = next(batches)
                # the trainer's own step: views, model, objective, online probe, both optimisers
                trainer._train_step(images, labels, measure=cfg.train.health and i % cfg.train.log_every == 0)
                if cuda:
                    torch.cuda.synchronize()
                durations.append(time.perf_counter() - t0)
                if i >= 1 and sum(durations[1:]) >= STEP_BUDGET_S:
                    break
            step_s = sum(durations[1:]) / len(durations[1:])
            n_train, n_test = len(data.train), len(data.test)
            sample = min(n_test, EVAL_SAMPLE)
            t0 = time.perf_counter()
            trainer.features(Subset(data.test, range(sample)))
            image_s = (time.perf_counter() - t0) / sample
            t0 = time.perf_counter()
            trainer._checkpoint({})
            checkpoint_s = time.perf_counter() - t0
            embed, classes = cast(LeJEPAModel, trainer.model).embed_dim, data.num_classes
            rows = min(n_train, PROBE_SAMPLE)
            feats, targets = torch.randn(rows, embed), torch.randint(0, classes, (rows,))
            t0 = time.perf_counter()
            linear_probe(feats, targets, feats[:2], targets[:2], classes, epochs=1)
            probe_epoch_s = (time.perf_counter() - t0) * n_train / rows
            a, b = min(n_train, KNN_SAMPLE[0]), min(n_test, KNN_SAMPLE[1])
            k = min(cfg.train.eval_knn_k, a)
            t0 = time.perf_counter()
            knn_accuracy(torch.randn(a, embed), torch.randint(0, classes, (a,)), torch.randn(b, embed), targets[:b], k=k)
            knn_s = (time.perf_counter() - t0) * (n_train * n_test) / (a * b)
    finally:
        torch.set_num_threads(threads)
    return Timing(
        label=label,
        step_s=step_s,
        warmup_extra_s=max(0.0, durations[0] - step_s),
        model_s=model_s,
        data_s=data_s,
        image_s=image_s,
        checkpoint_s=checkpoint_s,
        probe_epoch_s=probe_epoch_s,
        knn_s=knn_s,
        n_train=n_train,
        n_test=n_test,
        steps=len(durations) - 1,
    )


def _arch_table() -> dict[str, float]:
    """ms per step per architecture from :data:`ARCH_TABLE` (empty when it is not there)."""
    try:
        with ARCH_TABLE.open(newline="") as fh:
            return {row["name"]: float(row["step_ms"]) for row in csv.DictReader(fh) if row.get("step_ms")}
    except (OSError, ValueError, KeyError):
        return {}


def _scaled(
    key: tuple, cfg: Config, setups: dict[tuple, tuple[Config, TrialResources]], timings: dict[tuple, Timing], label: str
) -> Timing | None:
    """A set-up that was not measured, from a measured one that differs from it only in its
    architecture: step and per-image times scaled by the two architectures' step times in
    :data:`ARCH_TABLE`; None when there is no such pair."""
    table = _arch_table()
    if cfg.model.arch not in table:
        return None
    mine = {k: v for k, v in cfg.flat().items() if k != "model.arch"}
    for other, timing in timings.items():
        ref_cfg, ref_res = setups[other]
        theirs = {k: v for k, v in ref_cfg.flat().items() if k != "model.arch"}
        if ref_cfg.model.arch in table and timing.steps and key[1:] == other[1:] and _same_setup(mine, theirs):
            ratio = table[cfg.model.arch] / table[ref_cfg.model.arch]
            return replace(
                timing,
                label=label,
                step_s=timing.step_s * ratio,
                warmup_extra_s=timing.warmup_extra_s * ratio,
                image_s=timing.image_s * ratio,
                steps=0,
                source=f"{ARCH_TABLE.name} × {timing.label}",
            )
    return None


def _same_setup(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in set(a) | set(b) if k not in _NEUTRAL and not k.startswith("tracking."))


def _seconds(value: float, digits: int) -> str:
    """``value`` with ``digits`` significant digits (0.21, 1.3, 12)."""
    return f"{value:.{digits}g}" if value < 10 ** (digits - 1) else f"{value:.0f}"


def _duration(seconds: float) -> str:
    """``45 s``, ``2.5 min``, ``40 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 10 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _range(values: Sequence[float]) -> str:
    lo, hi = min(values), max(values)
    return _duration(lo) if _duration(lo) == _duration(hi) else f"{_duration(lo)}–{_duration(hi)}"
