"""Generate the architecture catalog from timm: ``python -m lejepa.catalog.build``.

Selection (:func:`select`): for each family, the timm names matching its globs (in its timm
modules), minus ported/test/resolution duplicates, whose default timm build has at most
``PARAM_BUDGET`` parameters (the paper's ImageNet-10 sweep: every timm model under 20 M), plus
the ``REFERENCE`` names above that budget (ResNet-50, ViT-S, Swin-T, …) and the paper's
headline large models.

Description (:func:`describe`): each name is built by :func:`lejepa.backbones.build_backbone`
at ``SMALL_RESOLUTION`` px on the meta device (no memory) to read its parameters, embedding
width, minimum/fixed input and stem. Backbones over ``GPU_SCALE_PARAMS`` are GPU-scale.

Walk (:func:`check`): every entry runs one LeJEPA training step (:func:`make_step`: B=4, 2
global + 2 local views, forward, loss, backward, AdamW step, finite loss) on the CPU, GPU-scale
ones on the meta device (shapes only); a failure is recorded (``runs_small=false`` + the
error), never dropped. The same step is what ``tests/test_catalog.py`` and
``benchmarks/architectures.py`` run.

Registry snapshot (:func:`write_timm_names`): every name of timm's registry, so that
:func:`lejepa.catalog.check_arch_name` answers without importing timm.

The stability walk's outcome columns (``walk_*`` from ``benchmarks/stability.py
--update-catalog``, ``gpu_walk_*`` from ``benchmarks/stability_direct.py --update-catalog``) are
carried over by a rebuild.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import sys
import time
from collections.abc import Callable

import timm
import torch

from lejepa.backbones import build_backbone
from lejepa.catalog import CATALOG_CSV, COLUMNS, SMALL_RESOLUTION, TIMM_NAMES, ArchInfo, format_params, load_catalog
from lejepa.config import LossConfig, ModelConfig
from lejepa.errors import ArchitectureError, first_line
from lejepa.model import LeJEPAModel
from lejepa.objective import lejepa_loss
from lejepa.sigreg import SIGReg, epps_pulley

PARAM_BUDGET = 20_000_000
"""Default-build parameter budget for the per-family sweep (the paper's < 20 M)."""

GPU_SCALE_PARAMS = 50_000_000
"""Backbones above this are GPU-scale: described and meta-checked, not trained on the CPU walk."""

SLOW_STEP_S = 5.0
"""A CPU walk step slower than this (B=4, 2+2 views) is noted as slow."""
WALK_COLUMNS = ("walk_outcome", "walk_gain", "gpu_walk_outcome", "gpu_walk_gain")
"""Measured, not built: kept from the current catalog by a rebuild."""

FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # family: (timm modules, name globs)
    "resnet": (("resnet", "sknet"), ("resnet*", "seresnet*", "ecaresnet*", "skresnet*")),
    "resnext": (("resnet",), ("resnext*", "seresnext*", "ecaresnext*")),
    "convnext": (("convnext",), ("convnext_*",)),
    "convnextv2": (("convnext",), ("convnextv2_*",)),
    "efficientnet": (("efficientnet",), ("efficientnet_b?", "efficientnet_lite?", "efficientnet_e?", "efficientnetv2_*")),
    "mobilenet": (("efficientnet", "mobilenetv3"), ("mobilenetv2_*", "mobilenetv3_*", "mobilenetv4_*")),
    "regnet": (("regnet",), ("regnetx_*", "regnety_*")),
    "maxvit": (("maxxvit",), ("maxvit_*", "maxxvit_*")),
    "levit": (("levit",), ("levit_*",)),
    "inception_next": (("inception_next",), ("inception_next_*",)),
    "vit": (("vision_transformer",), ("vit_*",)),
    "deit": (("deit",), ("deit_*",)),
    "swin": (("swin_transformer", "swin_transformer_v2"), ("swin_*", "swinv2_*")),
    "efficientformer": (("efficientformer", "efficientformer_v2"), ("efficientformer*",)),
    "ghostnet": (("ghostnet",), ("ghostnet_*", "ghostnetv2_*")),
    "tiny_vit": (("tiny_vit",), ("tiny_vit_*",)),
}

