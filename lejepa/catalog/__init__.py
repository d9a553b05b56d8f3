"""The architecture catalog: which timm architectures this platform builds and trains, and their cost.

The catalog is a CSV generated from timm by ``python -m lejepa.catalog.build`` (never hand-edited):
every timm model under 20 M parameters in the chosen families (the paper's ImageNet-10 sweep
idea), a few reference models above that budget, and the paper's headline large models marked
GPU-scale. Each row is an :class:`ArchInfo`, measured on the backbone as
:func:`lejepa.backbones.build_backbone` builds it at :data:`SMALL_RESOLUTION` px.

``query`` selects entries by family, parameter budget and name pattern (``lejepa archs`` and
sweep specs' ``{catalog: {...}}`` use it); unknown names and empty selections raise one-line
:class:`~lejepa.errors.ArchitectureError`. :func:`check_arch_name` tells whether timm has an
architecture, from a snapshot of timm's registry when it matches the installed timm.
"""

from __future__ import annotations

import csv
import fnmatch
import re
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from lejepa import tables
from lejepa.errors import ArchitectureError, ConfigError, closest, did_you_mean

CATALOG_CSV = Path(__file__).with_name("architectures.csv")
TIMM_NAMES = Path(__file__).with_name("timm_models.txt")
"""``timm.list_models()`` of the timm version named on its first line (``# timm <version>``), one
name per line, written by ``python -m lejepa.catalog.build`` (``--timm-names`` alone: seconds)."""
SMALL_RESOLUTION = 32
"""The small default resolution every catalog entry is measured and walked at."""


