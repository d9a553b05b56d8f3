"""``lejepa runs``: a sweep's trials from the terminal, and two runs side by side.

- ``lejepa runs list SWEEP [--where EXPR] [--sort=[-]COL] [--top N] [--columns a,b]``
  (``lejepa runs SWEEP ...`` for short): one row per trial, filtered, sorted (default: the
  label-free score, ascending) and cut;
- ``lejepa runs compare RUN_A RUN_B`` (run ids or ``SWEEP/TRIAL_ID``): params and final metrics
  side by side, the differing rows marked ``*``.

Both print an aligned table, or ``--csv`` / ``--json`` records, to stdout or ``--out FILE``. The
query logic is :mod:`analysis.runs`. Published through the ``lejepa.commands`` entry-point group.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lejepa.errors import LejepaError

if TYPE_CHECKING:  # pandas and MLflow load when the command runs, not with every `lejepa` command
    import pandas as pd


def _store(args: argparse.Namespace) -> str:
    from analysis.cli import check_store
    from lejepa.record import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri("runs")
    check_store(uri)
    return uri


def _check_out(out: str | None) -> None:
    """Before any work: ``--out`` must name a file that can be written."""
    from lejepa.preflight import check_writable

    if out is not None:
        if Path(out).is_dir():
            raise LejepaError(f"--out {out} is a folder: name a file")
        check_writable(Path(out).absolute().parent, "--out folder")


def _emit(table: pd.DataFrame, args: argparse.Namespace) -> None:
    from analysis.runs import render

    text = render(table, "csv" if args.csv else "json" if args.json else "text")
    if args.out is None:
        sys.stdout.write(text)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {len(table)} rows to {out}", file=sys.stderr)


def _cmd_list(args: argparse.Namespace) -> int:
    from analysis.loader import load_sweep
    from analysis.runs import SCORE, arrange, trials, where

    if args.top is not None and args.top < 1:
        raise LejepaError(f"--top must be ≥ 1, got {args.top}")
    _check_out(args.out)
    sweep = load_sweep(args.sweep, _store(args))
    table = trials(sweep)
    if args.where:
        table = where(table, args.where)
    table = arrange(table, args.sort or SCORE, args.top, args.columns.split(",") if args.columns else None)
    for note in sweep.notes:
        print(f"note: {note}", file=sys.stderr)
    _emit(table, args)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from analysis.runs import compare, find_run

    _check_out(args.out)
    client = MlflowClient(_store(args))
    table = compare(find_run(client, args.run_a), find_run(client, args.run_b))
    _emit(table[table["diff"] != ""] if args.diff_only else table, args)
    return 0


class _ListByDefault(argparse._SubParsersAction):
    """Sub-commands where a first word that names none of them starts ``list``:
    ``lejepa runs SWEEP`` is ``lejepa runs list SWEEP`` (a sweep named ``list`` or ``compare``
    needs the explicit ``list``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse checks the first word against the choices before calling the action: no choices, then
        self.choices = None  # type: ignore[assignment]

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None
    ) -> None:
        if values[0] not in self._name_parser_map:
            values = ["list", *values]
        super().__call__(parser, namespace, values, option_string)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``runs`` sub-command (``list``, ``compare``) to the ``lejepa`` parser."""
    p = sub.add_parser(
        "runs",
        help="list, filter, sort and export a sweep's trials; compare two runs",
        description="Query a sweep's trials (lejepa runs [list] SWEEP ...) or compare two runs "
        "(lejepa runs compare RUN_A RUN_B).",
    )
    cmds = p.add_subparsers(action=_ListByDefault, dest="runs_command", required=True, metavar="{list,compare} | SWEEP")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or runs/mlflow.db)")
    fmt = common.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV instead of a table")
    fmt.add_argument("--json", action="store_true", help="JSON records instead of a table")
    common.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")

    lst = cmds.add_parser(
        "list",
        parents=[common],
        help="one row per trial of a sweep (its final state)",
        description="One row per trial of SWEEP: its final epoch's loss, label-free score and "
        "accuracies with its hyper-parameters, run id and checkpoint.",
    )
    lst.add_argument("sweep", metavar="SWEEP", help="sweep name, sweep parent run id, or MLflow experiment name")
    lst.add_argument(
        "--where",
        metavar="EXPR",
        help="keep the trials EXPR matches, e.g. 'lam < 0.1 and arch ~ resnet*': COLUMN OP VALUE "
        "with <, <=, >, >=, ==, != (numbers as numbers; quote a value for text) or ~ (glob), "
        "joined by and / or, grouped by ( )",
    )
    lst.add_argument(
        "--sort", metavar="COL", help="sort by COL, or descending with --sort=-COL (default: score, the label-free score)"
    )
    lst.add_argument("--top", type=int, metavar="N", help="the first N trials only")
    lst.add_argument(
        "--columns",
        metavar="A,B,...",
        help="columns to show (default: trial, run_name, status, arch, lam, lr, num_slices, batch_size, "
        "epoch, loss, score, the accuracies, run_id, checkpoint); any loader column or params.<key>",
    )
    lst.set_defaults(func=_cmd_list)

    cmp = cmds.add_parser(
        "compare",
        parents=[common],
        help="two runs' params and final metrics side by side",
        description="Two runs' params and final metrics side by side; diff marks the rows "
        "that differ (numbers compared as numbers).",
    )
    cmp.add_argument("run_a", metavar="RUN_A", help="run id, or SWEEP/TRIAL_ID")
    cmp.add_argument("run_b", metavar="RUN_B", help="run id, or SWEEP/TRIAL_ID")
    cmp.add_argument("--diff-only", action="store_true", help="only the rows that differ")
    cmp.set_defaults(func=_cmd_compare)
