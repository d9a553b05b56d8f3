"""Sweep specs: a YAML file → a validated :class:`SweepSpec` → a Ray Tune search space.

A spec is a base training config plus a search space over dotted config keys::

    name: quickstart
    base: {data: {name: digits-shifted}, train: {epochs: 3}}     # or `base: file.yaml` (relative to the spec)
    space:
      loss.lam: [0.01, 0.05, 0.2]                                # list = grid
      model.arch: {catalog: {max_params: 20M, family: [resnet]}}  # grid over catalog names
      optim.lr: {loguniform: [1e-4, 1e-2]}                       # uniform, choice, randint, qrandint, grid
    num_samples: 1
    search: {algo: default, metric: train/score, mode: min}      # default (grid/random) | optuna (TPE)
    scheduler: {type: none}                                      # none | asha
    resources: {cpus_per_trial: 1, gpus_per_trial: 0, workers_per_trial: 1, rules: [{max_params: 5M, gpus_per_trial: 0.25}]}
    arch_overrides: [{family: [vit, deit], set: {optim.lr: 1e-3}}]  # per-architecture base values
    max_concurrent_trials: 2
    tracking: {experiment: lejepa-sweeps}
    max_failures: 2
    score_alpha: 0.4                                             # train/score = epoch/loss / λ^α
    prune_collapsed: 2                                           # stop a trial collapsed 2 epochs in a row

Tune semantics apply: ``num_samples`` repeats the whole grid; ``randint: [low, high]`` excludes
``high``; ``qrandint: [low, high, q]`` includes it. ``prune_collapsed: k`` is label-free pruning:
it sets ``train.collapse_patience: k`` in the base, so a trial whose health verdict is
``collapsed`` for k epochs in a row stops (status ``collapsed``, never retried).
``arch_overrides`` sets base values per architecture (first matching rule wins, the conditions of
``resources.rules``): a grid over architectures whose families need different values, e.g. a
learning rate per family; a key cannot be both overridden and swept. Every value a grid or choice can take, and
both ends of every range, are validated against the config before anything runs. Every problem
is a one-line :class:`~lejepa.errors.ConfigError` ``<file>: <key>: <problem>``. Nothing here
starts Ray or MLflow.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lejepa.config import PLAIN_NAME_RULE, Config, build_config, is_plain_name, load_yaml, set_dotted, valid_keys
from lejepa.errors import ConfigError, LejepaError, did_you_mean
from lejepa.record import (
    EPOCH_INVARIANCE,
    EPOCH_LOSS,
    EPOCH_PROBE_LOSS,
    EPOCH_SIGREG,
    ONLINE_TEST_ACC,
    ONLINE_TRAIN_ACC,
    SCORE_ALPHA,
    TRAIN_SCORE,
)

SCORE_METRIC = TRAIN_SCORE
"""The label-free score reported per epoch: ``epoch/loss / λ^α`` (:func:`lejepa.record.label_free_score`)."""

METRICS = (EPOCH_LOSS, EPOCH_INVARIANCE, EPOCH_SIGREG, EPOCH_PROBE_LOSS, ONLINE_TRAIN_ACC, ONLINE_TEST_ACC,
           SCORE_METRIC)
"""Per-epoch metrics a search or scheduler may optimise."""

SET_BY_SWEEP = ("train.out_dir", "train.run_name", "train.threads", "tracking.")
"""Config keys the sweep sets itself (run folder, threads from the trial's CPUs, tracking)."""

DRIVER_CPUS = 0.01
"""CPUs of a multi-worker trial's driver: it only launches and watches its Ray Train workers."""

DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "randint": 2, "qrandint": 3}
"""Range distributions and how many numbers each takes."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchSpec(_Section):
    """How trials are generated: Tune's grid/random generator, or Optuna's TPE."""

    algo: Literal["default", "optuna"] = "default"
    metric: str = SCORE_METRIC
    mode: Literal["min", "max"] = "min"
    seed: int | None = None


class SchedulerSpec(_Section):
    """Early stopping: none, or ASHA on any per-epoch metric (label-free by default)."""

    type: Literal["none", "asha"] = "none"
    metric: str = SCORE_METRIC
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)


class ArchCondition(_Section):
    """Which architectures a rule applies to: those that match every condition given."""

    max_params: int | float | str | None = None
    min_params: int | float | str | None = None
    family: str | list[str] | None = None
    pattern: str | None = None

    def _has_condition(self) -> None:
        if self.max_params is None and self.min_params is None and self.family is None and self.pattern is None:
            raise ValueError("a rule needs a condition: max_params, min_params, family or pattern")


class ArchOverride(ArchCondition):
    """Base config values (dotted keys) for the architectures that match (first matching rule wins)."""

    set: dict[str, Any]

    @model_validator(mode="after")
    def _complete(self) -> ArchOverride:
        self._has_condition()
        if not self.set:
            raise ValueError("a rule needs at least one key under set")
        return self


class ResourceRule(ArchCondition):
    """Resources for the architectures that match every condition given (first matching rule wins)."""

    cpus_per_trial: float | None = Field(None, gt=0)
    gpus_per_trial: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _complete(self) -> ResourceRule:
        self._has_condition()
        if self.cpus_per_trial is None and self.gpus_per_trial is None:
            raise ValueError("a rule needs cpus_per_trial or gpus_per_trial")
        return self


class ResourcesSpec(_Section):
    """Per-trial resources; ``workers_per_trial > 1`` runs each trial as DDP on Ray Train workers,
    each with ``cpus_per_trial`` CPUs and ``gpus_per_trial`` GPUs."""

    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: float = Field(0, ge=0)
    workers_per_trial: int = Field(1, ge=1)
    rules: list[ResourceRule] = []


class TrackingSpec(_Section):
    """MLflow experiment (and optionally URI) of the sweep's parent and trial runs."""

    experiment: str = "lejepa-sweeps"
    uri: str | None = None


