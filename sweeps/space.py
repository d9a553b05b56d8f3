"""The search space: a spec's ``space`` entries parsed into :class:`Param` (grid, choice or a range
distribution, each a Ray Tune domain), trial configs built from sampled dotted values, and every
value the space can take validated against the config before anything runs."""

from __future__ import annotations

import copy
import inspect
import itertools
import math
from dataclasses import dataclass
from typing import Any

from lejepa.config import build_config, set_dotted, valid_keys
from lejepa.errors import ConfigError, LejepaError, did_you_mean
from lejepa.tables import short
from sweeps.schema import SpecFile

SET_BY_SWEEP = ("train.out_dir", "train.run_name", "train.threads", "tracking.")
"""Config keys the sweep sets itself (run folder, threads from the trial's CPUs, tracking)."""

DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "randint": 2, "qrandint": 3}
"""Range distributions and how many numbers each takes."""

MAX_TRIALS = 10_000
"""The most trials one spec may expand to (counted, never materialised, before anything else)."""
VALIDATED_COMBINATIONS = 1_000
"""Grid combinations checked together at load (each value is also checked alone): cross-field
rules such as views.local_size ≤ data.resolution."""

DATA_LOCATION_KEYS = ("data.name", "data.root", "data.download")
"""The keys that decide where a trial's dataset files are (``lejepa.data.check_data``)."""


@dataclass(frozen=True)
class Param:
    """One search-space entry: ``kind`` is grid, choice or a range distribution; ``values`` are the
    grid/choice values or the distribution's numbers."""

    key: str
    kind: str
    values: tuple[Any, ...]

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def describe(self) -> str:
        """How the dry-run table shows a sampled value, e.g. ``~loguniform(0.0001, 0.01)``."""
        return f"~{self.kind}({', '.join(short(v) for v in self.values)})"

    def probes(self) -> list[Any]:
        """The values validated against the config: every grid/choice value, both ends of a range."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        low, high = self.values[0], self.values[1]
        if self.kind == "randint":
            high -= 1
        return [low, high]

    def domain(self) -> Any:
        """The Ray Tune search-space object."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        return getattr(tune, self.kind)(*([list(self.values)] if self.kind == "choice" else self.values))


def grid_size(space: list[Param]) -> int:
    """The number of grid combinations (1 without a grid)."""
    return math.prod(len(p.values) for p in space if p.is_grid)


