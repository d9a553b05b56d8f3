"""Cost of the per-step health measures (issue 13 target: at most 2 % of the step time).

One Trainer (the quickstart's recipe by default: resnet10t, fashion-mnist-shifted, 32 px, batch
128, 2 global views); steps alternate between measuring health and not, so both see the same
machine load, and the ratio of the median step times is printed. Beside it, the direct cost:
:func:`lejepa.health.batch_health` timed alone on the step's own projections and features,
over the median step time. This is the cost of a measured step; training measures one step in
``train.log_every`` (10 by default), so its average cost is a tenth of it.

    .venv/bin/python benchmarks/health_overhead.py [--steps 40] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from collapse_map import TESTBED  # benchmarks/: the same small testbed

from lejepa.config import load_config
from lejepa.health import batch_health
from lejepa.trainer import Trainer

BASE = [*TESTBED, "train.out_dir=/tmp/lejepa-health-bench"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps with health on (and as many off)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(None, [*BASE, *args.overrides])
    trainer = Trainer(cfg, [])
    batches = iter(trainer.loader)
    timings: dict[bool, list[float]] = {True: [], False: []}
    direct: list[float] = []
    sync = torch.cuda.synchronize if trainer.rt.device.type == "cuda" else (lambda: None)
    for i in range(2 * args.steps + 4):
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(trainer.loader)
            images, labels = next(batches)
        on = i % 2 == 0
        sync()
        start = time.perf_counter()
        trainer._train_step(images, labels, measure=on)
        sync()
        if i >= 4:  # warm-up
            timings[on].append(time.perf_counter() - start)
        if on and i >= 4:
            with torch.no_grad():
                views = trainer.views(images.to(trainer.rt.device), trainer.view_gen).global_views
                feats, proj = trainer.model([views[0]])
            sync()
            t0 = time.perf_counter()
            batch_health(proj[0], feats[0])
            sync()
            direct.append(time.perf_counter() - t0)
    on, off = statistics.median(timings[True]), statistics.median(timings[False])
    cost = statistics.median(direct)
    print(
        f"{cfg.model.arch}, batch {cfg.optim.batch_size}, {cfg.views.global_views}+{cfg.views.local_views} views, "
        f"device {trainer.rt.device}, {torch.get_num_threads()} threads, {args.steps} steps each"
    )
    print(f"median step: health on {1000 * on:.1f} ms, off {1000 * off:.1f} ms, ratio on/off {on / off:.3f}")
    print(f"batch_health alone: {1000 * cost:.2f} ms = {100 * cost / off:.2f} % of the step (target <= 2 %)")


if __name__ == "__main__":
    main()
