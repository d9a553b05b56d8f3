"""RankMe, LiDAR and α-ReQ on constructed features with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import criteria


def _orthonormal(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(rows, cols)))
    return q


def test_rankme_of_identity_covariance_is_the_dimension():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20000, 32))
    assert criteria.rankme(z) == pytest.approx(32, rel=0.01)
    assert criteria.rankme(5.0 * z) == pytest.approx(criteria.rankme(z), rel=1e-9)


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_rankme_of_rank_r_sample_is_r(rank):
    rng = np.random.default_rng(rank)
    z = rng.normal(size=(20000, rank)) @ _orthonormal(48, rank, rng).T  # rank-r data in 48 dimensions
    assert criteria.rankme(z) == pytest.approx(rank, rel=0.01)


def test_rankme_by_hand():
    z = np.zeros((6, 4))
    z[0, 0], z[1, 1] = 3.0, 1.0  # singular values 3, 1, 0, 0: p = (0.75, 0.25)
    assert criteria.rankme(z, eps=0.0) == pytest.approx(np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))


def _lidar_sample(n: int, q: int, k: int, spread: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class means with variance ``spread[i]`` along axis i, isotropic unit within-class noise."""
    means = np.zeros((n, k))
    means[:, : len(spread)] = rng.normal(size=(n, len(spread))) * np.sqrt(spread)
    return means[:, None, :] + rng.normal(size=(n, q, k))


def test_lidar_known_answer():
    rng = np.random.default_rng(1)
    n, q, k = 4000, 8, 16
    spread = np.array([8.0, 4.0, 2.0, 1.0])
    z = _lidar_sample(n, q, k, spread, rng)
    # Σ_w = I and Σ_b = diag(spread) + I/q (the means also carry noise of variance 1/q)
    expected_eigs = np.concatenate([spread, np.zeros(k - len(spread))]) + 1.0 / q
    p = expected_eigs / expected_eigs.sum() + criteria.EPS
    assert criteria.lidar(z) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=0.03)


def test_lidar_is_invariant_to_invertible_linear_maps_and_counts_discriminable_dimensions():
    rng = np.random.default_rng(2)
    z = _lidar_sample(2000, 6, 12, np.full(3, 50.0), rng)
    a = rng.normal(size=(12, 12)) + 3 * np.eye(12)
    assert criteria.lidar(z @ a) == pytest.approx(criteria.lidar(z), rel=1e-3)
    assert criteria.rankme(z.reshape(-1, 12) @ a) != pytest.approx(criteria.rankme(z.reshape(-1, 12)), rel=0.05)
    assert criteria.lidar(z) == pytest.approx(3.0, rel=0.1)  # three directions separate the images


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_alpha_req_recovers_an_exact_power_law(alpha):
    rng = np.random.default_rng(3)
    n, k = 500, 40
    u = _orthonormal(n, k + 1, rng)
    u = u[:, 1:] - u[:, 1:].mean(0)  # zero-mean columns...
    u, _ = np.linalg.qr(u)  # ...orthonormal again (still zero-mean: spanned by zero-mean vectors)
    eigs = np.arange(1, k + 1, dtype=float) ** -alpha
    z = u * np.sqrt((n - 1) * eigs) @ _orthonormal(k, k, rng).T
    assert criteria.covariance_spectrum(z) == pytest.approx(eigs, rel=1e-8)
    assert criteria.alpha_req(z) == pytest.approx(alpha, abs=1e-6)
    assert criteria.alpha_req(z, fit_range=(5, 30)) == pytest.approx(alpha, abs=1e-6)


def test_alpha_req_on_a_gaussian_sample_and_its_score():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(30000, 32)) * np.arange(1, 33) ** -0.6  # variances i^-1.2
    assert criteria.alpha_req(z) == pytest.approx(1.2, abs=0.05)
    assert criteria.alpha_req_score(1.0) == 0.0
    assert criteria.alpha_req_score(1.3) == pytest.approx(-0.3) == criteria.alpha_req_score(0.7)