def trial_tree(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the sampled dotted ``params`` applied (a new nested dict)."""
    tree = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(tree, key, value)
    return tree


def get_dotted(tree: dict[str, Any], key: str) -> Any:
    """The value at the dotted ``key`` of a nested mapping."""
    for part in key.split("."):
        tree = tree[part]
    return tree


def is_set_by_sweep(key: str) -> bool:
    """Whether the sweep sets ``key`` itself (:data:`SET_BY_SWEEP`): it can be neither swept nor overridden."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in SET_BY_SWEEP)


def parse_param(key: str, value: Any, fail) -> Param:
    """The space entry ``key: value`` (a list is a grid; else ``{kind: args}``) as a :class:`Param`."""
    where = f"space.{key}"
    known = valid_keys()
    if key not in known:
        raise fail(where, f"unknown config key{did_you_mean(key, known)}")
    if is_set_by_sweep(key):
        raise fail(where, "is set by the sweep itself and cannot be swept")
    if isinstance(value, list):
        value = {"grid": value}
    if not isinstance(value, dict) or len(value) != 1:
        raise fail(
            where,
            f"expected a list (grid) or one of {{grid, choice, {', '.join(DISTRIBUTIONS)}, catalog}}: "
            f"[...], got {short(value)}; a single value belongs in base",
        )
    ((kind, args),) = value.items()
    if kind == "catalog":
        if key != "model.arch":
            raise fail(where, "a catalog query can only set model.arch")
        return Param(key, "grid", tuple(_catalog_names(args, lambda problem: fail(f"{where}.catalog", problem))))
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise fail(f"{where}.{kind}", "expected a non-empty list of values")
        return Param(key, kind, tuple(args))
    if kind in DISTRIBUTIONS:
        count = DISTRIBUTIONS[kind]
        if not (isinstance(args, list) and len(args) == count and all(_is_number(a) for a in args)):
            shape = "[low, high, q]" if count == 3 else "[low, high]"
            raise fail(f"{where}.{kind}", f"expected {shape} (numbers), got {short(args)}")
        args = [_number(a) for a in args]
        if kind in ("randint", "qrandint") and not all(float(a).is_integer() for a in args):
            raise fail(f"{where}.{kind}", f"expected integers, got {short(args)}")
        if kind in ("randint", "qrandint"):
            args = [int(a) for a in args]
        if not args[0] < args[1]:
            raise fail(f"{where}.{kind}", f"low must be below high, got {short(args)}")
        if kind == "loguniform" and args[0] <= 0:
            raise fail(f"{where}.{kind}", f"low must be positive for a log scale, got {short(args[0])}")
        return Param(key, kind, tuple(args))
    options = ["grid", "choice", *DISTRIBUTIONS, "catalog"]
    raise fail(where, f"unknown distribution {kind!r}{did_you_mean(kind, options)}; choose from {', '.join(options)}")


def check_expansion(spec: SpecFile, space: list[Param], fail) -> None:
    """The space fits the search and scheduler (Optuna samples, never grids; a scheduler's horizon is
    ``train.epochs``) and expands to at most :data:`MAX_TRIALS` trials."""
    if spec.search.algo == "optuna":
        for p in space:
            if p.is_grid:
                raise fail(
                    f"space.{p.key}",
                    "search.algo=optuna cannot take a grid (a list or catalog query): write {choice: [...]} instead",
                )
    if spec.scheduler.type != "none" and any(p.key == "train.epochs" for p in space):
        raise fail("space.train.epochs", "cannot be swept together with a scheduler (its max_t is train.epochs)")
    grid = [p for p in space if p.is_grid]
    trials = grid_size(space) * (1 if spec.search.algo == "optuna" else spec.num_samples)
    if trials > MAX_TRIALS:
        sizes = " × ".join(f"{len(p.values)} {p.key}" for p in grid)
        samples = f" × {spec.num_samples} samples" if spec.num_samples > 1 else ""
        raise fail(
            "space",
            f"expands to {trials:,} trials ({sizes}{samples}); "
            f"the limit is {MAX_TRIALS:,}: sample some keys ({{choice: [...]}}, num_samples) or split the sweep",
        )


def validate_values(base: dict[str, Any], space: list[Param], fail) -> None:
    """Every probe value alone, then every grid combination (ranges at their low end), on ``base``."""
    for p in space:
        for value in p.probes():
            check_trial(base, {p.key: value}, f"space.{p.key}", fail)
    grid = [p for p in space if p.is_grid]
    if len(grid) > 1:
        sampled = {p.key: p.probes()[0] for p in space if not p.is_grid}
        for combo in itertools.islice(itertools.product(*(p.values for p in grid)), VALIDATED_COMBINATIONS):
            check_trial(base, {**sampled, **{p.key: v for p, v in zip(grid, combo)}}, "space", fail)


def check_trial(base: dict[str, Any], params: dict[str, Any], where: str, fail) -> None:
    """The trial config ``base`` + ``params`` is valid; else ``fail(where, problem)``."""
    try:
        build_config(trial_tree(base, params))
    except ConfigError as exc:
        raise fail(where, str(exc).removeprefix("config: ")) from None


def check_data(base: dict[str, Any], space: list[Param], fail) -> None:
    """The dataset of every data configuration the sweep trains is there (``lejepa train``'s
    pre-flight, on this machine), so missing files are one line here, not a failure inside every trial."""
    from lejepa.data import check_data as check_dataset

    swept = [p for p in space if p.key in DATA_LOCATION_KEYS]
    for values in itertools.product(*(p.probes() for p in swept)):
        try:
            check_dataset(build_config(trial_tree(base, {p.key: v for p, v in zip(swept, values)})).data)
        except LejepaError as exc:
            raise fail(f"space.{swept[0].key}" if swept else "base.data", str(exc)) from None


def _catalog_names(query_args: Any, fail) -> list[str]:
    from lejepa.catalog import query

    accepted = [n for n in inspect.signature(query).parameters]
    if not isinstance(query_args, dict):
        raise fail(f"expected a mapping of query fields ({', '.join(accepted)}), got {short(query_args)}")
    for field in query_args:
        if field not in accepted:
            raise fail(f"unknown query field {field!r}{did_you_mean(field, accepted)}")
    try:
        return [info.name for info in query(**query_args)]
    except LejepaError as exc:
        raise fail(str(exc)) from None


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (isinstance(value, str) and _float_or_none(value) is not None)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, str) else value


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
