"""Objective terms against hand-computed values (explicit loops, no vectorised shortcuts)."""

import pytest
import torch
from torch import nn

from lejepa.model import LeJEPAModel, Projector
from lejepa.objective import invariance_loss, lejepa_loss


class ConstantReg(nn.Module):
    """A regulariser with a known value per view: the mean of the view's first column."""

    def forward(self, z):
        return z[..., 0].mean()


def hand_invariance(z, num_global):
    views, batch, dim = z.shape
    total = 0.0
    for n in range(batch):
        centre = [sum(float(z[v, n, d]) for v in range(num_global)) / num_global for d in range(dim)]
        for v in range(views):
            for d in range(dim):
                total += (centre[d] - float(z[v, n, d])) ** 2
    return total / (views * batch * dim)


@pytest.mark.parametrize("num_global", [1, 2, 3])
def test_invariance_matches_loops(num_global):
    z = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(num_global))
    assert float(invariance_loss(z, num_global)) == pytest.approx(hand_invariance(z, num_global), rel=1e-6)


def test_identical_views_have_zero_invariance():
    z = torch.randn(1, 6, 8).expand(4, 6, 8)
    assert float(invariance_loss(z, 2)) == pytest.approx(0.0, abs=1e-12)


def test_total_is_convex_combination():
    z = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0))
    lam = 0.3
    terms = lejepa_loss(z, 2, ConstantReg(), lam)
    expected_reg = float(z[..., 0].mean())
    assert float(terms.sigreg) == pytest.approx(expected_reg, rel=1e-6)
    assert float(terms.invariance) == pytest.approx(hand_invariance(z, 2), rel=1e-6)
    assert float(terms.loss) == pytest.approx((1 - lam) * hand_invariance(z, 2) + lam * expected_reg, rel=1e-6)


def test_gradient_flows_through_centre():
    z = torch.randn(3, 2, 2, requires_grad=True)
    invariance_loss(z, 2).backward()
    # the global views move towards each other *and* the centre moves: no stop-gradient
    assert z.grad[:2].abs().sum() > 0 and z.grad[2].abs().sum() > 0


def test_bad_num_global():
    with pytest.raises(ValueError):
        lejepa_loss(torch.zeros(2, 3, 4), 3, ConstantReg(), 0.1)


def test_projector_depth_and_model_groups_views_by_size():
    proj = Projector(16, 32, 8, layers=3)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in proj) == 2
    assert sum(isinstance(m, nn.Linear) for m in proj) == 3

    calls = []

    class Backbone(nn.Module):
        embed_dim = 3

        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

    model = LeJEPAModel(Backbone(), proj_hidden=8, proj_dim=4)
    views = [torch.rand(5, 3, 8, 8), torch.rand(5, 3, 8, 8), torch.rand(5, 3, 4, 4)]
    feats, out = model(views)
    assert calls == [(10, 3, 8, 8), (5, 3, 4, 4)]
    assert feats.shape == (3, 5, 3) and out.shape == (3, 5, 4)
    for v in range(3):
        assert torch.allclose(feats[v], views[v].mean(dim=(2, 3)))
