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
of the training split, and, where labels exist, the frozen linear probe, timing each. With a
``cache`` (a CSV file; ``lejepa select`` keeps :data:`~lejepa.record.CRITERIA_CACHE` in its
report folder) each checkpoint's row is kept as soon as it is computed, so an interrupted or
repeated call computes only the rest.

All ``score.*`` columns are oriented higher = predicted better.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lejepa.checkpoint import read_meta
from lejepa.errors import CheckpointError, first_line
from lejepa.health import EPS, effective_rank, singular_values
from lejepa.health import entropy_rank as _entropy_rank
from lejepa.record import CHECKPOINTS_DIR

if TYPE_CHECKING:
    from lejepa.config import Config

LABELS = {"rankme": "RankMe", "lidar": "LiDAR", "alpha_req": "α-ReQ (−|α−1|)"}

CACHE_KEY = ("checkpoint", "key.sha256", "key.sample_size", "key.lidar_images", "key.lidar_views", "key.probe", "key.seed")
"""What a cached row must match to be reused: the checkpoint's path, the SHA-256 its ``meta.json``
holds (a rewritten checkpoint has another), and the settings that change the numbers."""
VALUES = ("time.features", "rankme", "time.rankme", "alpha_req", "time.alpha_req", "lidar", "time.lidar")
PROBE_VALUES = ("probe_acc", "time.probe")
CACHE_COLUMNS = (*CACHE_KEY, *VALUES, *PROBE_VALUES)
"""The cache's header; a file with another one (another version) is ignored."""


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


class CriteriaInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during :func:`evaluate_checkpoints` with a cache: the rows of ``kept``
    of the ``total`` checkpoints are in ``cache``."""

    def __init__(self, kept: int, total: int, cache: Path) -> None:
        super().__init__(f"{kept} of {total} checkpoints' criteria kept in {cache}")
        self.kept, self.total, self.cache = kept, total, cache


def evaluate_checkpoints(
    checkpoints: Iterable[Path | str],
    sample_size: int = 1024,
    lidar_images: int = 128,
    lidar_views: int = 8,
    probe: bool = True,
    seed: int = 0,
    log: Callable[[str], object] | None = None,
    cache: Path | str | None = None,
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

    ``log`` gets one line first (how many are cached, how many to compute), then one per
    checkpoint: its time and the estimated time left, or ``cached``.
    With ``cache`` (a CSV file), a row whose :data:`CACHE_KEY` matches is reused as it was
    computed (the result is the same), and after each computed checkpoint the file is replaced
    atomically by the rows of this call so far; an unreadable or foreign file is a one-line
    warning and is recomputed. Interrupted (KeyboardInterrupt), it raises
    :class:`CriteriaInterrupted` saying how many rows the cache keeps.
    """
    say: Callable[[str], object] = log if log is not None else (lambda m: None)
    paths = [str(p) for p in checkpoints]
    settings = {
        "key.sample_size": str(sample_size),
        "key.lidar_images": str(lidar_images),
        "key.lidar_views": str(lidar_views),
        "key.probe": str(bool(probe)),
        "key.seed": str(seed),
    }
    keys = {p: {"checkpoint": p, "key.sha256": _identity(p), **settings} for p in paths}
    cache = None if cache is None else Path(cache)
    stored = {} if cache is None else _read_cache(cache, log or (lambda m: print(m, file=sys.stderr)))
    kept = {  # the cache's rows of this call, by checkpoint
        p: stored[p] for p, key in keys.items() if key["key.sha256"] and p in stored and _matches(stored[p], key)
    }
    total, todo, written = len(paths), len(paths) - len(kept), len(kept)
    say(
        f"criteria: {total} checkpoints, {len(kept)} cached in {cache}, {todo} to compute"
        if cache is not None
        else f"criteria: {total} checkpoints to compute"
    )
    contexts: dict[str, _Context] = {}
    rows: list[dict[str, object]] = []
    spent: list[float] = []
    try:
        for i, path in enumerate(paths, 1):
            if path in kept:
                rows.append(_from_cache(kept[path], probe))
                say(f"criteria [{i}/{total}] {_short(path)}: cached")
                continue
            t0 = time.perf_counter()
            values = _evaluate(path, contexts, sample_size, lidar_images, lidar_views, probe, seed)
            spent.append(time.perf_counter() - t0)
            rows.append({"checkpoint": path, **values})
            if cache is not None:
                kept[path] = {**keys[path], **{c: _text(values.get(c, math.nan)) for c in (*VALUES, *PROBE_VALUES)}}
                _write_cache(cache, [kept[p] for p in paths if p in kept])
                written = len(kept)
            left = todo - len(spent)
            say(
                f"criteria [{i}/{total}] {_short(path)}: {spent[-1]:.1f} s (RankMe {values['rankme']:.2f}, "
                f"LiDAR {values['lidar']:.2f}, α-ReQ {values['alpha_req']:.2f})"
                + (f", about {_duration(left * sum(spent) / len(spent))} left" if left else "")
            )
    except KeyboardInterrupt:
        if cache is None:
            raise
        raise CriteriaInterrupted(written, total, cache) from None
    out = pd.DataFrame(rows)
    if len(out):
        out["score.rankme"] = out["rankme"]
        out["score.lidar"] = out["lidar"]
        out["score.alpha_req"] = out["alpha_req"].map(alpha_req_score)
    return out


