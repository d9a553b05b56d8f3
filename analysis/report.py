"""The selection analysis of one sweep, as a terminal table, a Markdown report with PNGs, and
MLflow artifacts on the sweep's parent run.

:func:`analyse` ties the pieces together: loss scores (:mod:`analysis.correlation`), optional
per-checkpoint criteria (:mod:`analysis.criteria`), correlations on the final epoch of every
run (the frozen linear probe as evidence), α̂ out of fold, the C(α) curve, and each score's
pick among all checkpoints (:mod:`analysis.selection`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from analysis import correlation as corr
from analysis import plots
from analysis.criteria import LABELS as CRITERIA_LABELS
from analysis.criteria import cost_table
from analysis.health import SAFE, add_health, add_safe_scores, exclusions, main_group
from analysis.html import markdown_to_html
from analysis.loader import Sweep
from analysis.selection import EVIDENCE, EVIDENCE_SHORT, evidence_column, random_regret, selection_table
from lejepa.record import (
    SELECTED_CHECKPOINT_TAG,
    SELECTED_EPOCH_TAG,
    SELECTED_RUN_ID_TAG,
    SELECTED_SCORE_TAG,
    SELECTION_ARTIFACT,
)

LABELS = {**corr.LABELS, **CRITERIA_LABELS}
NO_LABELS = (
    "no probe accuracy is logged for these runs: the picks are label-free and valid, "
    "but the evidence (correlation with accuracy, regret) needs labels"
)
REPORT = "report.md"
REPORT_HTML = "report.html"
"""The same report as one self-contained page (figures embedded), which MLflow's artifact viewer renders."""
ARTIFACT_DIR = SELECTION_ARTIFACT


@dataclass
class Analysis:
    """Everything the report shows; tables are pandas DataFrames."""

    sweep: Sweep
    epochs: pd.DataFrame  # every run × epoch, with score.* columns
    runs: pd.DataFrame  # final epoch of each run
    candidates: pd.DataFrame  # rows with a checkpoint
    scores: list[str]
    run_acc: str | None  # evidence for the correlations (final epochs)
    pick_acc: str | None  # evidence for the selection (all candidates)
    correlations: pd.DataFrame | None
    curve: pd.DataFrame | None
    alpha_in_sample: float
    alphas: pd.DataFrame
    alpha_scheme: str
    selection: pd.DataFrame
    criteria: pd.DataFrame | None
    last_k: int
    group: str | None  # the scale group whose losses are compared
    excluded: pd.DataFrame  # runs the health-aware scores rank last, with reasons
    notes: list[str] = field(default_factory=list)
    pick_score: str | None = None  # the score that makes the pick (``lejepa select --score``), marked in the tables

    def label(self, key: str) -> str:
        return label(key).replace("last k", f"last {self.last_k}")


def label(key: str) -> str:
    """A score's name; health-aware twins read ``<name>, healthy only``."""
    return f"{LABELS[key.removeprefix(SAFE)]}, healthy only" if key.startswith(SAFE) else LABELS[key]


