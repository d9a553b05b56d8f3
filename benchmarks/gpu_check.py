"""The GPU path in one run: every figure issue 17 asks of a CUDA machine, side by side.

Sections (each timed, each failing on its own without stopping the others):

- ``device``: the card, torch, CUDA.
- ``sigreg``: SIGReg forward + backward, ours (:class:`lejepa.sigreg.SIGReg`) against the direct
  formula (``benchmarks/sigreg.py``: the same V = 8 views, K = 128, 17 knots), time and peak
  memory, fp32 and bf16 autocast, N × M over the grid.
- ``trainer``: images/s of the Trainer's epoch loop against a bare LeJEPA loop
  (``benchmarks/train_throughput.py``) on synthetic images, 2 global + 6 local views, eager and
  ``train.compile=default``, for resnet50 and vit_small_patch16_224 at 224 px.
- ``bf16``: the same 50 steps in fp32 and bf16 autocast (same seed, data and views): the mean
  training loss of the last 10 steps, relative difference.
- ``packing``: 4 small ``lejepa train`` processes on one device at once (what Ray does with
  ``gpus_per_trial: 0.25``) against the same 4 one after another, wall time.
- ``tests``: the CUDA tests (``pytest -k cuda``).

On a machine without CUDA (or with ``--quick``) a reduced version runs on the CPU in under
2 minutes (CI runs it, so it cannot rot): smaller grid, a small test network at 16 px, eager
only (``--compile`` adds compiled resnet10t at 32 px: minutes of compiling on 2 cores), no
bf16, 2 trials.

    python benchmarks/gpu_check.py [--quick] [--only sigreg,trainer] [--out DIR]

Prints a report and writes it to ``<out>/gpu_check.md`` (default ``runs/gpu_check``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (HERE, ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import sigreg as sigreg_bench  # noqa: E402  (benchmarks/sigreg.py)
import train_throughput  # noqa: E402  (benchmarks/train_throughput.py)

from lejepa.callbacks import Callback  # noqa: E402
from lejepa.config import load_config  # noqa: E402
from lejepa.data import DatasetSplits, TensorImageDataset  # noqa: E402
from lejepa.errors import first_line  # noqa: E402
from lejepa.record import TRAIN_LOSS  # noqa: E402
from lejepa.sigreg import triton_available  # noqa: E402
from lejepa.trainer import Trainer  # noqa: E402

SECTIONS = ("device", "sigreg", "bf16", "tests", "packing", "trainer")
"""In the order they run: the longest (compiling two models) last."""
TARGETS = {"sigreg_time": 0.25, "sigreg_memory": 0.10, "trainer_vs_bare": 0.95, "compile_vs_eager": 1.3, "bf16_loss": 0.01}


class Report:
    """Lines printed as they come and kept for the Markdown file."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.lines) + "\n")


