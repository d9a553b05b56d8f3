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
"""

from __future__ import annotations

import torch
from torch import Tensor

from lejepa.sigreg import epps_pulley

EPS = 1e-7


def collapsed_ep(n: int, t_max: float = 3.0, knots: int = 17) -> float:
    """EP of N identical samples at 0 with the SIGReg quadrature (see the module docstring)."""
    return float(epps_pulley(torch.zeros(n, 1, dtype=torch.float64), t_max, knots))


def collapse_ratio(sigreg: float, n: int, t_max: float = 3.0, knots: int = 17) -> float:
    """``sigreg`` (one view's sliced EP at batch size ``n``) over :func:`collapsed_ep`."""
    return float(sigreg) / collapsed_ep(n, t_max, knots)


def effective_rank(z: Tensor, eps: float = EPS) -> float:
    """RankMe of z [N, D]: exp(−Σ p log p), p = σ / Σσ + ε over its singular values σ."""
    sigma = torch.linalg.svdvals(z.detach().to(torch.float64))
    if float(sigma.sum()) == 0.0:
        return 0.0
    p = sigma / sigma.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def std_spread(z: Tensor) -> float:
    """std / mean of the per-dimension standard deviations of z [N, D] (0 = equal spread)."""
    std = z.detach().to(torch.float64).std(dim=0)
    mean = float(std.mean())
    return float(std.std()) / mean if mean > 0 else float("inf")
