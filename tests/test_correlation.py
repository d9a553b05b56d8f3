"""Rank correlations, bootstrap intervals, loss scores and the out-of-fold α fit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import correlation as corr


def test_rank_correlation_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 40).astype(float)
    y = x + rng.integers(0, 4, 40)
    rho, tau = corr.rank_correlation(x, y)
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert tau == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


def test_hand_computed_small_case():
    # ranks differ by d = (0, 1, 1, 0): ρ = 1 − 6·Σd²/(n(n²−1)) = 1 − 12/60; 5 concordant, 1 discordant pair
    rho, tau = corr.rank_correlation([1, 2, 3, 4], [1, 3, 2, 4])
    assert rho == pytest.approx(0.8)
    assert tau == pytest.approx(4 / 6)
    assert corr.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx((-1.0, -1.0))


def test_non_finite_pairs_are_dropped_and_too_few_give_nan():
    rho, _ = corr.rank_correlation([1, 2, np.nan, 3, 4], [1, 3, 0.5, 2, 4])
    assert rho == pytest.approx(0.8)
    assert np.isnan(corr.rank_correlation([1, 2], [1, 2])[0])
    assert np.isnan(corr.rank_correlation([1, 1, 1], [1, 2, 3])[0])


def test_batched_statistics_equal_scipy_row_by_row():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, (12, 17)).astype(float)
    y = rng.normal(size=(12, 17)).round(1)
    for i in range(12):
        assert corr.batched_spearman(x, y)[i] == pytest.approx(stats.spearmanr(x[i], y[i]).statistic, abs=1e-12)
        assert corr.batched_kendall(x, y)[i] == pytest.approx(stats.kendalltau(x[i], y[i]).statistic, abs=1e-12)


def test_bootstrap_intervals():
    perfect = corr.correlate(np.arange(10), np.arange(10) ** 2, n_boot=300)
    assert perfect.rho == pytest.approx(1.0) and perfect.rho_ci == (1.0, 1.0) and perfect.tau_ci == (1.0, 1.0)

    rng = np.random.default_rng(2)
    x = rng.normal(size=80)
    noisy = corr.correlate(x, x + rng.normal(size=80), n_boot=500, seed=3)
    assert noisy.rho_ci[0] < noisy.rho < noisy.rho_ci[1] and noisy.tau_ci[0] < noisy.tau < noisy.tau_ci[1]
    assert 0.4 < noisy.rho < 0.9 and noisy.rho_ci[1] - noisy.rho_ci[0] < 0.5
    assert corr.correlate(x, x + rng.normal(size=80), n_boot=500, seed=3) != noisy  # other data, other answer
    independent = corr.correlate(x, rng.normal(size=80), n_boot=500)
    assert independent.rho_ci[0] < 0 < independent.rho_ci[1]
    wide = corr.correlate(x[:12], (x + rng.normal(size=80))[:12], n_boot=500)
    assert wide.rho_ci[1] - wide.rho_ci[0] > noisy.rho_ci[1] - noisy.rho_ci[0]


def _epochs(losses: list[float], lam: float, run: str = "r") -> pd.DataFrame:
    return pd.DataFrame({"run_id": run, "epoch": range(1, len(losses) + 1), "loss": losses, "lam": lam})


def test_loss_scores_by_hand():
    table = pd.concat([_epochs([4.0, 3.0, 2.0, 1.0], 0.25), _epochs([1.0, 1.0], 0.0, "zero")])
    out = corr.add_loss_scores(table, last_k=3, alpha=0.5).set_index(["run_id", "epoch"])
    assert out.loc[("r", 4), "score.loss"] == -1.0
    assert out.loc[("r", 4), "score.loss_lastk"] == pytest.approx(-2.0)  # mean(3, 2, 1)
    assert out.loc[("r", 1), "score.loss_lastk"] == pytest.approx(-4.0)
    assert out.loc[("r", 2), "score.loss_lastk"] == pytest.approx(-3.5)
    assert out.loc[("r", 4), "score.loss_lam"] == pytest.approx(-2.0)  # 1 / 0.25 ** 0.5
    assert np.isnan(out.loc[("zero", 2), "score.loss_lam"])


def _synthetic_runs(n: int, alpha: float, seed: int, arch: str = "a") -> pd.DataFrame:
    """loss = g(acc) · λ^α with g decreasing: −loss/λ^α ranks runs exactly by accuracy."""
    rng = np.random.default_rng(seed)
    acc = rng.uniform(0.5, 0.95, n)
    lam = np.exp(rng.uniform(np.log(1e-3), np.log(0.5), n))
    return pd.DataFrame(
        {"run_id": [f"{arch}{i}" for i in range(n)], "arch": arch, "acc": acc, "lam": lam, "loss": (2.0 - acc) * lam**alpha}
    )


@pytest.mark.parametrize("alpha_true", [0.25, 0.6])
def test_fit_alpha_recovers_the_known_exponent(alpha_true):
    runs = _synthetic_runs(300, alpha_true, seed=4)
    assert corr.fit_alpha(runs["loss"], runs["lam"], runs["acc"]) == pytest.approx(alpha_true, abs=0.015)
    curve = corr.alpha_curve(runs["loss"], runs["lam"], runs["acc"]).set_index("alpha")
    assert curve.loc[alpha_true, "rho"] == pytest.approx(1.0) and curve.loc[alpha_true, "tau"] == pytest.approx(1.0)
    assert curve.loc[0.0, "rho"] < 0.9 and curve["rho"].idxmax() == pytest.approx(alpha_true, abs=0.015)


def test_leave_one_architecture_out_never_fits_on_the_scored_group():
    runs = pd.concat(
        [_synthetic_runs(120, 0.2, 5, "a"), _synthetic_runs(120, 0.2, 6, "b"), _synthetic_runs(120, 0.8, 7, "c")],
        ignore_index=True,
    )
    alphas, scheme = corr.out_of_fold_alpha(runs, "acc")
    assert scheme == "leave-one-arch-out"
    by_run = alphas.set_index("run_id")
    c = runs[runs["arch"] == "c"]
    assert corr.fit_alpha(c["loss"], c["lam"], c["acc"]) == pytest.approx(0.8, abs=0.03)  # in-sample answer
    assert by_run.loc[c["run_id"], "alpha"].unique() == pytest.approx([0.2], abs=0.03)  # what c is scored with
    assert set(by_run.loc[c["run_id"], "fold"]) == {"c"} and len(alphas) == len(runs)

    scored = corr.add_fitted_alpha_score(runs, alphas).set_index("run_id")
    alpha_c = by_run.loc["c0", "alpha"]
    assert scored.loc["c0", "score.loss_lam_fit"] == pytest.approx(-runs.loss[240] / runs.lam[240] ** alpha_c)


def test_single_architecture_uses_k_fold():
    runs = _synthetic_runs(40, 0.5, 8)
    alphas, scheme = corr.out_of_fold_alpha(runs, "acc", folds=4, seed=1)
    assert scheme == "4-fold over runs" and len(alphas) == 40 and alphas["fold"].nunique() == 4
    fold = alphas[alphas["fold"] == "fold 2"]
    rest = runs[~runs["run_id"].isin(fold["run_id"])]
    assert fold["alpha"].iloc[0] == corr.fit_alpha(rest["loss"], rest["lam"], rest["acc"])
    assert alphas["alpha"].to_numpy() == pytest.approx(0.5, abs=0.05)


def test_correlation_table_pooled_and_per_architecture():
    runs = pd.concat([_synthetic_runs(20, 0.4, 9, "a"), _synthetic_runs(15, 0.4, 10, "b")], ignore_index=True)
    runs["score.loss_lam"] = -corr.lambda_scaled(runs["loss"], runs["lam"], 0.4)
    table = corr.correlation_table(runs, ["loss_lam"], "acc", n_boot=50).set_index("group")
    assert list(table.index) == ["all", "a", "b"] and list(table["n"]) == [35, 20, 15]
    assert table["rho"].to_numpy() == pytest.approx(1.0)