def synthetic_splits(n: int, resolution: int, classes: int = 10, seed: int = 0) -> DatasetSplits:
    """Random uint8 images (the throughput sections measure speed, not learning)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    split = TensorImageDataset(images, labels)
    return DatasetSplits(
        split,
        TensorImageDataset(images[:256], labels[:256]),
        classes,
        resolution,
        resolution,
        (0.5, 0.5, 0.5),
        (0.25, 0.25, 0.25),
        "synthetic",
    )


def _config(out: Path, *overrides: str):
    return load_config(
        None,
        [
            "tracking.enabled=false",
            f"train.out_dir={out}",
            "train.eval_probe_epochs=1",
            "train.online_eval_images=64",
            *overrides,
        ],
    )


def section_device(report: Report, gpu: bool, quick: bool) -> None:
    report(f"torch {torch.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    if gpu:
        props = torch.cuda.get_device_properties(0)
        report(
            f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
            f"compute capability {props.major}.{props.minor}, CUDA {torch.version.cuda}"
        )
    else:
        report(f"device: CPU only ({torch.get_num_threads()} threads); reduced check")
    report(f"triton: {'installed' if triton_available() else 'not installed (loss.kernel=triton unavailable)'}")


def section_sigreg(report: Report, gpu: bool, quick: bool) -> None:
    device = torch.device("cuda" if gpu else "cpu")
    grid_n, grid_m = ((256, 1024, 4096), (256, 1024, 4096)) if gpu and not quick else ((64, 256), (256, 1024))
    precisions = ((None, "fp32"), (torch.bfloat16, "bf16")) if gpu else ((None, "fp32"),)
    report(
        f"V={sigreg_bench.V} views, K={sigreg_bench.K}, {sigreg_bench.KNOTS} knots; forward + backward, "
        "best of repeats; peak = tensor bytes allocated above the inputs"
    )
    triton = gpu and triton_available()
    report(
        "ours = loss.kernel=torch; triton = loss.kernel=triton (fused kernels"
        + ("" if triton else "; not measured: needs CUDA and the triton package")
        + ")"
    )
    report(
        "| precision | N | M | ours ms | direct ms | time × | ours MiB | direct MiB | memory × | value rel | "
        "triton ms | triton time × | triton memory × | triton value rel |"
    )
    report("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for autocast, label in precisions:
        for n in grid_n:
            for m in grid_m:
                r = sigreg_bench.compare(n, m, device, autocast, min_seconds=0.3 if gpu else 0.5, triton=triton)
                if "direct_ms" not in r:
                    report(
                        f"| {label} | {n} | {m} | {r['fast_ms']:.2f} | (too big) | | {r['fast_mib']:.1f} | | | | "
                        f"{r.get('triton_ms', float('nan')):.2f} | | | |"
                    )
                    continue
                flag = " **target**" if (n, m) == (1024, 4096) else ""
                tri = (
                    f"{r['triton_ms']:.2f} | {r['triton_time_ratio']:.3f} | {r['triton_memory_ratio']:.4f} | "
                    f"{r['triton_value_diff']:.1e}"
                    if triton
                    else " | | "
                )
                report(
                    f"| {label} | {n} | {m} | {r['fast_ms']:.2f} | {r['direct_ms']:.2f} | {r['time_ratio']:.3f} | "
                    f"{r['fast_mib']:.1f} | {r['direct_mib']:.1f} | {r['memory_ratio']:.4f}{flag} | "
                    f"{r['value_diff']:.1e} | {tri} |"
                )
    report(f"targets at N=1024, M=4096: time × ≤ {TARGETS['sigreg_time']}, memory × ≤ {TARGETS['sigreg_memory']}")


def _throughput(
    report: Report, arch: str, res: int, batch: int, steps: int, rounds: int, out: Path, modes: tuple[str, ...]
) -> dict[str, float]:
    data = synthetic_splits(batch * (steps + 4), res)
    results: dict[str, float] = {}
    for mode in modes:
        cfg = _config(
            out,
            f"model.arch={arch}",
            f"data.resolution={res}",
            "views.global_views=2",
            "views.local_views=6",
            f"optim.batch_size={batch}",
            f"train.compile={mode}",
            "train.epochs=1000",
        )
        trainer = Trainer(cfg, data=data, run_dir=out / f"{arch}-{mode}")
        start = time.perf_counter()
        try:
            train_throughput.trainer_images_per_sec(trainer, 3)  # warm-up (and compilation)
            warm = time.perf_counter() - start
            bare, ours = [], []
            for _ in range(rounds):
                bare.append(train_throughput.bare_images_per_sec(trainer, steps))
                ours.append(train_throughput.trainer_images_per_sec(trainer, steps))
        except Exception as exc:  # one configuration failing (a compiler error) leaves the others
            report(f"| {arch} | {res} | {batch} | {mode} | FAILED: {type(exc).__name__}: {first_line(exc, '')[:200]} | | | |")
            continue
        results[f"{mode}_bare"], results[f"{mode}_trainer"] = statistics.median(bare), statistics.median(ours)
        report(
            f"| {arch} | {res} | {batch} | {mode} | {results[f'{mode}_bare']:.0f} | "
            f"{results[f'{mode}_trainer']:.0f} | {results[f'{mode}_trainer'] / results[f'{mode}_bare']:.3f} | "
            f"{warm:.1f} |"
        )
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def section_trainer(report: Report, gpu: bool, quick: bool, compile_on_cpu: bool = False) -> None:
    out = Path(tempfile.mkdtemp(prefix="lejepa-gpu-check-"))
    report(
        "images/s on synthetic data, 2 global + 6 local views (local side = resolution·96/224), median of "
        "rounds alternating bare loop and Trainer; warm-up s includes compilation"
    )
    report("| arch | px | batch | compile | bare img/s | Trainer img/s | Trainer / bare | warm-up s |")
    report("|---|---:|---:|---|---:|---:|---:|---:|")
    if gpu and not quick:
        cases = [("vit_small_patch16_224", 224, 128)]  # the model; each compiled case costs a minute
        steps, rounds = 12, 2
    else:
        cases = [("resnet10t", 32, 64)] if compile_on_cpu else [("test_resnet", 16, 64)]
        steps, rounds = 3, 2
    modes = ("eager", "default") if gpu or compile_on_cpu else ("eager",)
    if len(modes) == 1:
        report("(compiled: not in the reduced check; compiling takes minutes on 2 CPU cores: --compile)")
    for arch, res, batch in cases:
        r = _throughput(report, arch, res, batch, steps, rounds, out, modes)
        if "default_trainer" in r:
            report(f"  {arch}: compiled / eager (Trainer) = {r['default_trainer'] / r['eager_trainer']:.2f}")
    report(
        f"targets: Trainer ≥ {TARGETS['trainer_vs_bare']}× bare; compiled ≥ {TARGETS['compile_vs_eager']}× "
        "eager for vit_small at 224 px (GPU)"
    )


class _Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.values.append(metrics[TRAIN_LOSS])


def section_bf16(report: Report, gpu: bool, quick: bool) -> None:
    if not gpu:
        report("skipped: bf16 autocast is refused on CPU (train.precision=bf16 is for CUDA)")
        return
    out = Path(tempfile.mkdtemp(prefix="lejepa-bf16-"))
    means = {}
    for precision in ("fp32", "bf16"):
        cfg = _config(
            out,
            "data.name=digits-shifted",
            "data.resolution=32",
            "model.arch=resnet18",
            "views.local_views=2",
            "optim.batch_size=128",
            "train.max_steps=50",
            "train.log_every=1",
            f"train.precision={precision}",
            "train.compile=eager",
            "train.epochs=100",
        )
        rec = _Losses()
        Trainer(cfg, [rec], run_dir=out / precision).fit()
        means[precision] = statistics.fmean(rec.values[40:50])
        report(f"{precision}: mean loss of steps 41–50 = {means[precision]:.5f} (step 50: {rec.values[49]:.5f})")
    rel = abs(means["bf16"] - means["fp32"]) / abs(means["fp32"])
    report(
        f"bf16 vs fp32: relative difference {rel:.4f} (target ≤ {TARGETS['bf16_loss']}) "
        f"{'met' if rel <= TARGETS['bf16_loss'] else 'NOT met'}"
    )


def _train_cmd(out: Path, name: str, gpu: bool) -> list[str]:
    size = (
        ["model.arch=resnet10t", "data.resolution=32"]
        if gpu
        else ["model.arch=test_resnet", "data.resolution=16", "loss.num_slices=32", "train.max_steps=3", "train.threads=1"]
    )
    return [
        sys.executable,
        "-m",
        "lejepa",
        "train",
        "--no-tracking",
        "data.name=digits-shifted",
        *size,
        "views.local_views=2",
        "optim.batch_size=64",
        "train.epochs=1",
        "train.eval_probe_epochs=5",
        "train.compile=eager",
        f"train.out_dir={out}",
        f"train.run_name={name}",
        f"train.device={'cuda' if gpu else 'cpu'}",
    ]


def section_packing(report: Report, gpu: bool, quick: bool) -> None:
    trials = 4 if gpu else 2
    out = Path(tempfile.mkdtemp(prefix="lejepa-packing-"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def run(names: list[str]) -> float:
        start = time.perf_counter()
        procs = [
            subprocess.Popen(_train_cmd(out, n, gpu), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for n in names
        ]
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"trial exited {p.returncode}: {err.strip().splitlines()[-1:]}")
        return time.perf_counter() - start

    sequential = sum(run([f"seq{i}"]) for i in range(trials))
    packed = run([f"packed{i}" for i in range(trials)])
    what = "resnet10t, digits-shifted 32 px, 1 epoch" if gpu else "test_resnet, 16 px, 3 steps"
    report(
        f"{trials} trials ({what}, each its own process): one after another "
        f"{sequential:.1f} s, {trials} at once on one {'GPU' if gpu else 'CPU'} {packed:.1f} s, "
        f"speed-up {sequential / packed:.2f}×"
    )


def section_tests(report: Report, gpu: bool, quick: bool) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfE",
        "-p",
        "no:cacheprovider",
        "-k",
        "cuda",
        str(ROOT / "tests" / "test_trainer.py"),
        str(ROOT / "tests" / "test_views.py"),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("FAILED", "ERROR", "E  ")):
            report(f"    {line[:300]}")
    report(f"`pytest -k cuda`: {lines[-1] if lines else done.stderr.strip()[-200:]} (exit {done.returncode})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the reduced check (always so without CUDA)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="on CPU: also time train.compile=default, with resnet10t at 32 px (compiling takes minutes on 2 cores)",
    )
    p.add_argument("--only", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    args = p.parse_args(argv)
    chosen = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(","))
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    gpu = torch.cuda.is_available()
    report = Report()
    report(f"# GPU check ({'CUDA' if gpu and not args.quick else 'reduced'}), {time.strftime('%Y-%m-%d %H:%M')}")
    failed = []
    total = time.perf_counter()
    for name in chosen:
        report()
        report(f"## {name}")
        start = time.perf_counter()
        try:
            if name == "trainer":
                section_trainer(report, gpu, args.quick, args.compile)
            else:
                globals()[f"section_{name}"](report, gpu, args.quick)
        except Exception as exc:  # a failing section is reported, the others still run
            failed.append(name)
            report(f"FAILED: {type(exc).__name__}: {first_line(exc, '')}")
            traceback.print_exc()
        report(f"({time.perf_counter() - start:.0f} s)")
        report.save(args.out / "gpu_check.md")  # after each section: a check cut off at its time limit keeps them
    report()
    report(f"total {time.perf_counter() - total:.0f} s; " + (f"failed: {', '.join(failed)}" if failed else "all sections ran"))
    report.save(args.out / "gpu_check.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
