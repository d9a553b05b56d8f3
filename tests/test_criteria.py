"""RankMe, LiDAR and α-ReQ on constructed features with known answers; their per-checkpoint
cache on real checkpoints of a tiny run."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from analysis import criteria
from lejepa import record


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


# --------------------------------------------------------------------------- the per-checkpoint cache
SMALL = {"sample_size": 64, "lidar_images": 8, "lidar_views": 2}
"""Criteria settings that take a second or two per tiny checkpoint."""


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """Three real checkpoints of one tiny run (3 epochs), and their criteria computed with a cache:
    (checkpoints, cache, frame, log lines). One intra-op thread for the module."""
    import torch

    from lejepa.checkpoint import list_checkpoints
    from lejepa.config import load_config
    from lejepa.trainer import Trainer

    from helpers import TINY

    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("criteria_cache")
    quick = ["data.test_fraction=0.8", "train.health=false", "train.online_eval_images=64", "train.eval_probe_epochs=1"]
    cfg = load_config(None, [*TINY, *quick, f"train.out_dir={root}", "train.epochs=3", "train.keep_checkpoints=3"])
    Trainer(cfg, run_dir=root / "run").fit()
    paths = [str(p) for p in list_checkpoints(root / "run" / "checkpoints")]
    assert len(paths) == 3
    lines: list[str] = []
    cache = root / "cache" / record.CRITERIA_CACHE
    frame = criteria.evaluate_checkpoints(paths, **SMALL, cache=cache, log=lines.append)
    yield SimpleNamespace(paths=paths, cache=cache, frame=frame, lines=lines)
    torch.set_num_threads(threads)


def _copy_cache(computed, tmp_path: Path) -> Path:
    cache = tmp_path / record.CRITERIA_CACHE
    shutil.copyfile(computed.cache, cache)
    return cache


def _progress(lines: list[str]) -> list[str]:
    """What each per-checkpoint line says after the name: 'cached', or the seconds it took."""
    return [line.split(": ", 1)[1].split(" s ")[0] for line in lines if line.startswith("criteria [")]


def _deterministic(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in frame if c.startswith("time.")])


def test_criteria_cache_holds_every_computed_row_and_the_progress_counts_down(computed):
    assert computed.lines[0] == f"criteria: 3 checkpoints, 0 cached in {computed.cache}, 3 to compute"
    assert [line.split(" ", 2)[1] for line in computed.lines[1:]] == ["[1/3]", "[2/3]", "[3/3]"]
    assert computed.lines[1].startswith("criteria [1/3] run/epoch_0001: ") and "left" in computed.lines[1]
    assert "left" in computed.lines[2] and "left" not in computed.lines[3]  # the ETA: none after the last
    assert all(float(s) > 0 for s in _progress(computed.lines))
    cached = pd.read_csv(computed.cache)
    assert cached["checkpoint"].tolist() == computed.paths and list(cached) == list(criteria.CACHE_COLUMNS)
    score = [f"score.{k}" for k in criteria.LABELS]
    assert list(computed.frame) == ["checkpoint", *criteria.VALUES, *criteria.PROBE_VALUES, *score]
    assert not list(computed.cache.parent.glob(".*tmp*"))


def test_a_second_call_reuses_every_cached_row_and_returns_the_same_frame(computed, tmp_path):
    cache = _copy_cache(computed, tmp_path)
    lines: list[str] = []
    again = criteria.evaluate_checkpoints(computed.paths, **SMALL, cache=cache, log=lines.append)
    assert lines[0] == f"criteria: 3 checkpoints, 3 cached in {cache}, 0 to compute"
    assert _progress(lines) == ["cached"] * 3
    pd.testing.assert_frame_equal(again, computed.frame, check_exact=True)
    assert cache.read_bytes() == computed.cache.read_bytes()


def test_an_interrupted_call_keeps_the_computed_rows_and_the_rerun_computes_only_the_rest(computed, tmp_path):
    cache = tmp_path / "report" / record.CRITERIA_CACHE

    def stop_after_the_first(line: str) -> None:
        if line.startswith("criteria [1/3]"):
            raise KeyboardInterrupt  # Ctrl-C once the first checkpoint is done

    with pytest.raises(criteria.CriteriaInterrupted) as stop:
        criteria.evaluate_checkpoints(computed.paths, **SMALL, cache=cache, log=stop_after_the_first)
    assert (stop.value.kept, stop.value.total, stop.value.cache) == (1, 3, cache)
    assert pd.read_csv(cache)["checkpoint"].tolist() == computed.paths[:1]
    lines: list[str] = []
    resumed = criteria.evaluate_checkpoints(computed.paths, **SMALL, cache=cache, log=lines.append)
    assert lines[0].endswith("1 cached in " + str(cache) + ", 2 to compute")
    progress = _progress(lines)
    assert progress[0] == "cached" and all(float(s) > 0 for s in progress[1:])
    assert pd.read_csv(cache)["checkpoint"].tolist() == computed.paths
    pd.testing.assert_frame_equal(_deterministic(resumed), _deterministic(computed.frame), check_exact=True)


def test_changed_settings_invalidate_the_cached_rows(computed, tmp_path):
    cache = _copy_cache(computed, tmp_path)
    lines: list[str] = []
    first = computed.paths[:1]
    other = criteria.evaluate_checkpoints(first, **{**SMALL, "sample_size": 32}, cache=cache, log=lines.append)
    assert lines[0].endswith("0 cached in " + str(cache) + ", 1 to compute") and _progress(lines) != ["cached"]
    assert other["rankme"].iloc[0] != computed.frame["rankme"].iloc[0]
    rows = pd.read_csv(cache)
    assert rows["checkpoint"].tolist() == first and rows["key.sample_size"].tolist() == [32]


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"\x00\xff\xfe garbage \x80", "codec can't decode"),
        (b"checkpoint,rankme\n/x,1.0\n", "its columns are not this version's"),
        (None, "fields, not"),  # the right header, a truncated row
    ],
)
def test_an_unreadable_or_foreign_cache_is_one_warning_and_computed_again(computed, tmp_path, content, reason):
    cache = tmp_path / record.CRITERIA_CACHE
    if content is None:
        head, row = computed.cache.read_bytes().splitlines(keepends=True)[:2]
        content = head + row[: len(row) // 2]
    cache.write_bytes(content)
    lines: list[str] = []
    frame = criteria.evaluate_checkpoints(computed.paths[:1], **SMALL, cache=cache, log=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and reason in warnings[0] and str(cache) in warnings[0], lines
    assert _progress(lines) != ["cached"]
    pd.testing.assert_frame_equal(_deterministic(frame), _deterministic(computed.frame.iloc[:1]), check_exact=True)
    assert pd.read_csv(cache)["checkpoint"].tolist() == computed.paths[:1]
