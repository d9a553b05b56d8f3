"""The sweep's overview on its parent run, written when the sweep settles (:func:`log_overview`).

- The run's MLflow description (tag ``mlflow.note.content``, Markdown): the spec's description, the
  label-free pick with a link to its trial run and its checkpoint, and a table of the trials (best
  label-free score first, each linked to its run, the pick in bold) cut to fit MLflow's 8000
  characters; the whole table is the artifact ``overview/trials.csv``.
- The tag ``lejepa.best_train_score_checkpoint``: the pick's final checkpoint folder (its run id and
  trial are ``lejepa.best_train_score_run`` / ``_trial``, :func:`sweeps.mlflow_runs.log_best`).
- Two figures under ``overview/``: λ against accuracy per architecture (the random-init probe as a
  dashed line where measured) and final loss against accuracy with the pick marked.

The pick is the finished, healthy trial with the lowest final ``train/score``
(:func:`lejepa.record.label_free_score`); accuracy never picks. The accuracy shown is the frozen
linear probe's (``eval/linear_probe_acc``) where the trials measured it, else the online probe's,
and every table and figure says which.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from lejepa.checkpoint import checkpoint_name
from lejepa.record import (
    BEST_SCORE,
    CHECKPOINTS_DIR,
    HEALTHY,
    NOTE_TAG,
    OVERVIEW_ARTIFACT,
    best_checkpoint_tag,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

    from sweeps.outcome import SweepOutcome, TrialSummary

NOTE_LIMIT = 8000
"""MLflow's longest tag value (``mlflow.utils.validation.MAX_TAG_VAL_LENGTH``), which the description is."""
ACCURACIES = {"linear_acc": "frozen linear probe accuracy", "online_acc": "online probe accuracy"}
"""The accuracy an overview shows, in order of preference, and its name."""


def pick(outcome: SweepOutcome) -> TrialSummary | None:
    """The sweep's label-free pick: the healthy finished trial with the lowest final score."""
    return outcome.best("score", "min", healthy_only=True)


def accuracy_of(outcome: SweepOutcome) -> str | None:
    """The :data:`ACCURACIES` attribute the overview shows: the first one some trial has."""
    return next((a for a in ACCURACIES if any(getattr(t, a) is not None for t in outcome.trials)), None)


def checkpoint_of(outcome: SweepOutcome, trial: TrialSummary) -> Path | None:
    """The trial's last checkpoint folder in its run folder, when it is on this disk."""
    if trial.epoch is None:
        return None
    folder = outcome.sweep.trials_dir / trial.trial_id / CHECKPOINTS_DIR / checkpoint_name(int(trial.epoch))
    return folder if folder.is_dir() else None


