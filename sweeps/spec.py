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
    slurm: {nodes: 2, gpus_per_node: 4, time: "12:00:00", partition: gpu, sbatch: [--mem=64G]}  # for --slurm

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

This module holds :class:`SweepSpec` and :func:`load_spec`; the file's schema is
:mod:`sweeps.schema`, the search space :mod:`sweeps.space`, the per-architecture rules
:mod:`sweeps.archs` and :mod:`sweeps.resources`, sweep names :mod:`sweeps.names`.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lejepa.config import Config, build_config, load_yaml, set_dotted
from lejepa.errors import ConfigError, did_you_mean
from lejepa.record import EPOCH_LOSS
from lejepa.tables import format_table
from sweeps.archs import check_archs, overrides_table
from sweeps.names import check_name, sanitize_name
from sweeps.resources import DRIVER_CPUS, TrialResources, resources_table
from sweeps.schema import (
    METRICS,
    SCORE_METRIC,
    ArchCondition,
    ArchOverride,
    ResourceRule,
    ResourcesSpec,
    SchedulerSpec,
    SearchSpec,
    SpecFile,
    SweepIdentity,
    SweepSettings,
    TrackingSpec,
    describe_error,
)
from sweeps.space import (
    DATA_LOCATION_KEYS,
    DISTRIBUTIONS,
    MAX_TRIALS,
    SET_BY_SWEEP,
    VALIDATED_COMBINATIONS,
    Param,
    check_data,
    check_expansion,
    get_dotted,
    parse_param,
    trial_tree,
    validate_values,
)
from sweeps.space import grid_size as space_grid_size

__all__ = [  # SweepSpec and load_spec, and the names this module offered before they moved to the modules above
    "DATA_LOCATION_KEYS",
    "DISTRIBUTIONS",
    "DRIVER_CPUS",
    "MAX_TRIALS",
    "METRICS",
    "SCORE_METRIC",
    "SET_BY_SWEEP",
    "VALIDATED_COMBINATIONS",
    "ArchCondition",
    "ArchOverride",
    "Param",
    "ResourceRule",
    "ResourcesSpec",
    "SchedulerSpec",
    "SearchSpec",
    "SweepSpec",
    "TrackingSpec",
    "TrialResources",
    "check_name",
    "format_table",
    "load_spec",
    "sanitize_name",
    "trial_tree",
]


class SweepSpec(SweepSettings, SweepIdentity):
    """A validated sweep spec: the file's settings as written (:class:`~sweeps.schema.SweepSettings`,
    ``description``), plus what :func:`load_spec` expanded: ``name`` (the file's stem when not given,
    sanitised), ``base`` the nested base config, ``space`` the parameters in file order, and per
    architecture its resources and ``arch_overrides`` values."""

    path: Path
    name: str
    base: dict[str, Any]
    space: list[Param]
    arch_resources: dict[str, TrialResources]
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
        return space_grid_size(self.space)

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
        return {**row, **{key: params[key] if key in params else get_dotted(tree, key) for key in self.override_keys()}}

    def resolved(self) -> dict[str, Any]:
        """The spec as one self-contained mapping (base inlined, catalog queries expanded into
        grids) that :func:`load_spec` reads back into the same sweep; ``--resume`` uses it.

        The spec file's fields in file order: the settings as written, the expanded ones
        (``prune_collapsed`` is already in ``base``)."""
        written = {
            **self.model_dump(include=set(SpecFile.model_fields) - {"base", "space"}),
            "base": self.base,
            "space": {p.key: {p.kind: list(p.values)} for p in self.space},
        }
        return {key: written[key] for key in SpecFile.model_fields if key in written}

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


def load_spec(path: str | Path) -> SweepSpec:
    """Read, validate and expand the spec at ``path`` (see the module docstring)."""
    path = Path(path)
    raw = load_yaml(path, "sweep spec")
    try:
        spec = SpecFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_error(exc)}") from None
    return _build(path, spec)


# --------------------------------------------------------------------------- internals
def _build(path: Path, spec: SpecFile) -> SweepSpec:
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
            raise fail(
                section,
                f"{metric!r} is not a reported per-epoch metric{did_you_mean(metric, METRICS)}; choose from {', '.join(METRICS)}",
            )
    space = [parse_param(key, value, fail) for key, value in spec.space.items()]
    check_expansion(spec, space, fail)
    validate_values(base, space, fail)
    check_archs(base, space, fail)
    check_data(base, space, fail)
    lam = next((p for p in space if p.key == "loss.lam"), None)
    if spec.score_alpha > 0 and any(float(v) <= 0 for v in (lam.probes() if lam else [build_config(base).loss.lam])):
        raise fail(
            "space.loss.lam" if lam else "base.loss.lam",
            f"λ = 0 leaves {SCORE_METRIC} = {EPOCH_LOSS} / λ^α undefined: keep λ > 0 or set score_alpha: 0",
        )
    arch_resources = resources_table(base, space, spec.resources, fail)
    arch_params = overrides_table(base, space, spec.arch_overrides, fail)
    if spec.tracking.uri is not None and spec.tracking.uri.startswith("file:"):
        raise fail("tracking.uri", "MLflow 3 refuses file: stores; use sqlite:///<absolute path> or http://host:port")
    expanded: dict[str, Any] = {
        "path": path,
        "name": name,
        "base": base,
        "space": space,
        "arch_resources": arch_resources,
        "arch_params": arch_params,
    }
    as_written = {key: getattr(spec, key) for key in SweepSpec.model_fields if key not in expanded}
    return SweepSpec(**as_written, **expanded)


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