EXCLUDE = (
    "test_*",
    "tf_*",  # unit-test stubs, TF-padding ports of the same nets
    "*_384",
    "*_336",
    "*_448",
    "*_512",
    "*_240",  # the same net at another pretraining resolution
    "*_gn",
    "*_aa_*",
    "*_blur_*",
    "*_rw",
    "*_sgn",
    "*_tv",  # norm/anti-alias/port variants of a listed net
)

REFERENCE = (
    "resnet50",
    "resnext50_32x4d",
    "inception_next_tiny",
    "vit_small_patch16_224",
    "deit_small_patch16_224",
    "swin_tiny_patch4_window7_224",
    "swinv2_tiny_window8_256",
)
"""Common reference models above the budget, still trained in the CPU walk."""

HEADLINE = ("vit_base_patch16_224", "vit_large_patch14_224", "vit_huge_patch14_224", "convnextv2_huge")
"""The paper's large models (ViT-B/L/H, ConvNeXtV2-H): GPU-scale, meta-checked only."""


def default_params(name: str) -> int:
    """Parameters of timm's default ``num_classes=0`` build of ``name`` (meta device)."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    return sum(p.numel() for p in model.parameters())


def select(families: list[str] | None = None) -> list[tuple[str, str]]:
    """(name, family) of every catalog architecture (of ``families`` only, if given), family by
    family in ``FAMILIES`` order."""
    chosen: list[tuple[str, str]] = []
    extra = set(REFERENCE) | set(HEADLINE)
    for family, (modules, globs) in FAMILIES.items():
        if families is not None and family not in families:
            continue
        names = sorted({n for m in modules for n in timm.list_models(list(globs), module=m)})
        for name in names:
            if any(fnmatch.fnmatchcase(name, x) for x in EXCLUDE) and name not in extra:
                continue
            if name in extra or default_params(name) <= PARAM_BUDGET:
                chosen.append((name, family))
    missing = extra - {n for n, _ in chosen}
    if missing and families is None:
        raise RuntimeError(f"reference/headline names outside every family: {sorted(missing)}")
    return chosen


def describe(name: str, family: str) -> ArchInfo:
    """The catalog entry of ``name`` as built at ``SMALL_RESOLUTION`` px (meta device;
    ``runs_small`` is left False until :func:`check` runs)."""
    backbone = build_backbone(name, SMALL_RESOLUTION, device="meta")
    params = sum(p.numel() for p in backbone.parameters())
    gpu_scale = params > GPU_SCALE_PARAMS
    notes = [backbone.adaptation] if backbone.adaptation else []
    if name in REFERENCE:
        notes.append(f"reference model above the {format_params(PARAM_BUDGET)} budget")
    if gpu_scale:
        notes.append("GPU-scale: step checked on the meta device (shapes only)")
    return ArchInfo(
        name,
        family,
        params,
        backbone.embed_dim,
        backbone.min_input,
        backbone.fixed_input,
        backbone.small_stem,
        gpu_scale,
        False,
        "; ".join(notes),
    )


def describe_default(name: str, family: str) -> ArchInfo:
    """The entry of an arch :func:`describe` cannot adapt: timm's default build at its native side."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    native = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])  # type: ignore[union-attr, operator]  # timm sets it
    params = sum(p.numel() for p in model.parameters())
    num_features = int(model.num_features)  # type: ignore[arg-type]  # a timm model's int attribute
    return ArchInfo(name, family, params, num_features, native, None, False, params > GPU_SCALE_PARAMS, False)