def analyse(sweep: Sweep, criteria: pd.DataFrame | None = None, last_k: int = 3, n_boot: int = 1000, seed: int = 0) -> Analysis:
    """Scores, correlations (pooled and per architecture), α̂, C(α) and every score's pick."""
    notes = list(sweep.notes)
    epochs = corr.add_loss_scores(sweep.epochs, last_k, corr.FIXED_ALPHA)
    if criteria is not None and len(criteria):
        epochs = epochs.merge(criteria, on="checkpoint", how="left")
        if "probe_acc" in epochs:
            epochs["linear_probe_acc"] = epochs["linear_probe_acc"].fillna(epochs["probe_acc"])
    runs = epochs[epochs["is_final"]]
    run_acc = next((c for c in EVIDENCE if runs[c].notna().sum() >= 3), None)
    if run_acc is not None and runs[run_acc].isna().any():
        notes.append(
            f"{runs[run_acc].isna().sum()} runs have no {EVIDENCE[run_acc]} accuracy and are left out of the correlations"
        )
    curve, alpha_in_sample = None, float("nan")
    alphas, scheme = pd.DataFrame(columns=["run_id", "fold", "alpha"]), "not fitted (no labels)"
    scores = ["loss", "loss_lastk", "loss_lam"]
    if run_acc is not None:
        alphas, scheme = corr.out_of_fold_alpha(runs, run_acc, seed=seed)
        if alphas["alpha"].notna().any():
            epochs = corr.add_fitted_alpha_score(epochs, alphas)
            scores.append("loss_lam_fit")
        else:
            notes.append(f"α̂ not fitted ({scheme}): every training fold needs at least 3 labelled runs")
        curve = corr.alpha_curve(runs["loss"], runs["lam"], runs[run_acc])
        alpha_in_sample = corr.fit_alpha(runs["loss"], runs["lam"], runs[run_acc])
    scores += [k for k in CRITERIA_LABELS if f"score.{k}" in epochs]
    epochs = add_health(epochs)
    has_checkpoint = epochs["checkpoint"].notna() | epochs["checkpoint_uri"].notna()
    group = main_group(epochs[has_checkpoint])
    epochs = add_safe_scores(epochs, scores, group)
    scores = [k for base in scores for k in (base, SAFE + base)]
    groups = sorted(epochs["scale_group"].unique())
    if len(groups) > 1:
        notes.append(
            f"the runs' losses are on {len(groups)} scales ({'; '.join(groups)}): the loss-based "
            f"healthy-only scores compare runs of `{group}` only (the group with the most healthy "
            f"checkpoints); RankMe, LiDAR and α-ReQ are scale-free and compare all healthy runs"
        )
    if group is None:
        notes.append("no checkpoint is healthy: the healthy-only scores pick nothing")
    runs = epochs[epochs["is_final"]].reset_index(drop=True)
    correlations = corr.correlation_table(runs, scores, run_acc, n_boot=n_boot, seed=seed) if run_acc else None
    candidates = epochs[epochs["checkpoint"].notna() | epochs["checkpoint_uri"].notna()].reset_index(drop=True)
    pick_acc = evidence_column(candidates)
    if run_acc is None:
        notes.append(NO_LABELS)
    if pick_acc == "online_acc" and run_acc == "linear_probe_acc":
        notes.append(
            "the frozen linear probe was measured on final checkpoints only, so the selection evidence "
            "is the online probe of each epoch; `lejepa select --criteria` measures the frozen probe "
            "on every checkpoint"
        )
    return Analysis(
        sweep,
        epochs,
        runs,
        candidates,
        scores,
        run_acc,
        pick_acc,
        correlations,
        curve,
        alpha_in_sample,
        alphas,
        scheme,
        selection_table(candidates, scores, pick_acc),
        criteria,
        last_k,
        group,
        exclusions(runs, group),
        notes,
    )


# --------------------------------------------------------------------------- tables
def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def _with_ci(value: float, lo: float, hi: float) -> str:
    return f"{_fmt(value)} [{_fmt(lo, '.2f')}, {_fmt(hi, '.2f')}]"


def summary_table(a: Analysis, bold: bool = False) -> pd.DataFrame:
    """One row per score: pooled ρ [CI], τ, the pick, its accuracy (the column names which), regret
    and rank. The row of ``a.pick_score`` says ``◀ chosen`` (every cell in bold with ``bold``, for Markdown)."""
    pooled = a.correlations[a.correlations["group"] == "all"].set_index("score") if a.correlations is not None else None
    picks = a.selection.set_index("score") if len(a.selection) else pd.DataFrame()
    rows = []
    for key in a.scores:
        row = {"score": a.label(key)}
        if pooled is not None and key in pooled.index:
            c = pooled.loc[key]
            row["ρ [95% CI]"] = _with_ci(c.rho, c.rho_lo, c.rho_hi)
            row["τ"] = _fmt(c.tau)
        if key in picks.index:
            p = picks.loc[key]
            row["pick"] = f"{p.trial} @ epoch {p.epoch}"
            row["λ"] = _fmt(p.lam, "g")
            if a.pick_acc is not None:
                row[f"acc % ({EVIDENCE_SHORT[a.pick_acc]})"] = _fmt(100 * p.accuracy, ".2f")
                row["regret pts"] = _fmt(p.regret, ".2f")
                row["rank"] = f"{int(p['rank'])}/{p.candidates}"
        if a.pick_score is not None:
            row["made the pick"] = "◀ chosen" if key == a.pick_score else ""
        rows.append(row)
    table = pd.DataFrame(rows).fillna("–")
    if bold and a.pick_score is not None and len(table):
        chosen = table["made the pick"] != ""
        table.loc[chosen] = table.loc[chosen].map(lambda v: f"**{v}**" if v not in ("", "–") else v)
    return table


