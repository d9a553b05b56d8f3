"""Does a label-free score rank runs by downstream accuracy?

Scores are columns ``score.<key>`` of a sweep table (one row per run × epoch), all oriented so
that *higher predicts better accuracy*. The loss-based ones (docs/method.md §3):

- ``loss``          −L_e, the epoch's training loss;
- ``loss_lastk``    −mean(L_{e−k+1..e}), the mean over the last k epochs up to e;
- ``loss_lam``      −L_e / λ^α with the paper's fixed α = 0.4;
- ``loss_lam_fit``  −L_e / λ^α̂ with α̂ fitted *out of fold*: leave-one-architecture-out when the
  sweep has several architectures, k-fold over runs otherwise, so a run's α̂ never saw that run.

α̂ maximises pooled Spearman ρ(−L/λ^α, accuracy) on a grid over [0, 1]; ties take the middle of
the maximising set. C(α) is that ρ as a function of α (in-sample, descriptive).

A health-aware score (:mod:`analysis.health`) is −∞ for ruled-out runs: they count, tied
below every other run. Agreement is Spearman ρ and Kendall τ-b (``scipy.stats``) with percentile-bootstrap confidence
intervals over runs (pairs resampled together; α̂ held fixed inside the bootstrap).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.model_selection import KFold

from lejepa.record import SCORE_ALPHA, label_free_score

FIXED_ALPHA = SCORE_ALPHA
"""The paper's fixed α (:data:`lejepa.record.SCORE_ALPHA`, also a sweep's default ``score_alpha``)."""
ALPHA_GRID = np.round(np.linspace(0.0, 1.0, 101), 2)

LABELS = {
    "loss": "training loss",
    "loss_lastk": "loss, mean of last k epochs",
    "loss_lam": f"loss/λ^{FIXED_ALPHA}",
    "loss_lam_fit": "loss/λ^α̂ (out of fold)",
}


def score_column(key: str) -> str:
    return f"score.{key}"


# --------------------------------------------------------------------------- rank correlations
def rank_correlation(score, acc) -> tuple[float, float]:
    """(Spearman ρ, Kendall τ-b) of the pairs where both are finite; NaN below 3 pairs."""
    x, y = _finite_pairs(score, acc)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    return float(stats.spearmanr(x, y).statistic), float(stats.kendalltau(x, y).statistic)


def batched_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman ρ along the last axis of [..., n] arrays: Pearson r of average ranks."""
    return _pearson(stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1))