def _evaluate(
    path: str, contexts: dict[str, _Context], sample_size: int, lidar_images: int, lidar_views: int, probe: bool, seed: int
) -> dict[str, float]:
    """The criteria and timings of one checkpoint (``contexts``: the shared data, by data/views config)."""
    from lejepa.probes import linear_probe

    backbone, cfg = load_backbone(path)
    key = json.dumps([cfg.data.model_dump(mode="json"), cfg.views.model_dump(mode="json")], sort_keys=True)
    if key not in contexts:
        contexts[key] = _Context(cfg, sample_size, lidar_images, lidar_views, seed)
    ctx = contexts[key]
    row: dict[str, float] = {}
    t0 = time.perf_counter()
    feats = _features(backbone, ctx.sample)
    row["time.features"] = features_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    row["rankme"] = float(rankme(feats))
    row["time.rankme"] = features_s + time.perf_counter() - t0
    t0 = time.perf_counter()
    row["alpha_req"] = float(alpha_req(feats))
    row["time.alpha_req"] = features_s + time.perf_counter() - t0
    t0 = time.perf_counter()
    n, q = ctx.views.shape[:2]
    view_feats = _features(backbone, ctx.views.flatten(0, 1)).reshape(n, q, -1)
    row["lidar"] = float(lidar(view_feats))
    row["time.lidar"] = time.perf_counter() - t0
    if probe:
        tx, ty, vx, vy = ctx.labelled()
        t0 = time.perf_counter()
        row["probe_acc"] = float(
            linear_probe(
                _features(backbone, tx),
                ty,
                _features(backbone, vx),
                vy,
                ctx.data.num_classes,
                epochs=cfg.train.eval_probe_epochs,
                seed=cfg.train.seed,
            )
        )
        row["time.probe"] = time.perf_counter() - t0
    return row


# --------------------------------------------------------------------------- the cache
def _identity(path: str) -> str:
    """The SHA-256 of the checkpoint's state that its ``meta.json`` holds; '' when unreadable."""
    try:
        return str(read_meta(Path(path)).get("sha256") or "")
    except CheckpointError:
        return ""


def _matches(row: dict[str, str], key: dict[str, str]) -> bool:
    return all(row[c] == v for c, v in key.items())


def _text(value: float) -> str:
    """A value as the cache writes it: ``repr`` (reads back to the same float), '' for NaN."""
    return "" if math.isnan(value) else repr(float(value))


def _from_cache(row: dict[str, str], probe: bool) -> dict[str, object]:
    """A cached row as :func:`evaluate_checkpoints` returns a computed one."""
    names = (*VALUES, *PROBE_VALUES) if probe else VALUES
    return {"checkpoint": row["checkpoint"], **{c: float(row[c]) if row[c] else math.nan for c in names}}


def _read_cache(cache: Path, warn: Callable[[str], object]) -> dict[str, dict[str, str]]:
    """The rows of ``cache`` by checkpoint; {} when there is none, or (with one warning line)
    when it cannot be read or has other columns than :data:`CACHE_COLUMNS`."""
    if not cache.exists():
        return {}
    try:
        with open(cache, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            if next(reader, None) != list(CACHE_COLUMNS):
                raise ValueError("its columns are not this version's")
            rows = {}
            for fields in reader:
                if len(fields) != len(CACHE_COLUMNS):
                    raise ValueError(f"line {reader.line_num} has {len(fields)} fields, not {len(CACHE_COLUMNS)}")
                row = dict(zip(CACHE_COLUMNS, fields, strict=True))
                for c in (*VALUES, *PROBE_VALUES):
                    float(row[c] or "nan")  # a malformed number: the whole file is suspect
                rows[row["checkpoint"]] = row
    except (OSError, ValueError, csv.Error) as exc:  # UnicodeDecodeError is a ValueError
        warn(f"warning: ignoring the criteria cache {cache} ({first_line(exc)}): its checkpoints are computed again")
        return {}
    return rows


def _write_cache(cache: Path, rows: list[dict[str, str]]) -> None:
    """Replace ``cache`` by ``rows`` atomically: a temporary file, synced, renamed over it."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(CACHE_COLUMNS)
            writer.writerows([row[c] for c in CACHE_COLUMNS] for row in rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)


def _short(path: str) -> str:
    """``<run>/epoch_NNNN`` for ``<run>/checkpoints/epoch_NNNN``, else the folder's name."""
    p = Path(path)
    return f"{p.parent.parent.name}/{p.name}" if p.parent.name == CHECKPOINTS_DIR else p.name


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def cost_table(criteria: pd.DataFrame) -> pd.DataFrame:
    """Mean seconds per checkpoint of each criterion and of the linear probe, and the ratio to the probe."""
    names = {**LABELS, "probe": "linear probe"}
    out = pd.DataFrame(
        [{"criterion": name, "seconds": criteria[f"time.{k}"].mean()} for k, name in names.items() if f"time.{k}" in criteria]
    )
    if "time.probe" in criteria:
        out["vs probe"] = out["seconds"] / criteria["time.probe"].mean()
    return out