def health_comparison(a: Analysis) -> pd.DataFrame:
    """One row per base score: pooled ρ and τ over all runs, and regret of the pick, for the score
    as it was (every run) and for its healthy-only twin (ruled-out runs tied last) side by side,
    plus ρ among the runs the twin keeps (how well it orders what it may pick)."""
    pooled = a.correlations[a.correlations["group"] == "all"].set_index("score") if a.correlations is not None else None
    picks = a.selection.set_index("score") if len(a.selection) else pd.DataFrame()
    rows = []
    for key in (k for k in a.scores if not k.startswith(SAFE)):
        row = {"score": a.label(key)}
        for suffix, k in (("", key), (" (healthy only)", SAFE + key)):
            if pooled is not None and k in pooled.index:
                row["ρ" + suffix] = _fmt(pooled.loc[k].rho)
                row["τ" + suffix] = _fmt(pooled.loc[k].tau)
            if a.pick_acc is not None and k in picks.index:
                row["regret" + suffix] = _fmt(picks.loc[k].regret, ".2f")
        if a.run_acc is not None:
            kept = np.isfinite(a.runs[f"score.{SAFE}{key}"].astype(float))
            rho = corr.rank_correlation(a.runs.loc[kept, f"score.{key}"], a.runs.loc[kept, a.run_acc])[0]
            row["ρ among kept"] = f"{_fmt(rho)} (n={int(kept.sum())})"
        rows.append(row)
    return pd.DataFrame(rows).fillna("–")


