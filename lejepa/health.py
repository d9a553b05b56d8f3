"""Label-free health measures of embeddings, from tensors a training step already holds.

- :func:`collapsed_ep`: the Epps–Pulley statistic of a constant column of N samples at 0,
  N · Σ_k w_k φ(t_k) (1 − φ(t_k))² with the SIGReg quadrature (:mod:`lejepa.sigreg`). A
  constant column at a ≠ 0 scores N · Σ_k w_k φ_k (1 − 2 φ_k cos(t_k a) + φ_k²), never less,
  so this is the smallest value a fully collapsed column can take (≈ 0.40·N at t_max 3, 17 knots).
- :func:`collapse_ratio`: a SIGReg value over :func:`collapsed_ep` at the same N and quadrature:
  about 0 for Gaussian embeddings (EP of a Gaussian sample is O(1), not O(N)), 1 or more when the
  sliced columns are constant. It puts runs of different batch sizes on one scale.
- :func:`effective_rank`: RankMe (Garrido et al.), exp(entropy) of the normalised singular values
  of an N × D matrix: ≈ r for data of rank r with equal spread; D at most.
- :func:`std_spread`: coefficient of variation of the per-dimension standard deviations
  (0 when every dimension has the same spread, as an isotropic Gaussian has).
- :func:`batch_health`: the per-step measures the trainer averages per epoch, as one tensor on
  the step's device (no host synchronisation), and :func:`verdict`, an epoch's diagnosis from
  them: ``collapsed`` when the collapse ratio is at least :data:`COLLAPSED_RATIO`, else
  ``dimensional collapse`` when the projector's effective rank is below
  :data:`DIMENSIONAL_RANK` of its largest possible value, else ``healthy``; a non-finite loss is
  ``diverged``. Both thresholds are measured (see the constants).
- :func:`collapse_risk`: whether a (λ, batch size) pair lies in the measured collapse region.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.special import entr
from torch import Tensor

from lejepa.record import COLLAPSED, DIMENSIONAL, DIVERGED, HEALTHY
from lejepa.record import HEALTH_METRICS as HEALTH_METRICS  # the epoch metrics these measures are logged as
from lejepa.record import VERDICTS as VERDICTS  # verdict names; ``health/verdict`` is the index here
from lejepa.sigreg import epps_pulley

EPS = 1e-7

COLLAPSED_RATIO = 0.375
"""Collapse ratio at or above which an epoch is ``collapsed``: what every slice would score if the
embedding were the target Gaussian shrunk to half its standard deviation (0.376 at the default
quadrature). Measured (benchmarks/results): runs that trained well end at 0.04–0.25; runs at
λ·N ≤ 0.64 reach 0.35–1.0 with a projector rank ≤ 0.2."""
DIMENSIONAL_RANK = 0.25
"""Projector effective rank / min(batch, dimension) below which an epoch is ``dimensional
collapse``. Measured: healthy cells of the collapse map 0.27–0.56; cells going wrong at a ratio of only
0.35–0.63 had 0.10–0.18 (a fully collapsed embedding can keep any rank: its scale is gone)."""
LAMBDA_BATCH_MIN = 1.0
"""λ·N (batch size) below which training collapses. Measured by benchmarks/collapse_map.py
(resnet10t, fashion-mnist-shifted, 2 global views, 60 steps): every cell with λ·N ≤ 0.64 ended
unhealthy, every cell with λ·N ≥ 0.77 healthy. SIGReg is N times a distance between
characteristic functions, so its pull against the invariance term grows with λ·N."""


@functools.lru_cache(maxsize=256)
def collapsed_ep(n: int, t_max: float = 3.0, knots: int = 17) -> float:
    """EP of N identical samples at 0 with the SIGReg quadrature (see the module docstring);
    cached: a sweep table asks for the same few (N, quadrature) pairs on every row."""
    return float(epps_pulley(torch.zeros(n, 1, dtype=torch.float64), t_max, knots))


def collapse_ratio(sigreg: float, n: int, t_max: float = 3.0, knots: int = 17) -> float:
    """``sigreg`` (one view's sliced EP at batch size ``n``) over :func:`collapsed_ep`."""
    return float(sigreg) / collapsed_ep(n, t_max, knots)


def entropy_rank(weights: np.ndarray, eps: float = EPS) -> float:
    """exp(−Σ p log p) of p = w / Σw + ε (the effective rank of a non-negative spectrum)."""
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    p = w / w.sum() + eps
    return float(np.exp(entr(p).sum()))


def singular_values(z: Tensor | np.ndarray) -> np.ndarray:
    """Singular values of an N×K matrix, descending, from the eigenvalues of its smaller Gram
    matrix (float64; as accurate as needed here and much faster than an SVD on a busy CPU)."""
    z = torch.as_tensor(z, dtype=torch.float64)
    gram = z.T @ z if z.shape[0] >= z.shape[1] else z @ z.T
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0).numpy()


