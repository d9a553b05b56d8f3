"""Encoder = backbone + projector.

The backbone gives the features that probes and label-free criteria use; the projector is an
MLP with BatchNorm whose outputs carry the LeJEPA objective (invariance and SIGReg).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Projector(nn.Sequential):
    """``layers``-deep MLP: (Linear → BatchNorm1d → ReLU) × (layers − 1), then Linear to ``out_dim``."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 3) -> None:
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            width = hidden
        blocks.append(nn.Linear(width, out_dim))
        super().__init__(*blocks)


class LeJEPAModel(nn.Module):
    """Backbone and projector applied to a list of views.

    ``forward(views)`` takes V tensors [B, 3, s_v, s_v] (sizes may differ between views) and
    returns the projections [V, B, D]; views of equal size are batched through the backbone
    together. ``features`` are the backbone outputs of every view, [V, B, E], kept for the
    online probe.
    """

    def __init__(self, backbone: nn.Module, proj_hidden: int = 512, proj_dim: int = 64, proj_layers: int = 3) -> None:
        super().__init__()
        self.backbone = backbone
        self.embed_dim = int(backbone.embed_dim)  # type: ignore[arg-type]  # the backbone's int attribute
        self.projector = Projector(self.embed_dim, proj_hidden, proj_dim, proj_layers)

    def encode(self, views: list[Tensor]) -> Tensor:
        """Backbone features of every view, [V, B, E], one backbone call per distinct view size."""
        batch = views[0].shape[0]
        feats: list[Tensor | None] = [None] * len(views)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, v in enumerate(views):
            by_size.setdefault(tuple(v.shape[1:]), []).append(i)
        for idx in by_size.values():
            out = self.backbone(torch.cat([views[i] for i in idx]))
            for j, i in enumerate(idx):
                feats[i] = out[j * batch : (j + 1) * batch]
        return torch.stack(feats)  # type: ignore[arg-type]

    def forward(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(features [V, B, E], projections [V, B, D]) for a list of V view batches."""
        feats = self.encode(views)
        v, b, e = feats.shape
        proj = self.projector(feats.reshape(v * b, e)).reshape(v, b, -1)
        return feats, proj
