"""The report's figures (matplotlib, Agg backend; each function writes one PNG and returns its path).

- :func:`loss_vs_accuracy`: final training loss against probe accuracy, one point per run,
  coloured by λ (log scale), one marker per architecture; ρ and τ in the title.
- :func:`alpha_curve_plot`: C(α), Spearman ρ of −loss/λ^α against accuracy over α ∈ [0, 1],
  with the fixed α = 0.4 and the fitted α̂ marked.
- :func:`arch_correlation_bars`: Spearman ρ per architecture (and pooled) for each score, with
  bootstrap intervals as error bars.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.ticker import FuncFormatter

MARKERS = "osD^vP*Xh<>"
LOG_125 = FuncFormatter(lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** np.floor(np.log10(v))) in (1, 2, 5) else "")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_vs_accuracy(
    runs: pd.DataFrame, acc: str, rho: float, tau: float, path: Path, loss: str = "loss", acc_label: str = "probe accuracy"
) -> Path:
    """Scatter of ``runs[loss]`` (x, log) against ``runs[acc]`` (y, %) coloured by λ."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    lam = runs["lam"].astype(float)
    positive = lam[lam > 0]
    norm = LogNorm(positive.min(), max(positive.max(), positive.min() * 1.0001)) if len(positive) else None
    scatter = None
    for i, (arch, part) in enumerate(runs.groupby("arch", sort=True)):
        scatter = ax.scatter(
            part[loss],
            100 * part[acc].astype(float),
            c=part["lam"].clip(lower=1e-12),
            cmap="viridis",
            norm=norm,
            marker=MARKERS[i % len(MARKERS)],
            s=46,
            edgecolors="black",
            linewidths=0.5,
            label=str(arch),
        )
    if scatter is not None and norm is not None:
        bar = fig.colorbar(scatter, ax=ax, label="λ")
        bar.ax.yaxis.set_major_formatter(LOG_125)
        bar.ax.yaxis.set_minor_formatter(LOG_125)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(LOG_125)
    ax.xaxis.set_minor_formatter(LOG_125)
    ax.set_xlabel("final training loss")
    ax.set_ylabel(f"{acc_label} (%)")
    ax.set_title(f"loss vs accuracy: Spearman ρ = {rho:.3f}, Kendall τ = {tau:.3f} (n = {len(runs)})")
    ax.legend(title="architecture", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def alpha_curve_plot(curve: pd.DataFrame, path: Path, fixed_alpha: float = 0.4, fitted_alpha: float | None = None) -> Path:
    """C(α): ρ and τ against α, the paper's fixed α and the fitted α̂ as vertical lines."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.plot(curve["alpha"], curve["rho"], label="Spearman ρ")
    ax.plot(curve["alpha"], curve["tau"], label="Kendall τ", linestyle="--")
    ax.axvline(fixed_alpha, color="grey", linestyle=":", label=f"α = {fixed_alpha}")
    if fitted_alpha is not None and np.isfinite(fitted_alpha):
        ax.axvline(fitted_alpha, color="red", linestyle=":", label=f"α̂ = {fitted_alpha:.2f} (all runs)")
    ax.set_xlabel("α")
    ax.set_ylabel("correlation of −loss/λ^α with accuracy")
    ax.set_title("C(α)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def arch_correlation_bars(table: pd.DataFrame, path: Path, labels: dict[str, str] | None = None) -> Path:
    """Grouped bars of ρ per score (colour) and group (pooled first, then each architecture)."""
    table = table[np.isfinite(table["rho"].astype(float))]
    groups = ["all"] + sorted(g for g in table["group"].unique() if g != "all")
    scores = list(dict.fromkeys(table["score"]))
    width = 0.8 / max(1, len(scores))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) + 2), 4.2))
    x = np.arange(len(groups))
    for i, key in enumerate(scores):
        part = table[table["score"] == key].set_index("group").reindex(groups)
        rho = part["rho"].to_numpy(dtype=float)
        err = np.abs(np.vstack([rho - part["rho_lo"].to_numpy(dtype=float), part["rho_hi"].to_numpy(dtype=float) - rho]))
        ax.bar(
            x + (i - (len(scores) - 1) / 2) * width,
            rho,
            width,
            yerr=np.nan_to_num(err),
            capsize=2,
            label=(labels or {}).get(key, key),
        )
    ax.set_xticks(x, groups)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("Spearman ρ with accuracy")
    ax.set_title("correlation per architecture (bars: 95% bootstrap interval)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