def batched_kendall(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall τ-b along the last axis: Σ sgn(Δx)sgn(Δy) / sqrt(Σ sgn(Δx)² · Σ sgn(Δy)²) over pairs."""
    sx = np.sign(x[..., :, None] - x[..., None, :])
    sy = np.sign(y[..., :, None] - y[..., None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sx * sy).sum((-2, -1)) / np.sqrt((sx * sx).sum((-2, -1)) * (sy * sy).sum((-2, -1)))


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def _finite_pairs(score, acc) -> tuple[np.ndarray, np.ndarray]:
    """The pairs with a known accuracy and score; a score of −∞ (a run a health-aware score rules
    out) is kept, tied below every finite score."""
    x = np.asarray(score, dtype=float)
    y = np.asarray(acc, dtype=float)
    keep = (np.isfinite(x) | (x == -np.inf)) & np.isfinite(y)
    x, y = x[keep], y[keep]
    finite = np.isfinite(x)
    if finite.any() and not finite.all():
        x = np.where(finite, x, x[finite].min() - 1.0)
    return x, y


@dataclass(frozen=True)
class Correlation:
    """Point estimates and (low, high) percentile-bootstrap intervals over ``n`` runs."""

    n: int
    rho: float
    tau: float
    rho_ci: tuple[float, float]
    tau_ci: tuple[float, float]


def correlate(score, acc, n_boot: int = 1000, level: float = 0.95, seed: int = 0, chunk: int = 100) -> Correlation:
    """ρ and τ of (score, accuracy) with bootstrap CIs from ``n_boot`` paired resamples of the runs.

    Resamples whose score or accuracy is constant have no rank correlation and are dropped.
    """
    x, y = _finite_pairs(score, acc)
    rho, tau = rank_correlation(x, y)
    nan_ci = (float("nan"), float("nan"))
    if not np.isfinite(rho) or n_boot <= 0:
        return Correlation(len(x), rho, tau, nan_ci, nan_ci)
    rng = np.random.default_rng(seed)
    rhos, taus = [], []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, len(x), size=(min(chunk, n_boot - start), len(x)))
        rhos.append(batched_spearman(x[idx], y[idx]))
        taus.append(batched_kendall(x[idx], y[idx]))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]

    def interval(values: list[np.ndarray]) -> tuple[float, float]:
        v = np.concatenate(values)
        v = v[np.isfinite(v)]
        if not len(v):
            return nan_ci
        lo, hi = np.percentile(v, q)
        return float(lo), float(hi)

    return Correlation(len(x), rho, tau, interval(rhos), interval(taus))


def correlation_table(
    runs: pd.DataFrame, scores: list[str], acc: str, by: str = "arch", n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """One row per (score, group): pooled over all runs (group ``"all"``) and per value of ``by``.

    ``runs`` holds one row per run; ``scores`` are score keys (columns ``score.<key>``).
    """
    rows = []
    groups = [("all", runs)] + [(str(g), part) for g, part in runs.groupby(by, sort=True)]
    for key in scores:
        for name, part in groups:
            c = correlate(part[score_column(key)], part[acc], n_boot=n_boot, seed=seed)
            rows.append(
                {
                    "score": key,
                    "group": name,
                    "n": c.n,
                    "rho": c.rho,
                    "rho_lo": c.rho_ci[0],
                    "rho_hi": c.rho_ci[1],
                    "tau": c.tau,
                    "tau_lo": c.tau_ci[0],
                    "tau_hi": c.tau_ci[1],
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- loss-based scores
def lambda_scaled(loss, lam, alpha: float | np.ndarray):
    """L / λ^α (:func:`lejepa.record.label_free_score`, element-wise); NaN where λ ≤ 0 (the scaling is
    undefined without SIGReg)."""
    lam = np.asarray(lam, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(lam > 0, label_free_score(np.asarray(loss, dtype=float), np.where(lam > 0, lam, 1.0), alpha), np.nan)


def add_loss_scores(epochs: pd.DataFrame, last_k: int = 3, alpha: float = FIXED_ALPHA) -> pd.DataFrame:
    """``epochs`` (columns run_id, epoch, loss, lam) with ``score.loss``, ``score.loss_lastk`` and
    ``score.loss_lam`` added (higher = predicted better)."""
    out = epochs.sort_values(["run_id", "epoch"]).copy()
    out[score_column("loss")] = -out["loss"]
    lastk = out.groupby("run_id", sort=False)["loss"].transform(lambda s: s.rolling(last_k, min_periods=1).mean())
    out[score_column("loss_lastk")] = -lastk
    out[score_column("loss_lam")] = -lambda_scaled(out["loss"], out["lam"], alpha)
    return out


def alpha_curve(loss, lam, acc, grid: np.ndarray = ALPHA_GRID) -> pd.DataFrame:
    """C(α): Spearman ρ and Kendall τ of −L/λ^α against accuracy for every α of ``grid``."""
    rows = [(a, *rank_correlation(-lambda_scaled(loss, lam, a), acc)) for a in grid]
    return pd.DataFrame(rows, columns=["alpha", "rho", "tau"])


def fit_alpha(loss, lam, acc, grid: np.ndarray = ALPHA_GRID) -> float:
    """The α of ``grid`` maximising ρ(−L/λ^α, accuracy); the middle of the maximising set on ties."""
    rho = alpha_curve(loss, lam, acc, grid)["rho"].to_numpy()
    if not np.isfinite(rho).any():
        return float("nan")
    best = np.flatnonzero(np.isclose(rho, np.nanmax(rho), rtol=0, atol=1e-12))
    return float(grid[best[len(best) // 2]])


def out_of_fold_alpha(
    runs: pd.DataFrame, acc: str, by: str = "arch", folds: int = 5, seed: int = 0, grid: np.ndarray = ALPHA_GRID
) -> tuple[pd.DataFrame, str]:
    """α̂ for each run fitted only on *other* runs, and the scheme used.

    With ≥ 2 values of ``by``: leave-one-``by``-out (each group's α̂ is fitted on the other
    groups). Otherwise ``folds``-fold cross-validation over runs. ``runs`` has one row per run
    with columns run_id, loss (final), lam, ``acc`` and ``by``; the result has run_id,
    ``fold`` (the held-out group or fold) and ``alpha``.
    """
    usable = runs[np.isfinite(runs[acc].astype(float)) & (runs["lam"] > 0)]
    if usable[by].nunique() >= 2:
        scheme = f"leave-one-{by}-out"
        held_out = [(str(g), usable[by] == g) for g in sorted(usable[by].unique())]
    else:
        k = min(folds, len(usable))
        if k < 2:
            return pd.DataFrame(columns=["run_id", "fold", "alpha"]), "not fitted (fewer than 2 labelled runs)"
        scheme = f"{k}-fold over runs"
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
        held_out = []
        for i, (_, test) in enumerate(splitter.split(usable)):
            mask = np.zeros(len(usable), dtype=bool)
            mask[test] = True
            held_out.append((f"fold {i + 1}", pd.Series(mask, index=usable.index)))
    rows = []
    for name, mask in held_out:
        train = usable[~mask]
        alpha = fit_alpha(train["loss"], train["lam"], train[acc], grid)
        rows += [{"run_id": r, "fold": name, "alpha": alpha} for r in usable.loc[mask, "run_id"]]
    return pd.DataFrame(rows), scheme


def add_fitted_alpha_score(epochs: pd.DataFrame, alphas: pd.DataFrame) -> pd.DataFrame:
    """``score.loss_lam_fit`` = −L/λ^α̂(run) on every row (NaN for runs without an α̂)."""
    out = epochs.drop(columns=["alpha_fit"], errors="ignore").merge(
        alphas[["run_id", "alpha"]].rename(columns={"alpha": "alpha_fit"}), on="run_id", how="left"
    )
    out[score_column("loss_lam_fit")] = -lambda_scaled(out["loss"], out["lam"], out["alpha_fit"].to_numpy())
    return out
