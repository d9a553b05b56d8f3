"""The sweep spec file's schema: pydantic models, each field declared once.

A spec file is a :class:`SpecFile`. Its fields fall in three groups, and the groups are classes so
that :class:`~sweeps.spec.SweepSpec` inherits the fields it keeps as written:

- :class:`SweepIdentity`: ``name``, ``description`` (the spec's ``name`` is expanded: a missing
  one becomes the file's stem, sanitised);
- :class:`_ExpandedInputs`: ``base`` and ``space`` as written, which :func:`~sweeps.spec.load_spec`
  expands (the base file read, the space parsed into parameters);
- :class:`SweepSettings`: everything a sweep uses exactly as written.

``SpecFile(SweepSettings, _ExpandedInputs)`` lists its fields in file order (pydantic collects a
model's fields from its most basic class to itself): the order of the "allowed:" list in an
unknown-key message and of the resolved spec (:meth:`~sweeps.spec.SweepSpec.resolved`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from lejepa.errors import did_you_mean
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
from lejepa.tables import short

SCORE_METRIC = TRAIN_SCORE
"""The label-free score reported per epoch: ``epoch/loss / λ^α`` (:func:`lejepa.record.label_free_score`)."""

METRICS = (EPOCH_LOSS, EPOCH_INVARIANCE, EPOCH_SIGREG, EPOCH_PROBE_LOSS, ONLINE_TRAIN_ACC, ONLINE_TEST_ACC, SCORE_METRIC)
"""Per-epoch metrics a search or scheduler may optimise."""


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
    """Which architectures a rule applies to: those that match every condition given.

    A rule is written (and dumped) with the keys it sets only: an unset key is absent, not null.
    """

    max_params: int | float | str | None = None
    min_params: int | float | str | None = None
    family: str | list[str] | None = None
    pattern: str | None = None

    def _has_condition(self) -> None:
        if self.max_params is None and self.min_params is None and self.family is None and self.pattern is None:
            raise ValueError("a rule needs a condition: max_params, min_params, family or pattern")

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


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


class SlurmSpec(_Section):
    """The SLURM job of ``lejepa sweep --slurm`` (:mod:`sweeps.slurm`); command-line options win."""

    nodes: int = Field(1, ge=1)
    cpus_per_task: int | None = Field(None, ge=1, description="CPUs per node for Ray (default: the partition's)")
    gpus_per_node: int = Field(0, ge=0)
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    sbatch: list[str] = Field([], description="extra sbatch options, one per entry, e.g. --mem=64G")
    setup: list[str] = Field([], description="shell lines the job runs first, e.g. module load cuda")


class SweepIdentity(_Section):
    """What a sweep is called (the file's stem when ``name`` is not given) and what it is for."""

    name: str | None = None
    description: str = ""


class _ExpandedInputs(SweepIdentity):
    """The base config (inline, or a file relative to the spec) and the search space, as written."""

    base: dict[str, Any] | str = {}
    space: dict[str, Any] = {}


class SweepSettings(_Section):
    """The spec's settings a sweep uses exactly as written."""

    num_samples: int = Field(1, ge=1)
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: ResourcesSpec = ResourcesSpec()
    arch_overrides: list[ArchOverride] = []
    max_concurrent_trials: int | None = Field(None, ge=1)
    tracking: TrackingSpec = TrackingSpec()
    max_failures: int = Field(2, ge=-1)
    score_alpha: float = Field(SCORE_ALPHA, ge=0)
    slurm: SlurmSpec = SlurmSpec()


class SpecFile(SweepSettings, _ExpandedInputs):
    """A spec file as written (see :mod:`sweeps.spec`); ``prune_collapsed`` is folded into the base."""

    prune_collapsed: int | None = Field(None, ge=1)


def describe_error(exc: ValidationError) -> str:
    """The first validation error as ``key: problem`` (unknown keys get the closest allowed name)."""
    err = exc.errors()[0]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "spec"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        names = [p for p in err["loc"] if not isinstance(p, int)]
        options = list(_SECTIONS.get(names[-2] if len(names) > 1 else "", SpecFile).model_fields)
        return f"{field}: unknown key{did_you_mean(str(names[-1]), options)}; allowed: {', '.join(options)}"
    value = err.get("input")
    if isinstance(value, dict):
        return f"{field}: {msg}"
    return f"{field}={short(value)} is invalid: {msg[0].lower() + msg[1:]}"


_SECTIONS: dict[str, type[BaseModel]] = {
    "search": SearchSpec,
    "scheduler": SchedulerSpec,
    "resources": ResourcesSpec,
    "rules": ResourceRule,
    "tracking": TrackingSpec,
}
