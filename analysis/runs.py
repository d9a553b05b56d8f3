"""A sweep's trials as a table to filter, sort and export, and two runs side by side (``lejepa runs``).

- :func:`trials`: one row per trial of :func:`analysis.loader.load_sweep` (its final epoch): the
  :data:`COLUMNS` (identity, numeric hyper-parameters, final ``loss``, the label-free ``score``,
  the accuracies, run id, checkpoint), then the loader's other columns, then every MLflow param
  as ``params.<key>`` (as numbers when all of a param's values are).
- :func:`where`: keep the rows an expression such as ``lam < 0.1 and arch ~ 'resnet*'`` matches:
  ``COLUMN OP VALUE`` conditions (``<  <=  >  >=  ==  !=``, ``=`` for ``==``, and ``~``: an fnmatch
  glob) joined by ``and`` and ``or`` (``and`` binds first; parentheses group). An unquoted number compares as a
  number, also against a param logged as a string ("2e-05" < 0.1); a quoted value compares as
  text. A trial missing the value never matches. The expression is parsed here, never evaluated;
  a malformed one or an unknown column is a :class:`~lejepa.errors.LejepaError` naming the problem.
- :func:`arrange`: sort (``-COL``: descending; missing values last), keep the top N, pick columns.
- :func:`compare`: two runs' identity, params and final metrics side by side; ``diff`` marks the
  rows that differ (numbers compared as numbers).
- :func:`render`: a table as aligned text, CSV or JSON records.
"""

from __future__ import annotations

import contextlib
import json
import operator
import re
from fnmatch import fnmatchcase
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from analysis.loader import EPOCH_METRICS, FINAL_METRICS, RUN_ID, Sweep, resolve
from lejepa.errors import LejepaError, did_you_mean
from lejepa.record import (
    ARCH_TAG,
    EPOCH,
    FINISHED,
    STATUS_FINISHED,
    STATUS_TAG,
    SWEEP_TAG,
    TRAIN_SCORE,
    TRIAL_ID_TAG,
    label_free_score,
)
from lejepa.tables import format_table

PARAMS = "params."
SCORE = "score"
"""The label-free score: the trial's logged ``train/score`` (loss/λ^α), else loss/λ^0.4."""
EXTRA_NUMERIC = {"optim.batch_size": "batch_size"}
"""Params shown as numeric columns beside the loader's ``lam``, ``lr``, ``weight_decay``, ``num_slices``."""
COLUMNS = [
    "trial",
    "run_name",
    "status",
    "arch",
    "lam",
    "lr",
    "num_slices",
    "batch_size",
    "epoch",
    "loss",
    SCORE,
    "linear_probe_acc",
    "knn_acc",
    "online_probe_acc",
    "run_id",
    "checkpoint",
]
"""The default columns of ``lejepa runs``."""
_HIDDEN = {"is_final", "step", EPOCH_METRICS[TRAIN_SCORE], "checkpoint_uri"}
METRIC_COLUMNS = {EPOCH: "epoch", **EPOCH_METRICS, **FINAL_METRICS, TRAIN_SCORE: SCORE}
"""MLflow metric key → its row in :func:`compare` (the loader's column names, ``score`` for the label-free score)."""
_OPS = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "=": operator.eq,
    "!=": operator.ne,
}
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_TOKEN = re.compile(
    r"""\s*(?:(?P<text>'[^']*'|"[^"]*")|(?P<op><=|>=|==|!=|=|<|>|~)|(?P<paren>[()])"""
    r"""|(?P<word>[^\s()<>=!~'"]+))"""
)


def trials(sweep: Sweep) -> pd.DataFrame:
    """One row per trial of ``sweep``: its final state (see the module docstring)."""
    runs = sweep.runs.copy()
    params = sorted(c for c in runs.columns if c.startswith(PARAMS))
    for c in params:
        with contextlib.suppress(ValueError, TypeError):
            runs[c] = pd.to_numeric(runs[c])
    for key, col in EXTRA_NUMERIC.items():
        runs[col] = pd.to_numeric(runs[PARAMS + key], errors="coerce") if PARAMS + key in runs else float("nan")
    fallback = label_free_score(runs["loss"], runs["lam"].where(runs["lam"] > 0))
    runs[SCORE] = runs[EPOCH_METRICS[TRAIN_SCORE]].fillna(fallback)
    runs["checkpoint"] = runs["checkpoint"].fillna(runs["checkpoint_uri"])
    rest = [c for c in runs.columns if c not in COLUMNS and c not in _HIDDEN and c not in params]
    return runs[COLUMNS + rest + params]