def _effective_rank(z: Tensor, eps: float = EPS) -> Tensor:
    """RankMe of z [N, D] as a 0-d float64 tensor on z's device (0 for an all-zero matrix, NaN
    when z holds a NaN or infinity: a diverging step must not stop on a failed eigensolver)."""
    z = z.detach().to(torch.float64)
    finite = torch.isfinite(z).all()
    z = torch.where(finite, z, torch.zeros_like(z))  # no host synchronisation
    gram = z.T @ z if z.shape[0] >= z.shape[1] else z @ z.T
    try:
        sigma = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    except torch.linalg.LinAlgError:  # only for pathological finite input
        return torch.tensor(float("nan"), dtype=torch.float64, device=z.device)
    total = sigma.sum()
    p = sigma / total.clamp_min(torch.finfo(torch.float64).tiny) + eps
    rank = torch.where(total > 0, torch.exp(torch.special.entr(p).sum()), torch.zeros_like(total))
    return torch.where(finite, rank, torch.full_like(rank, float("nan")))


def effective_rank(z: Tensor | np.ndarray, eps: float = EPS) -> float:
    """RankMe of z [N, D] (not centred, as in the paper): exp(entropy) of its normalised
    singular values (as :func:`entropy_rank`); 0 for an all-zero matrix."""
    return float(_effective_rank(torch.as_tensor(z), eps))


def batch_health(proj: Tensor, feats: Tensor) -> Tensor:
    """[projector effective rank / min(N, D), projector std spread, feature effective rank /
    min(N, E)] for one view's projections [N, D] and backbone features [N, E], float64 on their
    device (a rank cannot exceed the smaller side, so both fractions reach 1 at full rank)."""
    std = proj.detach().to(torch.float64).std(dim=0)
    spread = std.std() / std.mean().clamp_min(torch.finfo(torch.float64).tiny)
    return torch.stack([_effective_rank(proj) / min(proj.shape), spread, _effective_rank(feats) / min(feats.shape)])


def verdict(collapse: float, proj_rank: float, loss: float = 0.0) -> str:
    """An epoch's diagnosis from its mean collapse ratio and projector rank fraction."""
    if not (np.isfinite(loss) and np.isfinite(collapse)):
        return DIVERGED
    if collapse >= COLLAPSED_RATIO:
        return COLLAPSED
    if np.isfinite(proj_rank) and proj_rank < DIMENSIONAL_RANK:
        return DIMENSIONAL
    return HEALTHY


def collapse_risk(lam: float, batch_size: int) -> str | None:
    """Why (λ, N) lies in the measured collapse region (λ·N < :data:`LAMBDA_BATCH_MIN`), or None."""
    if lam * batch_size >= LAMBDA_BATCH_MIN:
        return None
    if lam <= 0:
        return "λ = 0 trains without SIGReg: the embedding collapses"
    return (
        f"λ={lam:g} × batch {batch_size} = {lam * batch_size:.2g} lies in the collapse region λ·N < "
        f"{LAMBDA_BATCH_MIN:g} (benchmarks/results/collapse_map): raise loss.lam to ≥ "
        f"{LAMBDA_BATCH_MIN / batch_size:.2g} or the batch size"
    )


def std_spread(z: Tensor) -> float:
    """std / mean of the per-dimension standard deviations of z [N, D] (0 = equal spread)."""
    std = z.detach().to(torch.float64).std(dim=0)
    mean = float(std.mean())
    return float(std.std()) / mean if mean > 0 else float("inf")
