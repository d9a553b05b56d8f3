"""Quality of the default config: frozen linear-probe top-1 after training, with baselines.

Trains `lejepa train`'s default config (digits-shifted, CPU) and prints, on the same test
split and with the same probe (softmax regression on standardised features, AdamW):
  - raw pixels (the normalised eval images, flattened),
  - the randomly initialised backbone (before training),
  - the trained backbone (linear probe and kNN), with the training wall time.
Target: linear probe >= 0.75 within 10 minutes of training on 2 CPU cores.

    .venv/bin/python benchmarks/train_quality.py [key=value ...]
"""

from __future__ import annotations

import argparse
import time

import torch

from lejepa.callbacks import Callback, ConsoleProgress
from lejepa.config import load_config
from lejepa.probes import knn_accuracy, linear_probe
from lejepa.record import KNN_ACC, LINEAR_PROBE_ACC
from lejepa.trainer import Trainer
from lejepa.views import eval_images


class Clock(Callback):
    """Training wall time: from the start of the first epoch to the last checkpoint."""

    def on_train_start(self, info):
        self.start = time.perf_counter()

    def on_checkpoint(self, epoch, step, path, metrics):
        self.elapsed = time.perf_counter() - self.start


def pixels(trainer: Trainer, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    x = eval_images(images, trainer.data.resolution, trainer.data.mean, trainer.data.std)
    return x.flatten(1), labels


def probe(trainer: Trainer, train, test) -> float:
    return linear_probe(
        *train, *test, trainer.data.num_classes, epochs=trainer.cfg.train.eval_probe_epochs, seed=trainer.cfg.train.seed
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(None, ["tracking.enabled=false", "train.out_dir=/tmp/lejepa-bench", *args.overrides])
    clock = Clock()
    trainer = Trainer(cfg, [ConsoleProgress(), clock])
    raw = probe(trainer, pixels(trainer, trainer.data.train), pixels(trainer, trainer.data.test))
    random_train, random_test = trainer.features(trainer.data.train), trainer.features(trainer.data.test)
    rand = probe(trainer, random_train, random_test)
    rand_knn = knn_accuracy(*random_train, *random_test, k=cfg.train.eval_knn_k)
    final = trainer.fit()
    print(
        f"\n{cfg.data.name} @ {cfg.data.resolution}px, {cfg.model.arch}, {cfg.train.epochs} epochs, "
        f"{torch.get_num_threads()} threads; training wall time {clock.elapsed:.0f} s"
    )
    print("| features | linear probe top-1 | kNN top-1 |")
    print("| --- | --- | --- |")
    print(f"| raw pixels | {raw:.3f} | |")
    print(f"| random-init {cfg.model.arch} | {rand:.3f} | {rand_knn:.3f} |")
    print(f"| LeJEPA {cfg.model.arch} | {final[LINEAR_PROBE_ACC]:.3f} | {final[KNN_ACC]:.3f} |")
    ok = final[LINEAR_PROBE_ACC] >= 0.75 and clock.elapsed <= 600
    print(f"target (>= 0.75 within 600 s): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