def column(table: pd.DataFrame, name: str, what: str) -> str:
    """The column ``name`` designates (itself, or the param ``params.<name>``); ``what`` names the option."""
    for candidate in (name, PARAMS + name):
        if candidate in table.columns:
            return candidate
    known = [*table.columns, *(c.removeprefix(PARAMS) for c in table.columns if c.startswith(PARAMS))]
    hint = did_you_mean(name, known) or f" (columns: {', '.join(COLUMNS)}, or params.<key>)"
    raise LejepaError(f"{what}: unknown column {name!r}{hint}")


def _condition(values: pd.Series, op: str, value: str, quoted: bool, expr: str) -> pd.Series:
    present = values.notna()
    if op == "~":
        return values.map(lambda v: pd.notna(v) and fnmatchcase(str(v), value)).astype(bool)
    if not quoted and _NUMBER.fullmatch(value):
        numbers = pd.to_numeric(values, errors="coerce")
        return numbers.notna() & _OPS[op](numbers, float(value))
    if op not in ("==", "=", "!="):
        raise LejepaError(
            f"--where {expr!r}: {op} compares numbers, and {value!r} is not one; "
            f"text takes ==, != or ~ (a glob such as 'resnet*')"
        )
    return present & _OPS[op](values.map(lambda v: str(v) if pd.notna(v) else ""), value)


class _Parser:
    """Recursive descent over the tokens of a ``--where`` expression; yields the row mask."""

    def __init__(self, table: pd.DataFrame, expr: str) -> None:
        self.table, self.expr, self.i = table, expr, 0
        self.tokens: list[tuple[str, str]] = []
        pos, end = 0, len(expr.rstrip())
        while pos < end:
            m = _TOKEN.match(expr, pos)
            if m is None:
                bad = expr[pos:].lstrip()[0]
                raise LejepaError(f"--where {expr!r}: " + ("unclosed quote" if bad in "'\"" else f"unexpected {bad!r}"))
            kind = str(m.lastgroup)
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()

    def fail(self, expected: str) -> LejepaError:
        after = f"after {self.tokens[self.i - 1][1]!r}" if self.i else "at the start"
        found = repr(self.tokens[self.i][1]) if self.i < len(self.tokens) else "the end"
        return LejepaError(
            f"--where {self.expr!r}: expected {expected} {after}, found {found} (e.g. 'lam < 0.1 and arch ~ resnet*')"
        )

    def peek(self, kind: str, *values: str) -> bool:
        """Consume the next token if it is of ``kind`` (and one of ``values``, case-insensitive)."""
        if (
            self.i < len(self.tokens)
            and self.tokens[self.i][0] == kind
            and (not values or self.tokens[self.i][1].lower() in values)
        ):
            self.i += 1
            return True
        return False

    def mask(self) -> pd.Series:
        found = self.any()
        if self.i < len(self.tokens):
            raise self.fail("'and', 'or' or the end")
        return found

    def any(self) -> pd.Series:
        found = self.all()
        while self.peek("word", "or"):
            found = found | self.all()
        return found

    def all(self) -> pd.Series:
        found = self.condition()
        while self.peek("word", "and"):
            found = found & self.condition()
        return found

    def condition(self) -> pd.Series:
        if self.peek("paren", "("):
            found = self.any()
            if not self.peek("paren", ")"):
                raise self.fail("')'")
            return found
        if self.i < len(self.tokens) and self.tokens[self.i][1].lower() in ("and", "or") or not self.peek("word"):
            raise self.fail("a column")
        name = column(self.table, self.tokens[self.i - 1][1], "--where")
        if not self.peek("op"):
            raise self.fail("an operator (<, <=, >, >=, ==, !=, ~)")
        op = self.tokens[self.i - 1][1]
        if not (self.peek("word") or self.peek("text")):
            raise self.fail("a value")
        kind, value = self.tokens[self.i - 1]
        quoted = kind == "text"
        return _condition(self.table[name], op, value[1:-1] if quoted else value, quoted, self.expr)


