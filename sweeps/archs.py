"""The architectures a sweep trains and the per-architecture rules that match them: ``arch_overrides``
(base values per architecture) here, ``resources.rules`` in :mod:`sweeps.resources`. A rule matches
an architecture that meets every condition it gives (parameter budget, family, name pattern); the
first matching rule wins."""

from __future__ import annotations

import fnmatch
import math
from typing import Any

from lejepa.config import build_config
from lejepa.errors import LejepaError
from sweeps.schema import ArchCondition, ArchOverride
from sweeps.space import Param, check_trial, is_set_by_sweep


def sweep_archs(base: dict[str, Any], space: list[Param]) -> list[str]:
    """The architectures a sweep trains: its ``model.arch`` grid or choice, else the base's one."""
    return next((list(p.values) for p in space if p.key == "model.arch"), None) or [build_config(base).model.arch]


def check_archs(base: dict[str, Any], space: list[Param], fail) -> None:
    """Every architecture the sweep trains exists (``lejepa train``'s pre-flight, run on what the
    spec expands to), so a typo is one line here, not a failure inside every trial."""
    from lejepa.catalog import check_arch_name

    where = "space.model.arch" if any(p.key == "model.arch" for p in space) else "base.model.arch"
    for arch in sweep_archs(base, space):
        try:
            check_arch_name(arch)
        except LejepaError as exc:
            raise fail(where, str(exc)) from None


def overrides_table(base: dict[str, Any], space: list[Param], rules: list[ArchOverride], fail) -> dict[str, dict[str, Any]]:
    """Per architecture of the sweep, the values of its first matching ``arch_overrides`` rule,
    each trial config it yields validated."""
    swept = {p.key for p in space}
    for i, rule in enumerate(rules):
        for key in rule.set:
            where = f"arch_overrides[{i}].set.{key}"
            if key in swept:
                raise fail(where, "is also swept in space: a key is either swept or overridden per architecture")
            if key == "model.arch" or is_set_by_sweep(key):
                raise fail(where, "is set by the sweep itself and cannot be overridden")
    archs = sweep_archs(base, space)
    resolution = build_config(base).data.resolution
    table = {}
    for arch in archs:
        for i, rule in enumerate(rules):
            if matches(rule, arch, resolution, lambda problem, i=i: fail(f"arch_overrides[{i}]", problem)):
                check_trial(base, {**rule.set, "model.arch": arch}, f"arch_overrides[{i}] ({arch})", fail)
                table[arch] = dict(rule.set)
                break
    return table


def matches(rule: ArchCondition, arch: str, resolution: int, fail) -> bool:
    """Whether ``arch`` (at ``resolution``, for an uncatalogued parameter count) meets every condition of ``rule``."""
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