class _SpecFile(_Section):
    name: str | None = None
    description: str = ""
    base: dict[str, Any] | str = {}
    space: dict[str, Any] = {}
    num_samples: int = Field(1, ge=1)
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: ResourcesSpec = ResourcesSpec()
    arch_overrides: list[ArchOverride] = []
    max_concurrent_trials: int | None = Field(None, ge=1)
    tracking: TrackingSpec = TrackingSpec()
    max_failures: int = Field(2, ge=-1)
    score_alpha: float = Field(SCORE_ALPHA, ge=0)
    prune_collapsed: int | None = Field(None, ge=1)


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
        return f"~{self.kind}({', '.join(_short(v) for v in self.values)})"

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


@dataclass(frozen=True)
class TrialResources:
    """What one trial asks for: ``workers`` processes with ``cpus`` and ``gpus`` each."""

    cpus: float
    gpus: float
    workers: int

    def tune_request(self) -> dict[str, float]:
        """The trial actor's resources; a multi-worker trial's actor is only the Ray Train driver."""
        if self.workers > 1:
            return {"cpu": DRIVER_CPUS}
        return {"cpu": self.cpus, "gpu": self.gpus}

    def total(self) -> tuple[float, float]:
        """(CPUs, GPUs) one running trial occupies."""
        return self.cpus * self.workers, self.gpus * self.workers


