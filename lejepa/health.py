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

import numpy as np
import torch
from scipy.special import entr
from torch import Tensor

from lejepa.sigreg import epps_pulley

EPS = 1e-7


def collapsed_ep(n: int, t_max: float = 3.0, knots: int = 17) -> float:
    """EP of N identical samples at 0 with the SIGReg quadrature (see the module docstring)."""
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


def effective_rank(z: Tensor | np.ndarray, eps: float = EPS) -> float:
    """RankMe of z [N, D] (not centred, as in the paper): :func:`entropy_rank` of its singular
    values; 0 for an all-zero matrix."""
    sigma = singular_values(torch.as_tensor(z).detach())
    return entropy_rank(sigma, eps) if sigma.sum() > 0 else 0.0


def std_spread(z: Tensor) -> float:
    """std / mean of the per-dimension standard deviations of z [N, D] (0 = equal spread)."""
    std = z.detach().to(torch.float64).std(dim=0)
    mean = float(std.mean())
    return float(std.std()) / mean if mean > 0 else float("inf")