@dataclass(frozen=True)
class ArchInfo:
    """One catalog row.

    ``params``/``embed_dim``: of the backbone at ``SMALL_RESOLUTION`` px (after the small-input
    adaptation where it applies: ``model.small_stem=null``; a CNN keeps every parameter, a
    class-token ViT trades its class token for a register token and LayerScale).
    ``min_input``: smallest input side it runs at (smaller views are upsampled to it).
    ``fixed_input``: the one side it runs at (every view is resized to it), or None.
    ``small_stem``: the family's small-input adaptation applies (the stem down-samples 2× less,
    strided 1×1 shortcuts are average-pooled, EfficientNet SE gates start open, a class-token ViT
    is built without its class token; :mod:`lejepa.backbones`): with
    ``model.small_stem=true``, or ``null`` below 64 px (the config default ``false`` keeps timm's stem).
    ``gpu_scale``: too large to train on a CPU; checked on the meta device only.
    ``runs_small``: builds and runs a LeJEPA training step at ``SMALL_RESOLUTION`` px (or its
    minimum); False marks an entry that does not (``notes`` says why).
    ``walk_outcome``/``walk_gain``: the measured outcome of the stability walk
    (``benchmarks/stability.py``: λ = 0.05, a short budget on fashion-mnist-shifted at
    ``SMALL_RESOLUTION`` px): ``learns``, ``no gain``, or the health verdict of a run that went
    wrong; the frozen-probe gain over the arch's own random init. Empty where not walked.
    ``gpu_walk_outcome``/``gpu_walk_gain``: the same at the GPU budget (195 steps of batch 256,
    ``benchmarks/stability_direct.py --update-catalog``).
    """

    name: str
    family: str
    params: int
    embed_dim: int
    min_input: int
    fixed_input: int | None
    small_stem: bool
    gpu_scale: bool
    runs_small: bool
    notes: str = ""
    walk_outcome: str = ""
    walk_gain: float | None = None
    gpu_walk_outcome: str = ""
    gpu_walk_gain: float | None = None

    def to_row(self) -> dict[str, str]:
        """The CSV row (booleans as true/false, None as empty)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        return out

    @classmethod
    def from_row(cls, row: dict[str, str]) -> ArchInfo:
        """Parse one CSV row written by :meth:`to_row`."""
        return cls(
            name=row["name"],
            family=row["family"],
            params=int(row["params"]),
            embed_dim=int(row["embed_dim"]),
            min_input=int(row["min_input"]),
            fixed_input=int(row["fixed_input"]) if row["fixed_input"] else None,
            small_stem=row["small_stem"] == "true",
            gpu_scale=row["gpu_scale"] == "true",
            runs_small=row["runs_small"] == "true",
            notes=row["notes"],
            walk_outcome=row.get("walk_outcome") or "",
            walk_gain=float(row["walk_gain"]) if row.get("walk_gain") else None,
            gpu_walk_outcome=row.get("gpu_walk_outcome") or "",
            gpu_walk_gain=float(row["gpu_walk_gain"]) if row.get("gpu_walk_gain") else None,
        )


COLUMNS = [f.name for f in fields(ArchInfo)]


@lru_cache(maxsize=1)
def _cached() -> tuple[ArchInfo, ...]:
    with CATALOG_CSV.open(newline="") as fh:
        return tuple(ArchInfo.from_row(row) for row in csv.DictReader(fh))


def load_catalog() -> list[ArchInfo]:
    """Every catalog entry, in catalog order (family, then parameters)."""
    return list(_cached())


@lru_cache(maxsize=1)
def _snapshot_names() -> frozenset[str]:
    """The names of :data:`TIMM_NAMES` if the installed timm wrote it, else none."""
    try:
        header, *names = TIMM_NAMES.read_text().splitlines()
        installed = metadata.version("timm")
    except (OSError, ValueError, metadata.PackageNotFoundError):
        return frozenset()
    return frozenset(names) if header == f"# timm {installed}" else frozenset()


def check_arch_name(arch: str) -> None:
    """Raise a one-line :class:`ArchitectureError` with the closest catalog and timm names if timm
    has no architecture ``arch``. A name in :data:`TIMM_NAMES` is answered without importing timm
    (which imports torchvision and ``torch._dynamo``: 3-4 CPU-seconds per process, which a sweep's
    pre-flight and a bad spec's one-line error would otherwise pay)."""
    if arch in _snapshot_names():
        return
    import timm

    if timm.is_model(arch):
        return
    catalog = [a.name for a in _cached()]
    hints = closest(arch, catalog) + [n for n in closest(arch, timm.list_models()) if n not in catalog]
    hint = f"; closest: {', '.join(hints[:5])}" if hints else ""
    raise ArchitectureError(f"unknown architecture {arch!r}{hint} (see `lejepa archs`)")


def families() -> list[str]:
    """The catalog's family names, in catalog order."""
    return list(dict.fromkeys(a.family for a in _cached()))


def get_arch(name: str) -> ArchInfo:
    """The entry called ``name``; :class:`ArchitectureError` naming the closest entries if none."""
    for info in _cached():
        if info.name == name:
            return info
    raise ArchitectureError(f"{name!r} is not in the architecture catalog{did_you_mean(name, [a.name for a in _cached()])}")


_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([kmgb]?)\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_param_budget(budget: int | float | str) -> int:
    """A parameter count from ``20M``, ``1.5M``, ``300k``, ``1G``/``1B``, ``2e7`` or an int."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise ConfigError(f"parameter budget {budget!r} is not a number like 20M, 1.5M or 300k")
    if isinstance(budget, (int, float)):
        value = float(budget)
    else:
        match = _BUDGET.match(budget)
        if not match:
            raise ConfigError(f"parameter budget {budget!r} is not a number like 20M, 1.5M or 300k")
        number, exponent, suffix = match.groups()
        value = float(number) * 10 ** int(exponent or 0) * _SCALE[suffix.lower()]
    if value < 0:
        raise ConfigError(f"parameter budget {budget!r} is negative")
    return int(round(value))


def query(
    family: str | list[str] | None = None,
    max_params: int | str | None = None,
    min_params: int | str | None = None,
    pattern: str | None = None,
    names: list[str] | None = None,
    exclude: list[str] | None = None,
    include_gpu_scale: bool = False,
    runnable_only: bool = True,
    order: str = "catalog",
) -> list[ArchInfo]:
    """Catalog entries matching every given criterion, in catalog order.

    ``family``: one name or a list (case-insensitive); ``max_params``/``min_params``: inclusive
    budgets (``"20M"``); ``pattern``: an fnmatch glob on the name (``"resnet*"``); ``names``:
    exact names; ``exclude``: exact names to leave out (e.g. those a walk already trained).
    GPU-scale entries and entries that do not run small are left out unless asked for.
    ``order``: ``catalog``, or ``round-robin`` (one entry of each family in turn, each
    family smallest first), so that every prefix of a long walk covers every family. Unknown
    families/names/orders and an empty result raise :class:`ArchitectureError`.
    """
    if order not in ORDERS:
        raise ArchitectureError(f"unknown order {order!r}{did_you_mean(order, list(ORDERS))}; orders: {', '.join(ORDERS)}")
    entries = list(_cached())
    asked: list[str] = []
    if family is not None:
        wanted = [str(f).lower() for f in ([family] if isinstance(family, str) else family)]
        known = families()
        for f in wanted:
            if f not in known:
                raise ArchitectureError(
                    f"unknown architecture family {f!r}{did_you_mean(f, known)}; families: {', '.join(known)}"
                )
        entries = [a for a in entries if a.family in wanted]
        asked.append(f"family={','.join(wanted)}")
    if max_params is not None:
        high = parse_param_budget(max_params)
        entries = [a for a in entries if a.params <= high]
        asked.append(f"max_params={max_params}")
    if min_params is not None:
        low = parse_param_budget(min_params)
        entries = [a for a in entries if a.params >= low]
        asked.append(f"min_params={min_params}")
    if pattern is not None:
        entries = [a for a in entries if fnmatch.fnmatchcase(a.name, pattern)]
        asked.append(f"pattern={pattern!r}")
    if names is not None:
        for name in names:
            get_arch(name)
        entries = [a for a in entries if a.name in set(names)]
        asked.append(f"names={','.join(names)}")
    if exclude is not None:
        for name in exclude:
            get_arch(name)
        entries = [a for a in entries if a.name not in set(exclude)]
        asked.append(f"exclude={','.join(exclude)}")
    if not include_gpu_scale:
        entries = [a for a in entries if not a.gpu_scale]
    if runnable_only:
        entries = [a for a in entries if a.runs_small]
    if not entries:
        what = " ".join(asked) or "the catalog"
        hidden = "" if include_gpu_scale and not runnable_only else " (GPU-scale and not-runnable-small entries excluded)"
        raise ArchitectureError(f"no catalog architecture matches {what}{hidden}")
    return round_robin(entries) if order == "round-robin" else entries


ORDERS = ("catalog", "round-robin")
"""Orders :func:`query` returns entries in."""


def round_robin(entries: list[ArchInfo]) -> list[ArchInfo]:
    """The smallest entry of each family (families in catalog order), then the second, …"""
    by_family: dict[str, list[ArchInfo]] = {}
    for a in entries:
        by_family.setdefault(a.family, []).append(a)
    queues = [sorted(group, key=lambda a: a.params) for group in by_family.values()]
    return [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]


def format_params(n: int) -> str:
    """``11689512`` → ``11.7M``; ``811440`` → ``811k``."""
    if n >= 10**9:
        return f"{n / 10**9:.2f}G"
    if n >= 10**6:
        return f"{n / 10**6:.1f}M"
    return f"{n / 10**3:.0f}k"


def _outcome(outcome: str, gain: float | None) -> str:
    return outcome + (f" {gain:+.2f}" if gain is not None else "")


def format_table(entries: list[ArchInfo]) -> str:
    """A fixed-width text table of ``entries`` (for ``lejepa archs``), with a count line."""
    header = [
        "name",
        "family",
        "params",
        "embed",
        "min_px",
        "fixed_px",
        "small_stem",
        "gpu_scale",
        "runs_small",
        "walk",
        "gpu walk",
        "notes",
    ]
    rows = [
        [
            a.name,
            a.family,
            format_params(a.params),
            str(a.embed_dim),
            str(a.min_input),
            str(a.fixed_input or ""),
            "yes" if a.small_stem else "",
            "yes" if a.gpu_scale else "",
            "yes" if a.runs_small else "NO",
            _outcome(a.walk_outcome, a.walk_gain),
            _outcome(a.gpu_walk_outcome, a.gpu_walk_gain),
            a.notes,
        ]
        for a in entries
    ]
    fams = len({a.family for a in entries})
    count = f"{len(entries)} architecture{'s' * (len(entries) != 1)}, {fams} famil{'y' if fams == 1 else 'ies'}"
    return tables.format_table(header, rows) + "\n" + count
