"""Trainer overhead: images/s of the Trainer's epoch loop vs a bare loop, side by side.

Both loops use the same model, views, SIGReg, optimiser, data and batch; the bare loop has no
probe, no scheduler, no callbacks, no metric bookkeeping. Rounds alternate (bare, trainer,
bare, trainer, …) so that machine load hits both alike; the ratio of medians is printed.

    .venv/bin/python benchmarks/train_throughput.py [key=value ...] [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lejepa.config import load_config
from lejepa.objective import lejepa_loss
from lejepa.record import EPOCH_IMAGES_PER_SEC
from lejepa.trainer import Trainer


def bare_images_per_sec(trainer: Trainer, steps: int) -> float:
    """A minimal LeJEPA loop over the trainer's own loader, views, model and optimiser."""
    model, views, sigreg, opt = trainer.train_model, trainer.views, trainer.sigreg, trainer.optimizer
    lam, vg = trainer.cfg.loss.lam, trainer.num_global
    model.train()
    seen, start = 0, time.perf_counter()
    for i, (images, _) in enumerate(trainer.loader):
        if i == steps:
            break
        v = views(images.to(trainer.rt.device), trainer.view_gen)
        view_list = list(v.global_views) + (list(v.local_views) if v.local_views is not None else [])
        with trainer.rt.autocast():
            _, proj = model(view_list)
        loss = lejepa_loss(proj.float(), vg, sigreg, lam).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += images.shape[0]
    if trainer.rt.device.type == "cuda":
        torch.cuda.synchronize(trainer.rt.device)
    return seen / (time.perf_counter() - start)


def trainer_images_per_sec(trainer: Trainer, steps: int) -> float:
    """The Trainer's own epoch loop (as `lejepa train` runs it), cut at ``steps`` steps."""
    trainer.cfg.train.max_steps = trainer.step + steps
    return trainer._run_epoch()[EPOCH_IMAGES_PER_SEC]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    cfg = load_config(None, ["tracking.enabled=false", "train.out_dir=/tmp/lejepa-bench", *args.overrides])
    trainer = Trainer(cfg)
    print(
        f"{cfg.model.arch} @ {cfg.data.resolution}px, batch {cfg.optim.batch_size}, "
        f"{cfg.views.global_views}+{cfg.views.local_views} views, M={cfg.loss.num_slices}, "
        f"{torch.get_num_threads()} threads, {args.steps} steps per round"
    )
    bare_images_per_sec(trainer, 2)  # warm-up
    bare, ours = [], []
    for r in range(args.rounds):
        bare.append(bare_images_per_sec(trainer, args.steps))
        ours.append(trainer_images_per_sec(trainer, args.steps))
        print(f"round {r + 1}: bare {bare[-1]:.1f} img/s   trainer {ours[-1]:.1f} img/s")
    ratio = statistics.median(ours) / statistics.median(bare)
    print(
        f"median: bare {statistics.median(bare):.1f} img/s, trainer {statistics.median(ours):.1f} img/s, "
        f"ratio {ratio:.3f} (target >= 0.95)"
    )


if __name__ == "__main__":
    main()