def where(table: pd.DataFrame, expr: str) -> pd.DataFrame:
    """The rows of ``table`` that ``expr`` matches (see the module docstring)."""
    return table[_Parser(table, expr).mask()]


def arrange(table: pd.DataFrame, sort: str = SCORE, top: int | None = None, columns: list[str] | None = None) -> pd.DataFrame:
    """``table`` sorted by ``sort`` (``-COL``: descending), its first ``top`` rows, the ``columns`` (default :data:`COLUMNS`)."""
    key = column(table, sort.removeprefix("-"), "--sort")
    table = table.sort_values(key, ascending=not sort.startswith("-"), na_position="last", kind="stable")
    picked = [column(table, c.strip(), "--columns") for c in (columns or COLUMNS) if c.strip()]
    return table[picked].head(top).reset_index(drop=True)


# --------------------------------------------------------------------------- compare
def find_run(client: MlflowClient, ref: str) -> Run:
    """The run ``ref`` names: a run id, or ``SWEEP/TRIAL_ID`` (its run name)."""
    if RUN_ID.match(ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            raise LejepaError(f"no run {ref!r} in {client.tracking_uri}") from None
    sweep, slash, trial = ref.rpartition("/")
    if not slash or not sweep or not trial:
        raise LejepaError(f"{ref!r} is neither a run id (32 hex digits) nor SWEEP/TRIAL_ID")
    name, _, runs, _ = resolve(client, sweep)
    by_trial = {r.data.tags.get(TRIAL_ID_TAG, r.info.run_name): r for r in sorted(runs, key=lambda r: r.info.start_time)}
    if trial not in by_trial:
        raise LejepaError(f"sweep {name!r} has no trial {trial!r}{did_you_mean(trial, by_trial)}")
    return by_trial[trial]


def run_record(run: Run) -> dict[str, Any]:
    """A run's identity, params (``params.<key>``) and final metrics (:data:`METRIC_COLUMNS`)."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    status = tags.get(STATUS_TAG) or (STATUS_FINISHED if run.info.status == FINISHED else run.info.status.lower())
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "sweep": tags.get(SWEEP_TAG),
        "trial": tags.get(TRIAL_ID_TAG),
        "status": status,
        "arch": tags.get(ARCH_TAG),
        **{PARAMS + k: v for k, v in sorted(params.items())},
        **{col: metrics[key] for key, col in METRIC_COLUMNS.items() if key in metrics},
    }


def _same(a: Any, b: Any) -> bool:
    if pd.isna(a) or pd.isna(b):
        return pd.isna(a) and pd.isna(b)
    if all(isinstance(v, float) or _NUMBER.fullmatch(str(v)) for v in (a, b)):
        return float(a) == float(b)
    return str(a) == str(b)


def compare(a: Run, b: Run) -> pd.DataFrame:
    """Rows ``field``, ``a``, ``b``, ``diff`` (``*`` where the values differ) for runs ``a`` and ``b``."""
    ra, rb = run_record(a), run_record(b)
    params = sorted({k for k in (*ra, *rb) if k.startswith(PARAMS)})
    head = [k for k in ra if not k.startswith(PARAMS) and k not in METRIC_COLUMNS.values()]
    fields = head + params + list(dict.fromkeys(c for c in METRIC_COLUMNS.values() if c in ra or c in rb))
    rows = [(f, ra.get(f), rb.get(f)) for f in fields]
    return pd.DataFrame([(f, x, y, "" if _same(x, y) else "*") for f, x, y in rows], columns=["field", "a", "b", "diff"])


# --------------------------------------------------------------------------- output
def render(table: pd.DataFrame, fmt: str = "text") -> str:
    """``table`` as ``text`` (aligned columns, floats as %.4g, ``-`` for missing), ``csv`` or ``json`` (records)."""
    if fmt == "csv":
        return table.to_csv(index=False)
    plain = json.loads(table.to_json(orient="split", index=False, double_precision=15))
    if fmt == "json":
        return json.dumps([dict(zip(plain["columns"], row)) for row in plain["data"]], indent=2, ensure_ascii=False) + "\n"
    return format_table(plain["columns"], plain["data"]) + "\n"
