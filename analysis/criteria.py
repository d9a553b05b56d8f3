"""Label-free representation criteria on backbone features (docs/method.md §3), and their cost.

- RankMe (Garrido et al.): σ the singular values of the N×K feature matrix,
  p_k = σ_k / Σσ + ε, RankMe = exp(−Σ p_k log p_k). Higher is better.
- LiDAR (Thilak et al.): n images × q augmentations, each image its own class. Σ_b the
  covariance of the class means, Σ_w the pooled within-class covariance + δI (δ relative:
  δ · tr(Σ_w)/K, so the score is invariant to the feature scale). λ the eigenvalues of
  Σ_w^{-1/2} Σ_b Σ_w^{-1/2}, p = λ/Σλ + ε, LiDAR = exp(−Σ p log p). Higher is better.
- α-ReQ (Agrawal et al.): eigenvalues λ_i of the centred feature covariance, fitted as
  λ_i ∝ i^{−α} by least squares on log λ_i = c − α log i over ranks ``fit_range``; eigenvalues
  below 1e-12·λ_1 are clamped there, so collapsed dimensions show as a steep decay. The score
  is −|α − 1| (α near 1 is best).

:func:`evaluate_checkpoints` computes all three per checkpoint on one fixed unlabeled sample
of the training split, and, where labels exist, the frozen linear probe, timing each.

All ``score.*`` columns are oriented higher = predicted better.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lejepa.health import EPS, effective_rank, singular_values
from lejepa.health import entropy_rank as _entropy_rank

if TYPE_CHECKING:
    from lejepa.config import Config

LABELS = {"rankme": "RankMe", "lidar": "LiDAR", "alpha_req": "α-ReQ (−|α−1|)"}


def rankme(features: Tensor | np.ndarray, eps: float = EPS) -> float:
    """RankMe of an N×K feature matrix (not centred, as in the paper)."""
    return effective_rank(features, eps)


def lidar(features: Tensor | np.ndarray, delta: float = 1e-4, eps: float = EPS) -> float:
    """LiDAR of features [n, q, K]: n images (classes), q augmentations each (q ≥ 2)."""
    z = torch.as_tensor(features, dtype=torch.float64)
    n, q, k = z.shape
    means = z.mean(1)
    centred_means = means - means.mean(0)
    between = centred_means.T @ centred_means / (n - 1)
    within_dev = (z - means[:, None, :]).reshape(n * q, k)
    within = within_dev.T @ within_dev / (n * (q - 1))
    within = within + delta * torch.trace(within) / k * torch.eye(k, dtype=z.dtype)
    evals, evecs = torch.linalg.eigh(within)
    inv_sqrt = evecs @ torch.diag(evals.clamp_min(1e-300).rsqrt()) @ evecs.T
    return _entropy_rank(torch.linalg.eigvalsh(inv_sqrt @ between @ inv_sqrt).numpy(), eps)


def covariance_spectrum(features: Tensor | np.ndarray) -> np.ndarray:
    """Eigenvalues of the centred feature covariance, descending (min(N−1, K) of them)."""
    z = torch.as_tensor(features, dtype=torch.float64)
    s = singular_values(z - z.mean(0))
    return (s**2 / (z.shape[0] - 1))[: min(z.shape[0] - 1, z.shape[1])]


def alpha_req(features: Tensor | np.ndarray, fit_range: tuple[int, int | None] = (1, None)) -> float:
    """The power-law decay α of the covariance spectrum, fitted over ranks [lo, hi] (1-based, inclusive)."""
    spectrum = covariance_spectrum(features)
    spectrum = np.clip(spectrum, spectrum[0] * 1e-12, None)
    lo, hi = fit_range
    ranks = np.arange(1, len(spectrum) + 1)
    keep = (ranks >= lo) & (ranks <= (hi or len(spectrum)))
    slope = np.polyfit(np.log(ranks[keep]), np.log(spectrum[keep]), 1)[0]
    return float(-slope)


def alpha_req_score(alpha: float) -> float:
    """−|α − 1|: higher is better."""
    return -abs(alpha - 1.0)


# --------------------------------------------------------------------------- per checkpoint
@torch.no_grad()
def _features(backbone: torch.nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    return torch.cat([backbone(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)])


def _stack(dataset, indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(uint8 images, labels) of ``dataset`` (or of ``indices`` of it) as two tensors."""
    from torch.utils.data import DataLoader, Subset

    from lejepa.data import batch_collate

    part = dataset if indices is None else Subset(dataset, indices.tolist())
    images, labels = zip(*DataLoader(part, batch_size=1024, shuffle=False, collate_fn=batch_collate))
    return torch.cat(images), torch.cat([torch.as_tensor(y) for y in labels])


