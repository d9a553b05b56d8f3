"""Health measures against direct formulas: the collapse ratio of constant and Gaussian columns,
the effective rank of constructed rank-r data, the per-dimension spread."""

from __future__ import annotations

import math

import pytest
import torch

from lejepa.health import collapse_ratio, collapsed_ep, effective_rank, std_spread
from lejepa.sigreg import SIGReg


def direct_ep(x: list[float], t_max: float, knots: int) -> float:
    """EP of one column by the trapezoid formula, term by term (independent of lejepa.sigreg)."""
    n, dt = len(x), t_max / (knots - 1)
    total = 0.0
    for k in range(knots):
        t = k * dt
        w = dt if k in (0, knots - 1) else 2 * dt
        phi = math.exp(-t * t / 2)
        c = sum(math.cos(t * v) for v in x) / n
        s = sum(math.sin(t * v) for v in x) / n
        total += w * phi * ((c - phi) ** 2 + s ** 2)
    return n * total


@pytest.mark.parametrize("n, t_max, knots", [(64, 3.0, 17), (512, 3.0, 17), (100, 5.0, 9)])
def test_collapsed_ep_is_the_constant_column_statistic(n, t_max, knots):
    assert collapsed_ep(n, t_max, knots) == pytest.approx(direct_ep([0.0] * n, t_max, knots), rel=1e-9)
    if (t_max, knots) == (3.0, 17):
        assert collapsed_ep(n) / n == pytest.approx(0.402, abs=0.001)  # the figure quoted in issue 13
    for a in (0.3, 1.0, 2.5):  # any other constant column scores more
        assert direct_ep([a] * n, t_max, knots) > collapsed_ep(n, t_max, knots)


def test_collapse_ratio_one_for_collapsed_near_zero_for_gaussian():
    torch.manual_seed(0)
    sigreg = SIGReg(num_slices=256)
    n = 256
    constant = torch.zeros(n, 32)
    assert collapse_ratio(float(sigreg(constant)), n) == pytest.approx(1.0, rel=1e-5)
    gaussian = torch.randn(n, 32)
    assert collapse_ratio(float(sigreg(gaussian)), n) < 0.02
    half = gaussian.clone()
    half[:, 16:] = 0.0  # half the dimensions collapsed: in between
    assert 0.02 < collapse_ratio(float(sigreg(half)), n) < 1.0


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_effective_rank_of_rank_r_data(rank):
    torch.manual_seed(rank)
    basis = torch.linalg.qr(torch.randn(64, rank)).Q  # orthonormal directions, equal spread
    z = torch.linalg.qr(torch.randn(2048, rank)).Q @ basis.T
    assert effective_rank(z) == pytest.approx(rank, rel=0.01)
    assert effective_rank(torch.zeros(10, 5)) == 0.0


def test_std_spread():
    torch.manual_seed(0)
    assert std_spread(torch.randn(4096, 16)) < 0.05
    scaled = torch.randn(4096, 2) * torch.tensor([1.0, 3.0])
    assert std_spread(scaled) == pytest.approx(math.sqrt(2) * 1.0 / 2.0, rel=0.05)  # std of (1, 3) / mean 2
