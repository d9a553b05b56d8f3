"""SIGReg forward + backward: the fast path (lejepa.sigreg.SIGReg) against the direct formula.

Both compute mean over views and slices of EP(z·A) from z (V, N, K) with fixed directions A
(K, M) and 17 knots, then backpropagate to z; the direct formula materialises x·t_k for every
knot, takes cos/sin and lets autograd differentiate (lejepa.sigreg.epps_pulley_direct).

Time: wall clock of one forward + backward, the two implementations interleaved in the same
process, minimum over repeats (the machine may be shared; both get the same treatment).

Peak memory: the high-water mark of bytes held by tensors allocated during forward + backward,
above what was live before (z, A). On CPU it is replayed from the torch profiler's allocation
trace (profile_memory=True records every allocation and free of torch's CPU allocator, with its
size, in order; the running sum's maximum is the peak); on CUDA it is max_memory_allocated
(lejepa.profiling.peak_allocated_bytes).
This counts autograd's saved tensors, temporaries and gradients alike, and nothing else (not
the Python heap, not allocator caching), so the two implementations are compared like for like.

Run: python benchmarks/sigreg.py [--threads T]   (exit status 1 if a headline target is missed).
On an oversubscribed CPU (load above the core count) multi-threaded timings measure scheduling
stalls at every parallel op, not the code: the load average is printed; use --threads 1 there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

from lejepa.profiling import peak_allocated_bytes
from lejepa.sigreg import SIGReg, epps_pulley_direct, sample_directions

KNOTS = 17
V, K = 8, 128
HEADLINE = (256, 1024)  # N, M
GRID_N, GRID_M = (64, 256, 1024), (256, 1024, 4096)
TARGET_TIME, TARGET_MEMORY, TARGET_VALUE = 0.25, 0.10, 1e-5
MiB = 2**20


def fast_loss(z, a):
    return SIGReg(num_slices=a.shape[1], knots=KNOTS)(z, directions=a)


def triton_loss(z, a):
    return SIGReg(num_slices=a.shape[1], knots=KNOTS, kernel="triton")(z, directions=a)


def direct_loss(z, a):
    return epps_pulley_direct(z @ a, knots=KNOTS).mean()


def forward_backward(loss_fn: Callable, z, a, autocast: torch.dtype | None):
    z.grad = None
    with torch.autocast(z.device.type, dtype=autocast, enabled=autocast is not None):
        loss = loss_fn(z, a)
    loss.backward()
    return loss.detach().float(), z.grad


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run: Callable, device) -> float:
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - start


def direct_fits(n: int, m: int, device) -> bool:
    """The direct formula holds ≈ 6·knots copies of x (measured); keep it within half the room."""
    need = 6 * KNOTS * V * n * m * 4
    room = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 * 2**30
    return need < room / 2


def compare(n: int, m: int, device, autocast: torch.dtype | None, min_seconds: float = 3.0, triton: bool = False) -> dict:
    """Time and peak memory of ours (``fast``), the direct formula and, with ``triton``, the fused
    Triton kernels, interleaved; ratios to the direct formula, relative differences of values and
    gradients."""
    gen = torch.Generator(device).manual_seed(0)
    z = torch.randn(V, n, K, generator=gen, device=device, requires_grad=True)
    a = sample_directions(K, m, seed=0, device=device)
    runs = {"fast": lambda: forward_backward(fast_loss, z, a, autocast)}
    if triton:
        runs["triton"] = lambda: forward_backward(triton_loss, z, a, autocast)
    if direct_fits(n, m, device):
        runs["direct"] = lambda: forward_backward(direct_loss, z, a, autocast)
    out = {name: run() for name, run in runs.items()}  # warm-up, and the values to compare
    times = {name: [] for name in runs}
    while True:
        for name, run in runs.items():
            times[name].append(seconds(run, device))
        slowest = max(min(t) for t in times.values())
        reps = len(times["fast"])
        if reps >= 10 or (reps >= 3 and reps * slowest >= min_seconds):
            break
    row = {f"{name}_ms": 1e3 * min(t) for name, t in times.items()}
    row.update({f"{name}_mib": peak_allocated_bytes(run, device) / MiB for name, run in runs.items()})
    if "direct" in runs:
        (fast, fast_grad), (direct, direct_grad) = out["fast"], out["direct"]
        row["time_ratio"] = row["fast_ms"] / row["direct_ms"]
        row["memory_ratio"] = row["fast_mib"] / row["direct_mib"]
        row["value_diff"] = float((fast - direct).abs() / direct.abs())
        row["grad_diff"] = float((fast_grad - direct_grad).abs().max() / direct_grad.abs().max())
        if triton:
            value, grad = out["triton"]
            row["triton_time_ratio"] = row["triton_ms"] / row["direct_ms"]
            row["triton_memory_ratio"] = row["triton_mib"] / row["direct_mib"]
            row["triton_value_diff"] = float((value - direct).abs() / direct.abs())
            row["triton_grad_diff"] = float((grad - direct_grad).abs().max() / direct_grad.abs().max())
    return row


def table(device, autocast: torch.dtype | None) -> None:
    print(
        f"{'N':>5} {'M':>5} | {'fast ms':>8} {'direct ms':>9} {'time ×':>7} | "
        f"{'fast MiB':>8} {'direct MiB':>10} {'mem ×':>6} | {'value rel':>9} {'grad rel':>9}"
    )
    for n in GRID_N:
        for m in GRID_M:
            r = compare(n, m, device, autocast, min_seconds=1.0)
            if "direct_ms" in r:
                print(
                    f"{n:>5} {m:>5} | {r['fast_ms']:8.2f} {r['direct_ms']:9.1f} "
                    f"{r['time_ratio']:7.3f} | {r['fast_mib']:8.1f} {r['direct_mib']:10.1f} "
                    f"{r['memory_ratio']:6.3f} | {r['value_diff']:9.1e} {r['grad_diff']:9.1e}"
                )
            else:
                print(f"{n:>5} {m:>5} | {r['fast_ms']:8.2f} {'(too big)':>9} {'':>7} | {r['fast_mib']:8.1f} {'':>10} {'':>6} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}, V={V} K={K} knots={KNOTS}"
    )
    n, m = HEADLINE
    r = compare(n, m, cpu, None)
    ok = r["time_ratio"] <= TARGET_TIME and r["memory_ratio"] <= TARGET_MEMORY and r["value_diff"] <= TARGET_VALUE
    print(f"\nHeadline (CPU, fp32), V={V} N={n} K={K} M={m}, forward + backward:")
    print(
        f"  time   fast {r['fast_ms']:.1f} ms, direct {r['direct_ms']:.1f} ms, "
        f"ratio {r['time_ratio']:.3f} (target <= {TARGET_TIME})"
    )
    print(
        f"  memory fast {r['fast_mib']:.1f} MiB, direct {r['direct_mib']:.1f} MiB, "
        f"ratio {r['memory_ratio']:.4f} (target <= {TARGET_MEMORY})"
    )
    print(
        f"  value  relative difference {r['value_diff']:.1e} (target <= {TARGET_VALUE}), "
        f"gradient max relative difference {r['grad_diff']:.1e}"
    )
    print(f"  targets met: {'yes' if ok else 'NO'}")

    print("\nCPU, fp32:")
    table(cpu, None)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        for autocast, label in ((None, "fp32"), (torch.bfloat16, "bf16 autocast")):
            print(f"\n{torch.cuda.get_device_name(gpu)}, {label}:")
            table(gpu, autocast)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
