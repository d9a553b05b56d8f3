"""Health measures against direct formulas (the collapse ratio of constant and Gaussian columns,
the effective rank of constructed rank-r data, the per-dimension spread), the verdicts, and real
tiny trainings: λ = 0 is flagged collapsed (and stopped by ``train.collapse_patience``), a
healthy setting is not."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow import MlflowClient

from lejepa import record
from lejepa.callbacks import Callback
from lejepa.config import load_config
from lejepa.health import (
    COLLAPSED,
    COLLAPSED_RATIO,
    DIMENSIONAL,
    DIMENSIONAL_RANK,
    DIVERGED,
    HEALTHY,
    VERDICTS,
    batch_health,
    collapse_ratio,
    collapse_risk,
    collapsed_ep,
    effective_rank,
    std_spread,
    verdict,
)
from lejepa.sigreg import SIGReg
from lejepa.tracking import MLflowCallback
from lejepa.trainer import Trainer, TrainingCollapsed

from helpers import TINY


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
        total += w * phi * ((c - phi) ** 2 + s**2)
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


def test_batch_health_matches_the_float_measures_and_survives_nan():
    torch.manual_seed(0)
    proj, feats = torch.randn(128, 16) * torch.linspace(0.5, 2, 16), torch.randn(128, 300)
    rank, spread, feat_rank = batch_health(proj, feats).tolist()
    assert rank == pytest.approx(effective_rank(proj) / 16, rel=1e-9)
    assert spread == pytest.approx(std_spread(proj), rel=1e-9)
    assert feat_rank == pytest.approx(effective_rank(feats) / 128, rel=1e-9)  # min(N, E) = 128
    proj[3, 2] = float("nan")
    assert math.isnan(batch_health(proj, feats)[0])  # no LinAlgError from a diverging step


def test_verdict_thresholds():
    assert verdict(0.1, 0.6) == HEALTHY
    assert verdict(COLLAPSED_RATIO, 0.6) == verdict(1.0, 0.01) == COLLAPSED  # collapse outranks rank
    assert verdict(0.1, DIMENSIONAL_RANK - 0.01) == DIMENSIONAL
    assert verdict(0.1, float("nan")) == HEALTHY  # rank unknown: the ratio alone decides
    assert verdict(float("nan"), 0.6) == verdict(0.1, 0.6, loss=float("inf")) == DIVERGED


class Verdicts(Callback):
    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, epoch, step, metrics):
        self.epochs.append((VERDICTS[int(metrics[record.VERDICT])], metrics[record.COLLAPSE_RATIO]))


def _train(tmp_path, name, *overrides, uri=None):
    cfg = load_config(None, [*TINY, f"train.out_dir={tmp_path}", "train.epochs=3", "train.eval_probe_epochs=1", *overrides])
    seen = Verdicts()
    callbacks = [seen] + ([MLflowCallback(uri, "health", run_name=name)] if uri else [])
    return Trainer(cfg, callbacks, run_dir=tmp_path / name), seen


def test_tiny_training_at_lambda_zero_is_collapsed_a_healthy_one_is_not(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trainer, collapsed = _train(tmp_path, "zero", "loss.lam=0.0", uri=uri)
    trainer.fit()
    trainer, healthy = _train(tmp_path, "half", "loss.lam=0.5", uri=uri)
    trainer.fit()
    assert collapsed.epochs[-1][0] == COLLAPSED and collapsed.epochs[-1][1] > 0.9
    assert healthy.epochs[-1][0] == HEALTHY and healthy.epochs[-1][1] < 0.3
    client = MlflowClient(uri)
    tags = {
        r.info.run_name: r.data.tags[record.HEALTH_TAG]
        for r in client.search_runs([client.get_experiment_by_name("health").experiment_id])
    }
    assert tags == {"zero": COLLAPSED, "half": HEALTHY}


def test_collapse_patience_stops_a_collapsed_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trainer, seen = _train(tmp_path, "zero", "loss.lam=0.0", "train.epochs=5", "train.collapse_patience=2", uri=uri)
    with pytest.raises(TrainingCollapsed, match="collapsed for 2 epoch"):
        trainer.fit()
    assert trainer.epoch == 2 and [v for v, _ in seen.epochs] == [COLLAPSED, COLLAPSED]
    run = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("health").experiment_id])[0]
    assert run.info.status == record.FINISHED  # label-free pruning is an outcome, not an error
    assert run.data.tags[record.STATUS_TAG] == record.STATUS_COLLAPSED and run.data.tags[record.HEALTH_TAG] == COLLAPSED


def test_collapse_risk_boundary():
    assert collapse_risk(0.01, 64) is not None and "raise loss.lam to ≥ 0.016" in collapse_risk(0.01, 64)
    assert collapse_risk(0.01, 128) is None and collapse_risk(0.05, 32) is None
    assert "without SIGReg" in collapse_risk(0.0, 512)