def trials_table(outcome: SweepOutcome) -> pd.DataFrame:
    """One row per trial, best label-free score first: id, run id, status, health, architecture, the
    searched params, epoch, loss, score, accuracies (fractions) and whether it is the pick."""
    chosen = pick(outcome)
    rows = [
        {
            "trial": t.trial_id,
            "run_id": t.run_id,
            "status": t.status,
            "health": t.health,
            "arch": t.arch,
            **{k: t.params.get(k) for k in outcome.spec.keys() if k != "model.arch"},
            "epoch": t.epoch,
            "loss": t.loss,
            "score": t.score,
            "linear_probe_acc": t.linear_acc,
            "init_linear_probe_acc": t.init_acc,
            "online_probe_acc": t.online_acc,
            "pick": chosen is not None and t.trial_id == chosen.trial_id,
        }
        for t in outcome.trials
    ]
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["_order"] = [(0 if r["status"] == "finished" else 1, r["score"] if r["score"] is not None else math.inf) for r in rows]
    return table.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def description(outcome: SweepOutcome, experiment_id: str) -> str:
    """The parent run's Markdown description (see the module docstring), at most :data:`NOTE_LIMIT` characters."""
    table, acc = trials_table(outcome), accuracy_of(outcome)
    chosen = pick(outcome)

    def link(trial: str, run_id: str | None) -> str:
        return f"[{trial}](#/experiments/{experiment_id}/runs/{run_id})" if isinstance(run_id, str) and run_id else trial

    head = [outcome.spec.description, ""] if outcome.spec.description else []
    if chosen is not None:
        ckpt = checkpoint_of(outcome, chosen)
        head.append(
            f"**Label-free pick** (lowest final `train/score` among healthy trials): {link(chosen.trial_id, chosen.run_id)} "
            f"({chosen.arch}, λ={_num(chosen.lam)}), checkpoint `{ckpt or '(not on the sweep disk)'}`. "
            "Refine it with `lejepa select " + outcome.sweep.name + "`."
        )
    else:
        head.append("**No label-free pick**: no finished trial is healthy.")
    acc_name = ACCURACIES[acc] if acc else "accuracy (not measured)"
    head += ["", f"Trials, best score first; accuracy: {acc_name} (labels: evidence, never the pick).", ""]
    params = [k for k in outcome.spec.keys() if k != "model.arch"]
    acc_header = f"{'frozen' if acc == 'linear_acc' else 'online'} acc %"
    header = ["trial", "status", "health", "arch", *params, "loss", "score", acc_header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    acc_column = "linear_probe_acc" if acc == "linear_acc" else "online_probe_acc"
    shown = 0
    budget = NOTE_LIMIT - len("\n".join(head)) - 200  # room for the closing line
    for r in table.to_dict("records"):
        cells = [
            link(r["trial"], r["run_id"]),
            _num(r["status"]),
            _num(r["health"]),
            _num(r["arch"]),
            *(_num(r[k]) for k in params),
            _num(r["loss"]),
            _num(r["score"]),
            _num(None if r[acc_column] is None or pd.isna(r[acc_column]) else 100 * r[acc_column], ".1f"),
        ]
        if r["pick"]:
            cells = [f"**{c}**" for c in cells]
        line = "| " + " | ".join(cells) + " |"
        if sum(len(x) + 1 for x in lines) + len(line) > budget:
            break
        lines.append(line)
        shown += 1
    tail = [] if shown == len(table) else ["", f"… {len(table) - shown} more trials in `{OVERVIEW_ARTIFACT}/trials.csv`."]
    return "\n".join([*head, *lines, *tail])[:NOTE_LIMIT]


def _num(value: object, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


# --------------------------------------------------------------------------- figures
def lam_vs_accuracy(outcome: SweepOutcome) -> Figure | None:
    """λ (log x) against accuracy (%) of the finished trials: one line per architecture through the
    mean at each λ, the trials as points, the random-init probe as a dashed line where measured."""
    from matplotlib.figure import Figure

    acc = accuracy_of(outcome)
    table = _finished(outcome, acc)
    if acc is None or table.empty:
        return None
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for i, (arch, part) in enumerate(table.groupby("arch", sort=True)):
        means = part.groupby("lam")["acc"].mean()
        color = f"C{i % 10}"
        ax.plot(means.index, means.values, marker="o", color=color, label=str(arch))
        ax.scatter(part["lam"], part["acc"], color=color, s=14, alpha=0.5)
        init = part["init"].dropna()
        if len(init):
            ax.axhline(init.mean(), color=color, linestyle="--", linewidth=0.8)
    if (table["lam"] > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel("λ (SIGReg weight)")
    ax.set_ylabel(f"{ACCURACIES[acc]} (%)")
    ax.set_title(f"sweep {outcome.sweep.name}: λ vs accuracy" + (" (dashed: random init)" if table["init"].notna().any() else ""))
    ax.legend(title="architecture", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def loss_vs_accuracy(outcome: SweepOutcome) -> Figure | None:
    """Final training loss (log x) against accuracy (%), one point per finished trial (hollow when
    not healthy), the label-free pick as a red star."""
    from matplotlib.figure import Figure

    acc = accuracy_of(outcome)
    table = _finished(outcome, acc)
    if acc is None or table.empty or table["loss"].isna().all():
        return None
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for i, (arch, part) in enumerate(table.groupby("arch", sort=True)):
        healthy = part["health"] == HEALTHY
        color = f"C{i % 10}"
        ax.scatter(part.loc[healthy, "loss"], part.loc[healthy, "acc"], color=color, s=30, label=str(arch))
        ax.scatter(part.loc[~healthy, "loss"], part.loc[~healthy, "acc"], facecolors="none", edgecolors=color, s=30)
    chosen = pick(outcome)
    if chosen is not None and chosen.loss is not None and getattr(chosen, acc) is not None:
        at = (chosen.loss, 100 * getattr(chosen, acc))
        ax.scatter(*at, marker="*", s=260, color="red", zorder=3, label="label-free pick")
        ax.annotate(chosen.trial_id, at, textcoords="offset points", xytext=(6, 6), fontsize=8)
    if (table["loss"] > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel("final training loss")
    ax.set_ylabel(f"{ACCURACIES[acc]} (%)")
    ax.set_title(f"sweep {outcome.sweep.name}: loss vs accuracy (hollow: not healthy)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _finished(outcome: SweepOutcome, acc: str | None) -> pd.DataFrame:
    """The finished trials with an accuracy: arch, λ, acc (%), init (%), loss, health."""
    rows = [
        {
            "arch": t.arch,
            "lam": float(t.lam),
            "acc": 100 * getattr(t, acc),
            "init": 100 * t.init_acc if t.init_acc is not None else None,
            "loss": t.loss,
            "health": t.health,
        }
        for t in outcome.trials
        if acc is not None and t.status == "finished" and getattr(t, acc) is not None and t.lam is not None
    ]
    return pd.DataFrame(rows, columns=["arch", "lam", "acc", "init", "loss", "health"]).astype({"init": float, "loss": float})


FIGURES = {"lam_vs_accuracy.png": lam_vs_accuracy, "loss_vs_accuracy.png": loss_vs_accuracy}
"""The parent run's figures under ``overview/``, by file name."""


def log_overview(client: MlflowClient, outcome: SweepOutcome) -> None:
    """Write the overview on the sweep's parent run: description, pick checkpoint tag, trials.csv, figures."""
    run_id = outcome.sweep.parent_run_id
    experiment_id = client.get_run(run_id).info.experiment_id
    client.set_tag(run_id, NOTE_TAG, description(outcome, experiment_id))
    chosen = pick(outcome)
    ckpt = checkpoint_of(outcome, chosen) if chosen is not None else None
    if ckpt is not None:
        client.set_tag(run_id, best_checkpoint_tag(BEST_SCORE), str(ckpt))
    with tempfile.TemporaryDirectory() as tmp:
        trials_table(outcome).to_csv(Path(tmp) / "trials.csv", index=False)
        client.log_artifact(run_id, str(Path(tmp) / "trials.csv"), artifact_path=OVERVIEW_ARTIFACT)
    for name, draw in FIGURES.items():
        fig = draw(outcome)
        if fig is not None:
            client.log_figure(run_id, fig, f"{OVERVIEW_ARTIFACT}/{name}")
