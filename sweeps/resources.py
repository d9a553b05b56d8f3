"""What a trial asks Ray for: per architecture, the spec's ``resources`` with the first matching
``resources.rules`` entry applied; a multi-worker trial's actor is only its Ray Train driver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lejepa.config import build_config
from sweeps.archs import matches, sweep_archs
from sweeps.schema import ResourcesSpec
from sweeps.space import Param

DRIVER_CPUS = 0.01
"""CPUs of a multi-worker trial's driver: it only launches and watches its Ray Train workers."""


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


def resources_table(base: dict[str, Any], space: list[Param], res: ResourcesSpec, fail) -> dict[str, TrialResources]:
    """Per architecture of the sweep, the resources of one of its trials (rules applied)."""
    archs = sweep_archs(base, space)
    resolution = build_config(base).data.resolution
    table = {}
    for arch in archs:
        cpus, gpus = res.cpus_per_trial, res.gpus_per_trial
        for i, rule in enumerate(res.rules):
            if matches(rule, arch, resolution, lambda problem, i=i: fail(f"resources.rules[{i}]", problem)):
                cpus = rule.cpus_per_trial if rule.cpus_per_trial is not None else cpus
                gpus = rule.gpus_per_trial if rule.gpus_per_trial is not None else gpus
                break
        if gpus > 1 and not float(gpus).is_integer():
            raise fail("resources", f"{arch}: a trial takes a fraction of one GPU or whole GPUs, got {gpus}")
        table[arch] = TrialResources(cpus, gpus, res.workers_per_trial)
    return table