def make_step(
    arch: str,
    resolution: int = SMALL_RESOLUTION,
    batch: int = 4,
    global_views: int = 2,
    local_views: int = 2,
    device: str = "cpu",
    seed: int = 0,
) -> Callable[[], torch.Tensor]:
    """A function running one LeJEPA training step of ``arch`` on fixed random views.

    Backbone from :func:`build_backbone`, the default projector and SIGReg of
    :mod:`lejepa.config`, AdamW; local views at the paper's 96/224 of ``resolution``. Each call
    does forward, loss, backward and an optimiser step and returns the detached loss. On
    ``device="meta"`` everything is shapes only (the Epps–Pulley statistic on fixed directions).
    """
    torch.manual_seed(seed)
    mcfg, lcfg = ModelConfig(), LossConfig()
    model = LeJEPAModel(build_backbone(arch, resolution, device=device), mcfg.proj_hidden, mcfg.proj_dim, mcfg.proj_layers).to(
        device
    )
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sigreg: Callable[[torch.Tensor], torch.Tensor] = SIGReg(lcfg.num_slices, lcfg.knots, lcfg.t_max).to(device)
    if device == "meta":  # SIGReg's step counter and autocast guard need a real device: same statistic, fixed directions
        directions = torch.empty(mcfg.proj_dim, lcfg.num_slices, device=device)
        sigreg = lambda z: epps_pulley(z @ directions, lcfg.t_max, lcfg.knots).mean()  # noqa: E731
    local = max(4, round(resolution * 96 / 224))
    views = [torch.rand(batch, 3, resolution, resolution, device=device) for _ in range(global_views)]
    views += [torch.rand(batch, 3, local, local, device=device) for _ in range(local_views)]

    def step() -> torch.Tensor:
        optimiser.zero_grad(set_to_none=True)
        _, proj = model(views)
        loss = lejepa_loss(proj, global_views, sigreg, lcfg.lam).loss
        loss.backward()
        optimiser.step()
        return loss.detach()

    return step


def check(info: ArchInfo) -> tuple[bool, float, str]:
    """(runs, seconds of the step itself, problem) for one walk step of ``info`` (meta device
    if GPU-scale)."""
    start = time.perf_counter()
    try:
        step = make_step(info.name, device="meta" if info.gpu_scale else "cpu")
        start = time.perf_counter()
        loss = step()
        if not info.gpu_scale and not torch.isfinite(loss):
            return False, time.perf_counter() - start, f"non-finite loss {loss.item()}"
    except Exception as exc:  # recorded in the catalog, not raised
        return False, time.perf_counter() - start, f"{type(exc).__name__}: {first_line(exc)}"[:160]
    return True, time.perf_counter() - start, ""


def build(log: Callable[[str], None] = print) -> list[ArchInfo]:
    """Select, describe and walk the catalog, in catalog order: family by family, then by
    parameters. The stability walk's outcomes (``walk_*``) of the current catalog are kept."""
    walked = {a.name: a for a in load_catalog()} if CATALOG_CSV.is_file() else {}
    entries = []
    for name, family in select():
        try:
            info = describe(name, family)
        except ArchitectureError as exc:  # no input side works: marked, not dropped
            info, (runs, seconds, problem) = describe_default(name, family), (False, 0.0, str(exc))
        else:
            runs, seconds, problem = check(info)
        notes = [info.notes] if info.notes else []
        if problem:
            notes.append(f"does not run small: {problem}")
        elif not info.gpu_scale and seconds > SLOW_STEP_S:
            notes.append(f"slow on CPU (~{seconds:.0f} s per B=4 step)")
        outcome = {k: getattr(walked[name], k) for k in WALK_COLUMNS} if name in walked else {}
        entries.append(ArchInfo(**{**vars(info), "runs_small": runs, "notes": "; ".join(notes), **outcome}))
        log(f"{name:40s} {family:15s} {format_params(info.params):>7s} {'ok' if runs else 'FAIL':4s} {seconds:6.1f}s {problem}")
    family_rank = {f: i for i, f in enumerate(FAMILIES)}
    return sorted(entries, key=lambda e: (family_rank[e.family], e.params, e.name))


def write_csv(entries: list[ArchInfo], path=CATALOG_CSV) -> None:
    """Write ``entries`` as the catalog CSV."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(e.to_row() for e in entries)


def write_timm_names(path=TIMM_NAMES) -> int:
    """Write the installed timm's ``list_models()`` to ``path`` under a ``# timm <version>`` line; the count."""
    names = timm.list_models()
    path.write_text("\n".join([f"# timm {timm.__version__}", *names]) + "\n")
    return len(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(CATALOG_CSV), help="CSV to write (default: the packaged catalog)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--timm-names", action="store_true", help=f"only rewrite {TIMM_NAMES.name} (timm's registry)")
    args = parser.parse_args(argv)
    count = write_timm_names()
    print(f"{count} timm names (timm {timm.__version__}) -> {TIMM_NAMES}")
    if args.timm_names:
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    entries = build(log=lambda line: print(line, flush=True))
    write_csv(entries, args.out)
    failed = [e.name for e in entries if not e.runs_small]
    print(
        f"{len(entries)} architectures, {len({e.family for e in entries})} families, "
        f"{len(failed)} not runnable small {failed}, {time.perf_counter() - start:.0f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
