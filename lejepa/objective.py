"""The LeJEPA objective (docs/method.md §2).

For projections z ∈ R^{V×B×D} whose first ``num_global`` views are the global ones:

    μ_n        = mean_{v < V_g} z_{v,n}                       (centre of the global views)
    invariance = mean_{v,n,d} (μ_{n,d} − z_{v,n,d})²          (all V views, global and local)
    sigreg     = mean_v SIGReg(z_v)                           (each view separately)
    loss       = (1 − λ)·invariance + λ·sigreg

No predictor, no stop-gradient, no teacher: gradients flow through μ too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor


class LossTerms(NamedTuple):
    """The total loss and its two terms (all scalars)."""

    loss: Tensor
    invariance: Tensor
    sigreg: Tensor


def invariance_loss(proj: Tensor, num_global: int) -> Tensor:
    """mean over views, samples and dimensions of ‖μ_n − z_{v,n}‖², μ = mean of the global views."""
    centre = proj[:num_global].mean(dim=0)
    return (centre.unsqueeze(0) - proj).square().mean()


def lejepa_loss(proj: Tensor, num_global: int, sigreg: Callable[[Tensor], Tensor], lam: float) -> LossTerms:
    """(1 − λ)·invariance + λ·SIGReg for projections [V, B, D] (SIGReg averages over views)."""
    if not 1 <= num_global <= proj.shape[0]:
        raise ValueError(f"num_global={num_global} must be between 1 and the number of views {proj.shape[0]}")
    inv = invariance_loss(proj, num_global)
    reg = sigreg(proj)
    return LossTerms((1.0 - lam) * inv + lam * reg, inv, reg)