def terminal_table(a: Analysis) -> str:
    """The summary table as aligned text, with the oracle line and notes."""
    lines = [
        f"sweep {a.sweep.name}: {a.runs.shape[0]} runs, {len(a.candidates)} checkpoints, "
        f"architectures {', '.join(sorted(a.runs['arch'].astype(str).unique()))}"
    ]
    lines.append(summary_table(a).to_string(index=False))
    if a.pick_acc is not None and len(a.selection):
        best = a.selection.iloc[0]
        lines.append(
            f"oracle: {best.oracle_trial} @ epoch {best.oracle_epoch}, "
            f"{100 * best.oracle_accuracy:.2f}% ({EVIDENCE[a.pick_acc]}); random pick: expected regret "
            f"{random_regret(a.candidates, a.pick_acc):.2f} pts"
        )
    if len(a.excluded):
        lines.append(f"ruled out by the healthy-only scores ({len(a.excluded)} of {len(a.runs)} runs):")
        lines += [f"  {r.trial} ({r.arch}, λ={r['λ']:g}): {r.reason}" for _, r in a.excluded.iterrows()]
    lines += [f"note: {n}" for n in a.notes]
    return "\n".join(lines)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (values as str)."""
    cells = [[str(c) for c in df.columns]] + [[str(v) for v in row] for row in df.itertuples(index=False)]
    out = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in cells[1:]])


def _correlation_rows(a: Analysis, t: pd.DataFrame) -> pd.DataFrame:
    """``t``: ``a.correlations``."""
    return pd.DataFrame(
        {
            "score": t["score"].map(a.label),
            "group": t["group"],
            "n": t["n"],
            "Spearman ρ": [_with_ci(*v) for v in zip(t.rho, t.rho_lo, t.rho_hi)],
            "Kendall τ": [_with_ci(*v) for v in zip(t.tau, t.tau_lo, t.tau_hi)],
        }
    )


# --------------------------------------------------------------------------- report files
def _evidence(column: str | None) -> str:
    """What an accuracy column measures, ``none`` without one."""
    return EVIDENCE.get(column, "none") if column is not None else "none"


def write_report(a: Analysis, out_dir: Path | str) -> Path:
    """Write ``report.md``, its PNGs, CSVs of the tables and ``report.html`` (the same, figures embedded)
    under ``out_dir``; returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [
        f"# Label-free checkpoint selection: sweep `{a.sweep.name}`",
        "",
        f"- tracking URI: `{a.sweep.tracking_uri}`; parent run: `{a.sweep.parent_run_id or '(none)'}`",
        f"- {len(a.runs)} runs, {len(a.candidates)} checkpoints; architectures: "
        f"{', '.join(sorted(a.runs['arch'].astype(str).unique()))}; λ: "
        f"{', '.join(format(v, 'g') for v in sorted(a.runs['lam'].dropna().unique()))}",
        f"- correlation evidence: {_evidence(a.run_acc)} on each run's final checkpoint; "
        f"selection evidence: {_evidence(a.pick_acc)}",
        f"- fitted α: {a.alpha_scheme}"
        + (f"; in-sample α̂ on all runs = {a.alpha_in_sample:.2f}" if np.isfinite(a.alpha_in_sample) else ""),
        "",
        "Scores are oriented so that higher predicts better; regret is in accuracy points against the best "
        "checkpoint (oracle); rank 1 means no checkpoint is better than the pick.",
        "",
        "## Selection",
        "",
        markdown_table(summary_table(a, bold=True)),
        "",
    ]
    if a.pick_acc is not None and len(a.selection):
        best = a.selection.iloc[0]
        md += [
            f"Oracle: `{best.oracle_trial}` epoch {best.oracle_epoch} at {100 * best.oracle_accuracy:.2f}%. "
            f"A random pick loses {random_regret(a.candidates, a.pick_acc):.2f} points on average.",
            "",
        ]
    picks = a.selection[["score", "trial", "arch", "epoch", "checkpoint"]].copy() if len(a.selection) else None
    if picks is not None:
        picks["score"] = picks["score"].map(a.label)
        md += ["### Chosen checkpoints", "", markdown_table(picks), ""]
    verdicts = a.runs["verdict"].value_counts()
    md += [
        "## Run health",
        "",
        "Each run's last-epoch verdict (`lejepa.health`): "
        + ", ".join(f"{n} {v}" for v, n in verdicts.items())
        + ". Healthy-only scores rank every other "
        "run last and never pick its checkpoints.",
        "",
    ]
    if len(a.excluded):
        md += [markdown_table(a.excluded.assign(**{"λ": a.excluded["λ"].map(lambda v: f"{v:g}")})), ""]
    if a.correlations is not None and a.curve is not None and a.run_acc is not None:  # all three or none
        pooled = a.correlations[(a.correlations["group"] == "all") & (a.correlations["score"] == "loss")].iloc[0]
        scatter = plots.loss_vs_accuracy(
            a.runs, a.run_acc, pooled.rho, pooled.tau, out / "loss_vs_accuracy.png", acc_label=EVIDENCE[a.run_acc]
        )
        curve = plots.alpha_curve_plot(a.curve, out / "alpha_curve.png", corr.FIXED_ALPHA, a.alpha_in_sample)
        bars = plots.arch_correlation_bars(a.correlations, out / "arch_correlations.png", {k: a.label(k) for k in a.scores})
        md += [
            "## Correlation with accuracy",
            "",
            "Percentile bootstrap over runs, 95% intervals.",
            "",
            markdown_table(_correlation_rows(a, a.correlations)),
            "",
            f"![loss vs accuracy]({scatter.name})",
            "",
            "## C(α)",
            "",
            "Spearman ρ of −loss/λ^α against accuracy over all runs (in sample; the α̂ score above is out of fold).",
            "",
            f"![C(alpha)]({curve.name})",
            "",
            "## Per architecture",
            "",
            f"![per architecture]({bars.name})",
            "",
        ]
        a.correlations.to_csv(out / "correlations.csv", index=False)
        a.curve.to_csv(out / "alpha_curve.csv", index=False)
    if a.criteria is not None and len(a.criteria):
        costs = cost_table(a.criteria)
        costs["seconds"] = costs["seconds"].map(lambda v: f"{v:.3f}")
        if "vs probe" in costs:
            costs["vs probe"] = costs["vs probe"].map(lambda v: f"{v:.2f}×")
        md += [
            "## Cost per checkpoint",
            "",
            "Seconds per checkpoint, each including its own forward passes.",
            "",
            markdown_table(costs),
            "",
        ]
    if a.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in a.notes] + [""]
    a.selection.to_csv(out / "selection.csv", index=False)
    a.epochs.drop(columns=[c for c in a.epochs if c.startswith("params.")]).to_csv(out / "epochs.csv", index=False)
    if a.pick_score is not None and len(a.selection):
        md[md.index("## Selection") + 1 : md.index("## Selection") + 1] = [
            "",
            f"**The pick was made by {a.label(a.pick_score)}** (row marked ◀ chosen).",
        ]
    path = out / REPORT
    path.write_text("\n".join(md))
    (out / REPORT_HTML).write_text(markdown_to_html(path.read_text(), out, f"selection: {a.sweep.name}"))
    return path


def log_report(a: Analysis, out_dir: Path | str, pick_score: str | None = None) -> bool:
    """Log ``out_dir`` under ``selection/`` on the sweep's parent run and tag the pick; False without a parent."""
    if a.sweep.parent_run_id is None:
        return False
    client = MlflowClient(a.sweep.tracking_uri)
    client.log_artifacts(a.sweep.parent_run_id, str(out_dir), artifact_path=ARTIFACT_DIR)
    if pick_score is not None and len(a.selection):
        pick = a.selection.set_index("score").loc[pick_score]
        for key, value in (
            (SELECTED_SCORE_TAG, pick_score),
            (SELECTED_RUN_ID_TAG, pick.run_id),
            (SELECTED_EPOCH_TAG, pick.epoch),
            (SELECTED_CHECKPOINT_TAG, pick.checkpoint),
        ):
            client.set_tag(a.sweep.parent_run_id, key, str(value))
    return True
