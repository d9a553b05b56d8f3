"""The supervised read-outs (evaluation only) against independent references: scikit-learn's
logistic regression and a direct standardisation formula."""

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from lejepa.probes import OnlineProbe, linear_probe, standardise


def offset_features(
    n: int, dim: int = 64, classes: int = 10, offset: float = 50.0, signal: float = 0.02, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features like those of a barely trained CNN: a large shared offset per feature plus a small
    class-dependent part and noise, so a probe must rescale to see the classes."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    scale = torch.rand(dim, generator=gen) * 4 + 0.1
    x = offset * scale + signal * scale * (means[y] + 0.7 * torch.randn(n, dim, generator=gen))
    return x, y


def test_standardise_is_the_z_score_of_the_train_split():
    x = torch.randn(200, 5, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 4, 5]) + 7
    other = torch.randn(30, 5, dtype=torch.float64)
    zx, zo = standardise(x, other, eps=0.0)
    a = x.numpy()
    mean, std = a.mean(0), a.std(0, ddof=1)
    np.testing.assert_allclose(zx.numpy(), (a - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(zo.numpy(), (other.numpy() - mean) / std, rtol=1e-5, atol=1e-5)


def test_linear_probe_matches_logistic_regression_on_offset_dominated_features():
    x, y = offset_features(3000)
    train_x, train_y, test_x, test_y = x[:2000], y[:2000], x[2000:], y[2000:]
    reference = LogisticRegression(max_iter=2000).fit(*(a.numpy() for a in standardise(train_x)), train_y.numpy())
    ref_acc = reference.score(standardise(train_x, test_x)[1].numpy(), test_y.numpy())
    assert ref_acc > 0.6, "the constructed problem must be learnable"
    acc = linear_probe(train_x, train_y, test_x, test_y, 10, epochs=50)
    assert acc >= ref_acc - 0.03, (acc, ref_acc)


def test_linear_probe_is_at_chance_on_label_noise():
    x, _ = offset_features(2000)
    y = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(5))
    assert linear_probe(x[:1500], y[:1500], x[1500:], y[1500:], 10, epochs=20) < 0.2


def test_online_probe_learns_offset_dominated_features():
    x, y = offset_features(3000)
    probe = OnlineProbe(x.shape[1], 10)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(5):
        for i in range(0, 2000, 128):
            loss = torch.nn.functional.cross_entropy(probe(x[i : i + 128]), y[i : i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
    probe.eval()
    with torch.no_grad():
        acc = float((probe(x[2000:]).argmax(1) == y[2000:]).float().mean())
    assert acc > 0.6, acc