@dataclass
class SweepSpec:
    """A validated sweep spec; ``base`` is the nested base config, ``space`` the parameters in file order."""

    path: Path
    name: str
    description: str
    base: dict[str, Any]
    space: list[Param]
    num_samples: int
    search: SearchSpec
    scheduler: SchedulerSpec
    resources: ResourcesSpec
    max_concurrent_trials: int | None
    tracking: TrackingSpec
    max_failures: int
    score_alpha: float
    arch_resources: dict[str, TrialResources]
    arch_overrides: list[ArchOverride]
    arch_params: dict[str, dict[str, Any]]
    """Per architecture, the base values its ``arch_overrides`` rule sets (none: not listed)."""

    @property
    def base_config(self) -> Config:
        return build_config(self.base, source=f"{self.path}: base")

    @property
    def epochs(self) -> int:
        """Epochs per trial (the base config's; ``train.epochs`` cannot be swept with a scheduler)."""
        return self.base_config.train.epochs

    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.space if p.is_grid)

    def num_trials(self) -> int:
        """How many trials the sweep runs (Tune: the grid repeated ``num_samples`` times)."""
        return self.num_samples if self.search.algo == "optuna" else self.grid_size() * self.num_samples

    def param_space(self) -> dict[str, Any]:
        """The Tune ``param_space``: ``{dotted key: domain}``."""
        return {p.key: p.domain() for p in self.space}

    def trials(self) -> list[dict[str, Any]]:
        """The expanded trial table: per trial, each key's value (grid) or distribution (sampled)."""
        grid = [p for p in self.space if p.is_grid]
        sampled = {p.key: p.describe() for p in self.space if not p.is_grid}
        if self.search.algo == "optuna":
            return [self._with_overrides(dict(sampled)) for _ in range(self.num_samples)]
        rows = []
        for _ in range(self.num_samples):
            for combo in itertools.product(*(p.values for p in grid)):
                row = {p.key: value for p, value in zip(grid, combo)}
                rows.append(self._with_overrides({key: row[key] if key in row else sampled[key] for key in self.keys()}))
        return rows

    def keys(self) -> list[str]:
        """The swept keys, in file order."""
        return [p.key for p in self.space]

    def override_keys(self) -> list[str]:
        """The keys ``arch_overrides`` sets for some architecture, in file order."""
        return list(dict.fromkeys(key for rule in self.arch_overrides for key in rule.set))

    def columns(self) -> list[str]:
        """The keys of a :meth:`trials` row: the swept keys, then the overridden ones."""
        return self.keys() + self.override_keys()

    def trial_params(self, config: dict[str, Any]) -> dict[str, Any]:
        """The dotted values a trial applies to ``base``: its architecture's overrides, then ``config``."""
        arch = config.get("model.arch", self.base_config.model.arch)
        return {**self.arch_params.get(arch, {}), **config}

    def _with_overrides(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` plus, per overridden key, the trial's value (its rule's, else the base's)."""
        if not self.arch_overrides:
            return row
        arch = row.get("model.arch", self.base_config.model.arch)
        if str(arch).startswith("~"):  # a sampled architecture: the value is known only per trial
            return {**row, **{key: "by arch" for key in self.override_keys()}}
        params = self.arch_params.get(arch, {})
        tree = self.base_config.model_dump()
        return {**row, **{key: params[key] if key in params else _get_dotted(tree, key) for key in self.override_keys()}}

    def resolved(self) -> dict[str, Any]:
        """The spec as one self-contained mapping (base inlined, catalog queries expanded into
        grids) that :func:`load_spec` reads back into the same sweep; ``--resume`` uses it."""
        return {"name": self.name, "description": self.description, "base": self.base,
                "space": {p.key: {p.kind: list(p.values)} for p in self.space}, "num_samples": self.num_samples,
                "search": self.search.model_dump(), "scheduler": self.scheduler.model_dump(),
                "resources": self.resources.model_dump(exclude_none=True),
                "arch_overrides": [rule.model_dump(exclude_none=True) for rule in self.arch_overrides],
                "max_concurrent_trials": self.max_concurrent_trials,
                "tracking": self.tracking.model_dump(), "max_failures": self.max_failures,
                "score_alpha": self.score_alpha}

    def resources_for(self, arch: str) -> TrialResources:
        """The resources of a trial training ``arch`` (rules applied)."""
        return self.arch_resources[arch]

    def trial_resources(self, config: dict[str, Any]) -> dict[str, float]:
        """Tune ``with_resources`` callback: the trial actor's request for a sampled ``config``."""
        return self.resources_for(config.get("model.arch", self.base_config.model.arch)).tune_request()

    def expected_concurrency(self, cpus: float, gpus: float) -> int:
        """Trials running at once on ``cpus`` / ``gpus``: the tightest of resources, the cap and the count."""
        limits = [self.num_trials()]
        if self.max_concurrent_trials:
            limits.append(self.max_concurrent_trials)
        for res in set(self.arch_resources.values()):
            need_cpu, need_gpu = res.total()
            limits.append(int(cpus // need_cpu) if need_cpu else limits[0])
            if need_gpu:
                limits.append(int(gpus // need_gpu))
        return max(0, min(limits))


def trial_tree(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the sampled dotted ``params`` applied (a new nested dict)."""
    tree = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(tree, key, value)
    return tree


def sanitize_name(name: str) -> str:
    """``name`` made safe as one folder name: runs of characters other than letters, digits, ``_ - .``
    (path separators included) become ``-``, leading and trailing ``-`` and ``.`` go (so no ``..``
    or hidden name is left), at most 128 characters; ``""`` when nothing usable remains."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:128].rstrip("-.")


def check_name(name: str, what: str) -> str:
    """``name`` if it already is a plain folder name (:func:`~lejepa.config.is_plain_name`); else a
    :class:`ConfigError`: a name the user typed is refused, never silently changed into another."""
    if is_plain_name(name):
        return name
    safe = sanitize_name(name)
    raise ConfigError(f"{what} {name!r} is not a plain folder name ({PLAIN_NAME_RULE})"
                      + (f"; e.g. {safe!r}" if safe else ""))


def load_spec(path: str | Path) -> SweepSpec:
    """Read, validate and expand the spec at ``path`` (see the module docstring)."""
    path = Path(path)
    raw = load_yaml(path, "sweep spec")
    try:
        spec = _SpecFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None
    return _build(path, spec)


# --------------------------------------------------------------------------- internals
MAX_TRIALS = 10_000
"""The most trials one spec may expand to (counted, never materialised, before anything else)."""
VALIDATED_COMBINATIONS = 1_000
"""Grid combinations checked together at load (each value is also checked alone): cross-field
rules such as views.local_size ≤ data.resolution."""


def _build(path: Path, spec: _SpecFile) -> SweepSpec:
    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {problem}")

    base = _load_base(path, spec.base, fail)
    if spec.prune_collapsed is not None:
        base = copy.deepcopy(base)
        set_dotted(base, "train.collapse_patience", spec.prune_collapsed)
    name = sanitize_name(spec.name if spec.name is not None else path.stem)
    if not name:
        raise fail("name", f"{spec.name!r} has no usable characters (letters, digits, '_', '-', '.')")
    for section, metric in (("search.metric", spec.search.metric), ("scheduler.metric", spec.scheduler.metric)):
        if metric not in METRICS:
            raise fail(section, f"{metric!r} is not a reported per-epoch metric{did_you_mean(metric, METRICS)}; "
                                f"choose from {', '.join(METRICS)}")
    space = [_param(key, value, fail) for key, value in spec.space.items()]
    if spec.search.algo == "optuna":
        for p in space:
            if p.is_grid:
                raise fail(f"space.{p.key}", "search.algo=optuna cannot take a grid (a list or catalog query): "
                                             "write {choice: [...]} instead")
    if spec.scheduler.type != "none" and any(p.key == "train.epochs" for p in space):
        raise fail("space.train.epochs", "cannot be swept together with a scheduler (its max_t is train.epochs)")
    grid = [p for p in space if p.is_grid]
    trials = math.prod(len(p.values) for p in grid) * (1 if spec.search.algo == "optuna" else spec.num_samples)
    if trials > MAX_TRIALS:
        sizes = " × ".join(f"{len(p.values)} {p.key}" for p in grid)
        samples = f" × {spec.num_samples} samples" if spec.num_samples > 1 else ""
        raise fail("space", f"expands to {trials:,} trials ({sizes}{samples}); "
                            f"the limit is {MAX_TRIALS:,}: sample some keys ({{choice: [...]}}, num_samples) or split the sweep")
    _validate_values(base, space, fail)
    _check_archs(base, space, fail)
    _check_data(base, space, fail)
    lam = next((p for p in space if p.key == "loss.lam"), None)
    if spec.score_alpha > 0 and any(float(v) <= 0 for v in (lam.probes() if lam else [build_config(base).loss.lam])):
        raise fail("space.loss.lam" if lam else "base.loss.lam",
                   f"λ = 0 leaves {SCORE_METRIC} = {EPOCH_LOSS} / λ^α undefined: keep λ > 0 or set score_alpha: 0")
    arch_resources = _arch_resources(base, space, spec.resources, fail)
    arch_params = _arch_params_table(base, space, spec.arch_overrides, fail)
    if spec.tracking.uri is not None and spec.tracking.uri.startswith("file:"):
        raise fail("tracking.uri", "MLflow 3 refuses file: stores; use sqlite:///<absolute path> or http://host:port")
    return SweepSpec(path=path, name=name, description=spec.description, base=base, space=space,
                     num_samples=spec.num_samples, search=spec.search, scheduler=spec.scheduler,
                     resources=spec.resources, max_concurrent_trials=spec.max_concurrent_trials,
                     tracking=spec.tracking, max_failures=spec.max_failures, score_alpha=spec.score_alpha,
                     arch_resources=arch_resources, arch_overrides=spec.arch_overrides, arch_params=arch_params)


def _load_base(path: Path, base: dict[str, Any] | str, fail) -> dict[str, Any]:
    if isinstance(base, str):
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            raise fail("base", f"config file {str(base_path)!r} does not exist")
        base = load_yaml(base_path)
    try:
        build_config(base)
    except ConfigError as exc:
        raise fail("base", str(exc).removeprefix("config: ")) from None
    return base


def _param(key: str, value: Any, fail) -> Param:
    where = f"space.{key}"
    known = valid_keys()
    if key not in known:
        raise fail(where, f"unknown config key{did_you_mean(key, known)}")
    if any(key == k or (k.endswith(".") and key.startswith(k)) for k in SET_BY_SWEEP):
        raise fail(where, "is set by the sweep itself and cannot be swept")
    if isinstance(value, list):
        value = {"grid": value}
    if not isinstance(value, dict) or len(value) != 1:
        raise fail(where, f"expected a list (grid) or one of {{grid, choice, {', '.join(DISTRIBUTIONS)}, catalog}}: "
                          f"[...], got {_short(value)}; a single value belongs in base")
    (kind, args), = value.items()
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
            raise fail(f"{where}.{kind}", f"expected {shape} (numbers), got {_short(args)}")
        args = [_number(a) for a in args]
        if kind in ("randint", "qrandint") and not all(float(a).is_integer() for a in args):
            raise fail(f"{where}.{kind}", f"expected integers, got {_short(args)}")
        if kind in ("randint", "qrandint"):
            args = [int(a) for a in args]
        if not args[0] < args[1]:
            raise fail(f"{where}.{kind}", f"low must be below high, got {_short(args)}")
        if kind == "loguniform" and args[0] <= 0:
            raise fail(f"{where}.{kind}", f"low must be positive for a log scale, got {_short(args[0])}")
        return Param(key, kind, tuple(args))
    options = ["grid", "choice", *DISTRIBUTIONS, "catalog"]
    raise fail(where, f"unknown distribution {kind!r}{did_you_mean(kind, options)}; choose from {', '.join(options)}")


def _catalog_names(query_args: Any, fail) -> list[str]:
    from lejepa.catalog import query

    accepted = [n for n in inspect.signature(query).parameters]
    if not isinstance(query_args, dict):
        raise fail(f"expected a mapping of query fields ({', '.join(accepted)}), got {_short(query_args)}")
    for field in query_args:
        if field not in accepted:
            raise fail(f"unknown query field {field!r}{did_you_mean(field, accepted)}")
    try:
        return [info.name for info in query(**query_args)]
    except LejepaError as exc:
        raise fail(str(exc)) from None


def _validate_values(base: dict[str, Any], space: list[Param], fail) -> None:
    """Every probe value alone, then every grid combination (ranges at their low end), on ``base``."""
    for p in space:
        for value in p.probes():
            _check(base, {p.key: value}, f"space.{p.key}", fail)
    grid = [p for p in space if p.is_grid]
    if len(grid) > 1:
        sampled = {p.key: p.probes()[0] for p in space if not p.is_grid}
        for combo in itertools.islice(itertools.product(*(p.values for p in grid)), VALIDATED_COMBINATIONS):
            _check(base, {**sampled, **{p.key: v for p, v in zip(grid, combo)}}, "space", fail)


def _check(base: dict[str, Any], params: dict[str, Any], where: str, fail) -> None:
    try:
        build_config(trial_tree(base, params))
    except ConfigError as exc:
        raise fail(where, str(exc).removeprefix("config: ")) from None


def _arch_params_table(base: dict[str, Any], space: list[Param], rules: list[ArchOverride], fail
                       ) -> dict[str, dict[str, Any]]:
    """Per architecture of the sweep, the values of its first matching ``arch_overrides`` rule,
    each trial config it yields validated."""
    swept = {p.key for p in space}
    for i, rule in enumerate(rules):
        for key in rule.set:
            where = f"arch_overrides[{i}].set.{key}"
            if key in swept:
                raise fail(where, "is also swept in space: a key is either swept or overridden per architecture")
            if key == "model.arch" or any(key == k or (k.endswith(".") and key.startswith(k)) for k in SET_BY_SWEEP):
                raise fail(where, "is set by the sweep itself and cannot be overridden")
    archs = _sweep_archs(base, space)
    resolution = build_config(base).data.resolution
    table = {}
    for arch in archs:
        for i, rule in enumerate(rules):
            if _matches(rule, arch, resolution, lambda problem, i=i: fail(f"arch_overrides[{i}]", problem)):
                _check(base, {**rule.set, "model.arch": arch}, f"arch_overrides[{i}] ({arch})", fail)
                table[arch] = dict(rule.set)
                break
    return table


def _check_archs(base: dict[str, Any], space: list[Param], fail) -> None:
    """Every architecture the sweep trains exists (``lejepa train``'s pre-flight, run on what the
    spec expands to), so a typo is one line here, not a failure inside every trial."""
    from lejepa.backbones import check_arch_name

    where = "space.model.arch" if any(p.key == "model.arch" for p in space) else "base.model.arch"
    for arch in _sweep_archs(base, space):
        try:
            check_arch_name(arch)
        except LejepaError as exc:
            raise fail(where, str(exc)) from None


DATA_LOCATION_KEYS = ("data.name", "data.root", "data.download")
"""The keys that decide where a trial's dataset files are (``lejepa.data.check_data``)."""


def _check_data(base: dict[str, Any], space: list[Param], fail) -> None:
    """The dataset of every data configuration the sweep trains is there (``lejepa train``'s
    pre-flight, on this machine), so missing files are one line here, not a failure inside every trial."""
    from lejepa.data import check_data

    swept = [p for p in space if p.key in DATA_LOCATION_KEYS]
    for values in itertools.product(*(p.probes() for p in swept)):
        tree = copy.deepcopy(base)
        for p, value in zip(swept, values):
            set_dotted(tree, p.key, value)
        try:
            check_data(build_config(tree).data)
        except LejepaError as exc:
            raise fail(f"space.{swept[0].key}" if swept else "base.data", str(exc)) from None


def _sweep_archs(base: dict[str, Any], space: list[Param]) -> list[str]:
    """The architectures a sweep trains: its ``model.arch`` grid or choice, else the base's one."""
    return next((list(p.values) for p in space if p.key == "model.arch"), None) or [build_config(base).model.arch]


def _get_dotted(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def _arch_resources(base: dict[str, Any], space: list[Param], res: ResourcesSpec, fail) -> dict[str, TrialResources]:
    archs = _sweep_archs(base, space)
    resolution = build_config(base).data.resolution
    table = {}
    for arch in archs:
        cpus, gpus = res.cpus_per_trial, res.gpus_per_trial
        for i, rule in enumerate(res.rules):
            if _matches(rule, arch, resolution, lambda problem, i=i: fail(f"resources.rules[{i}]", problem)):
                cpus = rule.cpus_per_trial if rule.cpus_per_trial is not None else cpus
                gpus = rule.gpus_per_trial if rule.gpus_per_trial is not None else gpus
                break
        if gpus > 1 and not float(gpus).is_integer():
            raise fail("resources", f"{arch}: a trial takes a fraction of one GPU or whole GPUs, got {gpus}")
        table[arch] = TrialResources(cpus, gpus, res.workers_per_trial)
    return table


def _matches(rule: ArchCondition, arch: str, resolution: int, fail) -> bool:
    if rule.pattern is not None and not fnmatch.fnmatch(arch, rule.pattern):
        return False
    if rule.family is not None:
        families = [rule.family] if isinstance(rule.family, str) else rule.family
        if _arch_family(arch) not in families:
            return False
    if rule.max_params is None and rule.min_params is None:
        return True
    from lejepa.catalog import parse_param_budget

    try:
        high = parse_param_budget(rule.max_params) if rule.max_params is not None else math.inf
        low = parse_param_budget(rule.min_params) if rule.min_params is not None else 0
    except LejepaError as exc:
        raise fail(str(exc)) from None
    return low <= _arch_params(arch, resolution) <= high


def _arch_family(arch: str) -> str:
    from lejepa.tracking import arch_family

    return arch_family(arch)


def _arch_params(arch: str, resolution: int) -> int:
    """Parameter count of ``arch``: the catalog's, or counted on a fresh backbone if not catalogued."""
    from lejepa.catalog import get_arch

    try:
        return int(get_arch(arch).params)
    except LejepaError:
        from lejepa.backbones import build_backbone

        return sum(p.numel() for p in build_backbone(arch, resolution, None).parameters())


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


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(exc: ValidationError) -> str:
    """The first validation error as ``key: problem`` (unknown keys get the closest allowed name)."""
    err = exc.errors()[0]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "spec"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        names = [p for p in err["loc"] if not isinstance(p, int)]
        options = list(_SECTIONS.get(names[-2] if len(names) > 1 else "", _SpecFile).model_fields)
        return f"{field}: unknown key{did_you_mean(str(names[-1]), options)}; allowed: {', '.join(options)}"
    value = err.get("input")
    if isinstance(value, dict):
        return f"{field}: {msg}"
    return f"{field}={_short(value)} is invalid: {msg[0].lower() + msg[1:]}"


_SECTIONS: dict[str, type[BaseModel]] = {"search": SearchSpec, "scheduler": SchedulerSpec, "resources": ResourcesSpec,
                                         "rules": ResourceRule, "tracking": TrackingSpec}


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned plain-text columns (floats as %.4g) for the dry run, progress and summary tables."""
    cells = [[_cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else _short(value)