class _Context:
    """Data, the fixed sample and its augmented views for one data/views config (shared by checkpoints)."""

    def __init__(self, cfg, sample_size: int, lidar_images: int, lidar_views: int, seed: int) -> None:
        from lejepa.data import build_datasets
        from lejepa.views import ViewSampler

        self.data = build_datasets(cfg.data)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.data.train), generator=gen)  # type: ignore[arg-type]  # map-style: has __len__
        sample, _ = _stack(self.data.train, order[:sample_size])
        self.sample = self.eval_images(sample)
        sampler = ViewSampler(cfg.views, self.data.resolution, self.data.mean, self.data.std)
        anchors = sample[:lidar_images]
        rounds = -(-lidar_views // cfg.views.global_views)
        views = torch.cat([sampler(anchors, gen).global_views for _ in range(rounds)])[:lidar_views]
        self.views = views.transpose(0, 1)  # [n, q, 3, R, R]
        self._labelled: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def eval_images(self, images: Tensor) -> Tensor:
        from lejepa.views import eval_images

        return eval_images(images, self.data.resolution, self.data.mean, self.data.std)

    def labelled(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Eval images and labels of the train and test splits (for the probe), built once."""
        if self._labelled is None:
            (tx, ty), (vx, vy) = _stack(self.data.train), _stack(self.data.test)
            self._labelled = (self.eval_images(tx), ty, self.eval_images(vx), vy)
        return self._labelled


def load_backbone(checkpoint: Path | str) -> tuple[torch.nn.Module, Config]:
    """The backbone of a training checkpoint (eval mode) and the run's :class:`Config`."""
    from lejepa.backbones import build_backbone
    from lejepa.checkpoint import load_checkpoint
    from lejepa.config import build_config

    state, meta = load_checkpoint(Path(checkpoint))
    cfg = build_config(meta["config"], source=f"{checkpoint}/meta.json")
    backbone = build_backbone(cfg.model.arch, cfg.data.resolution, cfg.model.small_stem)
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)})
    return backbone.eval(), cfg


def evaluate_checkpoints(
    checkpoints: Iterable[Path | str],
    sample_size: int = 1024,
    lidar_images: int = 128,
    lidar_views: int = 8,
    probe: bool = True,
    seed: int = 0,
    log=None,
) -> pd.DataFrame:
    """RankMe, LiDAR, α-ReQ (and the frozen linear probe when ``probe``) for each checkpoint.

    All checkpoints with the same data config see the same ``sample_size`` training images
    (seeded; labels unused) and the same ``lidar_images`` × ``lidar_views`` global views drawn
    with the run's augmentations. Times in seconds include each criterion's own forward passes:
    RankMe and α-ReQ share the sample's features (``time.features``); LiDAR embeds its views;
    the probe embeds the labelled train and test splits and fits softmax regression on standardised features
    (:func:`lejepa.probes.linear_probe`, the run's ``train.eval_probe_epochs``). Data loading and
    view sampling, shared by all checkpoints, are not timed.
    Returns one row per checkpoint (column ``checkpoint``) with the raw criteria, their
    ``score.*`` columns, ``probe_acc`` and the timings.
    """
    from lejepa.probes import linear_probe

    contexts: dict[str, _Context] = {}
    rows = []
    for path in checkpoints:
        backbone, cfg = load_backbone(path)
        key = json.dumps([cfg.data.model_dump(mode="json"), cfg.views.model_dump(mode="json")], sort_keys=True)
        if key not in contexts:
            contexts[key] = _Context(cfg, sample_size, lidar_images, lidar_views, seed)
        ctx = contexts[key]
        row: dict[str, object] = {"checkpoint": str(path)}
        t0 = time.perf_counter()
        feats = _features(backbone, ctx.sample)
        row["time.features"] = features_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        row["rankme"] = rankme(feats)
        row["time.rankme"] = features_s + time.perf_counter() - t0
        t0 = time.perf_counter()
        row["alpha_req"] = alpha_req(feats)
        row["time.alpha_req"] = features_s + time.perf_counter() - t0
        t0 = time.perf_counter()
        n, q = ctx.views.shape[:2]
        view_feats = _features(backbone, ctx.views.flatten(0, 1)).reshape(n, q, -1)
        row["lidar"] = lidar(view_feats)
        row["time.lidar"] = time.perf_counter() - t0
        if probe:
            tx, ty, vx, vy = ctx.labelled()
            t0 = time.perf_counter()
            row["probe_acc"] = linear_probe(
                _features(backbone, tx),
                ty,
                _features(backbone, vx),
                vy,
                ctx.data.num_classes,
                epochs=cfg.train.eval_probe_epochs,
                seed=cfg.train.seed,
            )
            row["time.probe"] = time.perf_counter() - t0
        rows.append(row)
        if log is not None:
            log(f"criteria: {path}: RankMe {row['rankme']:.2f}, LiDAR {row['lidar']:.2f}, α-ReQ {row['alpha_req']:.2f}")
    out = pd.DataFrame(rows)
    if len(out):
        out["score.rankme"] = out["rankme"]
        out["score.lidar"] = out["lidar"]
        out["score.alpha_req"] = out["alpha_req"].map(alpha_req_score)
    return out


def cost_table(criteria: pd.DataFrame) -> pd.DataFrame:
    """Mean seconds per checkpoint of each criterion and of the linear probe, and the ratio to the probe."""
    names = {**LABELS, "probe": "linear probe"}
    out = pd.DataFrame(
        [{"criterion": name, "seconds": criteria[f"time.{k}"].mean()} for k, name in names.items() if f"time.{k}" in criteria]
    )
    if "time.probe" in criteria:
        out["vs probe"] = out["seconds"] / criteria["time.probe"].mean()
    return out
