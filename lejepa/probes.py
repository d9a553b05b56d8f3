"""Supervised read-outs of frozen backbone features (evaluation only; training never sees labels).

- :class:`OnlineProbe`: BatchNorm1d without affine (each feature standardised) + Linear, trained
  on detached features during pretraining (MAE's linear-probe head).
- :func:`linear_probe`: the frozen-backbone linear probe: features standardised with the train
  split's per-feature mean and standard deviation, then softmax regression (Linear, AdamW,
  cosine schedule, mini-batch epochs over pre-extracted features); top-1 on the test features.
  Standardising matters: raw backbone features are often a large common offset plus small
  class-carrying variations, which a short gradient-descent fit does not reach.
- :func:`knn_accuracy`: k-nearest-neighbour (cosine distance, distance-weighted vote) top-1,
  through scikit-learn.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier
from torch import Tensor, nn


class OnlineProbe(nn.Module):
    """BatchNorm1d (affine=False) then Linear: features [B, E] → logits [B, C]."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))

    def forward(self, feats: Tensor) -> Tensor:
        return self.net(feats)


def standardise(train_x: Tensor, *others: Tensor, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """``(x - mean) / (std + eps)`` per feature, with mean and std of ``train_x``, for it and ``others``."""
    train_x = train_x.float()
    mean, std = train_x.mean(0), train_x.std(0) + eps
    return tuple((x.float() - mean) / std for x in (train_x, *others))


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Top-1 accuracy on ``test`` of softmax regression fitted on standardised ``train`` features."""
    train_x, test_x = standardise(train_x, test_x)
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    probe = nn.Linear(train_x.shape[1], num_classes)
    torch.random.set_rng_state(torch_state)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    n = train_x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        pred = probe(test_x).argmax(dim=1)
    return float((pred == test_y).float().mean())


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int = 20) -> float:
    """Top-1 of a k-NN classifier (cosine distance, votes weighted by 1/distance)."""
    k = min(k, train_x.shape[0])
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance", algorithm="brute")
    knn.fit(train_x.float().numpy(), train_y.numpy())
    pred = knn.predict(test_x.float().numpy())
    return float(np.mean(pred == test_y.numpy()))
