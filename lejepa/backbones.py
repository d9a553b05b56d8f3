"""Backbones: any timm model as a LeJEPA encoder, adapted to small images.

``build_backbone(arch, resolution, small_stem)`` returns a :class:`Backbone`: a timm model
(``pretrained=False``, ``num_classes=0``) whose forward maps images [B, 3, s, s] to pooled
features [B, embed_dim], for s = ``resolution`` (global views) and smaller s (local views).

The adaptation is decided from the model's class (read from a meta-device build, no weights):

* ViT-like classes that take ``dynamic_img_size`` (ViT, DeiT, EVA, Swin, …) are built with
  ``img_size=resolution`` and ``dynamic_img_size=True`` (plus ``dynamic_img_pad`` where
  offered), so every view size works. Below the arch's native size the patch shrinks so a
  global view stays ``MIN_PATCHES`` patches wide: ViT-S/16 gets 4-px patches at 32 px and
  keeps 16 at 224. Without ``dynamic_img_pad``, sides are rounded up to a patch multiple.
  With ``small_stem`` on, a ViT that pools its class token (ViT, DeiT, CLIP ViT) is built as
  timm's own ``*_reg1_gap_*`` ViTs are (:data:`GAP_VIT`): no class token, one register token,
  average pooling over the patches, LayerScale at 1e-5. Built with a class token, vit_tiny and
  deit_tiny lost labels under LeJEPA at 32 px (random-init probe 0.39 -> 0.19 in 93 steps, and
  0.48 -> 0.21 / 0.26 in 195 steps of batch 256), while the reg1_gap ViTs gained 0.10-0.34;
  vit_tiny built this way gained (0.215 -> 0.349). Average pooling alone, or LayerScale alone,
  did not stop the loss (benchmarks/results/stability/README.md). DeiT-distilled, whose head
  reads its class and distillation tokens, keeps both and gains LayerScale at
  :data:`LAYERSCALE_INIT` in every block. With timm's build (no LayerScale) deit_tiny_distilled
  lost at lr 1e-2 (0.386 -> 0.304) and at 1e-3 (-> 0.332, dimensional collapse); with LayerScale
  it gains at 1e-3 (0.307 -> 0.513) and collapses at 1e-2 (-> 0.256), so the stability walk
  trains DeiT at 1e-3.
* ``small_stem`` (``None`` = on below ``SMALL_STEM_BELOW`` px) turns on each CNN family's
  small-input adaptation (:func:`small_input_changes`). Every parameter is kept; the stem
  down-samples 2× less, so a CNN ends at output stride 16 (a 2×2 last map at 32 px instead of
  1×1, for 4× the compute: the cost of timm's network at twice the side), and the pooled
  feature reads the whole image at initialisation:

  - ResNet and kin: no stem max-pool.
  - ConvNeXt, Inception-NeXt: the 4×4 stride-4 patchify stem at stride 2 (padding 1); the
    overlapping stems' last stride-2 conv at stride 1.
  - RegNet, MobileNet v2–v4, EfficientNet, GhostNet: the 3×3 stride-2 stem conv at stride 1.
  - ResNets whose shortcuts down-sample with strided 1×1 convs (resnet18, resnet26, SE/SK
    variants) and every RegNet: average-pooled shortcuts (ResNet-D: 2×2 average pool, then the
    same 1×1 conv at stride 1; timm's ``avg_down`` / ``downsample="avg"``, same parameters).
    timm zero-initialises the last BatchNorm of each residual branch, so at initialisation
    each block is its shortcut, and a chain of strided 1×1 convs samples one pixel in 2^k: at
    32 px RegNet's pooled feature reads only the top-left stem pixel (random-init probe at
    chance). Turning the zero-init off instead also fixes that, but measured worse: the
    random-init probe rises and LeJEPA then falls below it within 3 epochs.

  - EfficientNets (timm's ``EfficientNet`` class) with sigmoid squeeze-excite gates: every gate
    starts open. Each SE block's expand conv starts at zero weights and bias ``SE_OPEN_BIAS``, so
    its gate is σ(3) = 0.95 for every input and learns from there (the same network, another
    initialisation). With timm's initialisation efficientnet_b0 and b2 did not gain at 32 px
    (0.344 -> 0.343 and 0.292 -> 0.190, seed 0, 93 steps; b2–b4 lost 0.07–0.24 in 195 steps of
    batch 256), nor with a lower lr (b0 at 2e-3: 0.155) or ReLU; without their SE blocks b0
    gained (0.368 -> 0.440), and with open gates b0 and b2 gained (0.343 -> 0.402, 0.253 -> 0.317).
  - MobileNetV3: each residual block starts as its shortcut (its last BatchNorm's scale at 0,
    :func:`zero_init_residuals`, as timm's ResNets start). With timm's initialisation (scale 1)
    5 of 6 MobileNetV3 runs ended in dimensional collapse at 32 px (large_100 0.423 -> 0.343,
    large_075 0.398 -> 0.264; seed 0, 93 steps); started as their shortcuts they are healthy and
    gain (0.425 -> 0.489, 0.376 -> 0.519), except large_150d (0.409 -> 0.422, still collapsed).
  - ConvNeXt-V2 (GRN blocks, no LayerScale): LayerScale at ConvNeXt's own
    :data:`CONVNEXT_LAYERSCALE_INIT` in every block (timm's ``ls_init_value``), so each block
    starts near the identity, as in ConvNeXt V1. With timm's build convnextv2_nano ended in
    dimensional collapse (0.449 -> 0.388, seed 0, 93 steps) and convnextv2_pico stayed at its
    random init (0.464 -> 0.476); with LayerScale both are healthy and gain (0.325 -> 0.456,
    0.334 -> 0.481). Part of that gain is a weaker random init: the trained probes are at
    timm's build's random init, not above it.

  Other archs ignore ``small_stem``, except the ViTs above and MaxxViT and EfficientFormer below.
* Classes that take ``img_size`` but cannot change it at run time (MaxViT, LeViT,
  EfficientFormer, CaiT, …) are built for the smallest side ≥ ``resolution`` they run at, and
  the wrapper resizes every input to that fixed side (``fixed_input``). At 32 px MaxViT's
  partitions (``img_size // 32``) are 1×1, so its block and grid attention each see one token;
  built at 64 px instead (2×2 partitions, about 3× the time) neither maxvit_rmlp_nano nor
  maxxvit_rmlp_nano gained more in 93 steps (+0.014 and −0.156, against +0.034 and −0.135 at 32 px).
  With ``small_stem`` on, a MaxxVit-class model whose config initialises every conv and linear
  from N(0, 0.02) (timm's ``weight_init='normal'``: MaxxViT) is initialised as MaxViT is
  (:data:`VIT_EFF_INIT`: He fan-out normal convs, Xavier-uniform linears). With timm's
  initialisation maxxvit_rmlp_nano lost against its random init at every lr tried (0.534 -> 0.399
  at lr 1e-3, -0.07 to -0.21 from 3e-4 to 1e-2; -0.144 on seed 1); initialised as MaxViT it
  gains (0.533 -> 0.587, 0.593 -> 0.636 on seed 1).
  EfficientFormer (V1) attends over its last stage with a relative-position bias table sized for
  7×7 tokens, so timm's build runs at 224 px only. With ``small_stem`` on, its stem's second
  conv runs at stride 1 (output stride 16, as the CNNs above) and every attention's bias table
  is rebuilt by timm's own ``Attention`` for the last stage's grid at the built side (2×2 at
  32 px; the same network less 45 bias entries per head), so it runs at 32 px, not at 224 px
  (49× the pixels). Built this way efficientformer_l1 gains at lr 3e-3 on three seeds (0.434 ->
  0.529, 0.449 -> 0.577, 0.386 -> 0.587; 93 steps) and loses at 1e-2 (-> 0.376, -> 0.405), so the
  stability walk trains it at 3e-3; on the GPU budget timm's 224-px build lost at 1e-2 (0.624 -> 0.440).
* Every model is probed (meta device, else CPU; eval, batch 1) for the smallest side it runs at
  (``min_input``); smaller inputs are upsampled to it.

Resizing is bilinear ``F.interpolate`` inside :meth:`Backbone.forward`, so callers never need
to know; the catalog records ``min_input`` and ``fixed_input`` per architecture.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lejepa.catalog import check_arch_name
from lejepa.errors import ArchitectureError

SMALL_STEM_BELOW = 64
"""``small_stem=None`` turns the small-input adaptation on below this resolution."""

GAP_VIT: dict[str, Any] = {"class_token": False, "no_embed_class": True, "reg_tokens": 1, "global_pool": "avg"}
"""timm kwargs of the reg1_gap ViT recipe, the small-input adaptation of a class-token ViT
(plus ``init_values=1e-5``, LayerScale, where its blocks have none)."""
SE_OPEN_BIAS = 3.0
"""Bias of a squeeze-excite expand conv whose weights start at zero: every gate starts at σ(3) = 0.95."""
SE_OPEN_NOTE = "squeeze-excite gates start open"
ZERO_INIT_NOTE = "residual blocks start as their shortcut (last BatchNorm scale 0)"
GAP_VIT_NOTE = "no class token: 1 register token, average pooling, LayerScale 1e-5 (timm's reg1_gap ViTs)"
LAYERSCALE_INIT = 1e-5
"""LayerScale's initial value where the small-input adaptation adds it to a ViT (timm's ``init_values``)."""
LAYERSCALE_NOTE = "LayerScale 1e-5"
CONVNEXT_LAYERSCALE_INIT = 1e-6
"""ConvNeXt's LayerScale start (timm's ``ls_init_value`` default), given to ConvNeXt-V2 blocks below 64 px."""
CONVNEXT_LAYERSCALE_NOTE = "LayerScale 1e-6 (ConvNeXt V1's)"
VIT_EFF_INIT: dict[str, Any] = {"weight_init": "vit_eff"}
"""timm kwargs that initialise a MaxxVit-class model as MaxViT is (He fan-out normal convs,
Xavier-uniform linears) instead of from N(0, 0.02) for every conv and linear (``weight_init='normal'``)."""
VIT_EFF_NOTE = "MaxViT's initialisation (timm's weight_init 'vit_eff', not 'normal')"
ATTENTION_GRID_NOTE = "stem's 2nd conv at stride 1, attention bias table for the last stage's grid"

MIN_PATCHES = 8
"""After the ViT patch adaptation a global view is at least this many patches wide."""

PROBE_SIDES = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
"""Input sides tried, smallest first, for an arch's minimum or fixed input size."""


class Backbone(nn.Module):
    """A timm feature extractor: images [B, 3, s, s] → pooled features [B, embed_dim].

    Inputs are resized (bilinear) to ``fixed_input`` when set; otherwise sides below
    ``min_input`` are upsampled to it and sides are rounded up to a multiple of ``multiple``.
    ``adaptation`` describes in words what was changed for small images.
    """

    def __init__(
        self,
        model: nn.Module,
        arch: str,
        embed_dim: int,
        *,
        fixed_input: int | None = None,
        min_input: int = 1,
        multiple: int = 1,
        small_stem: bool = False,
        adaptation: str = "",
    ) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.embed_dim = embed_dim
        self.fixed_input = fixed_input
        self.min_input = min_input
        self.multiple = multiple
        self.small_stem = small_stem
        self.adaptation = adaptation

    def input_side(self, side: int) -> int:
        """The side an input of side ``side`` is resized to before the timm model sees it."""
        if self.fixed_input is not None:
            return self.fixed_input
        return -(-max(side, self.min_input) // self.multiple) * self.multiple

    def forward(self, x: Tensor) -> Tensor:
        side = self.input_side(x.shape[-1])
        if x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        return self.model(x)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, embed_dim={self.embed_dim}, adaptation={self.adaptation!r}"


@dataclass(frozen=True)
class Plan:
    """How an arch is built at one resolution, decided before any weights exist."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    fixed: bool = False
    multiple: int = 1
    notes: tuple[str, ...] = ()
    changes: frozenset[str] = frozenset()
    """The small-input adaptations applied: ``"stem"`` (apply_small_stem), ``"shortcut"``
    (average-pooled shortcuts, in ``kwargs``), ``"se"`` (open_squeeze_excite), ``"gap_vit"``
    (a class-token ViT built as a reg1_gap ViT, in ``kwargs``), ``"layerscale"`` (a DeiT-distilled
    ViT or a ConvNeXt-V2 with LayerScale, in ``kwargs``), ``"init"`` (a MaxxViT initialised as MaxViT, in ``kwargs``),
    ``"zero_init"`` (a MobileNetV3's residual blocks start as their shortcut: :func:`zero_init_residuals`),
    ``"attention_grid"`` (an EfficientFormer's attention bias tables sized for its last stage at
    ``kwargs["img_size"]``: :func:`fit_attention_grid`)."""


def build_backbone(
    arch: str, resolution: int, small_stem: bool | None = None, device: str | torch.device | None = None
) -> Backbone:
    """timm ``arch`` (``pretrained=False``, ``num_classes=0``) adapted to ``resolution`` px.

    ``small_stem``: the small-input adaptation (None = on below 64 px). ``device="meta"``
    builds shapes only (parameter counts without memory). An unknown name, or an arch that
    runs at no input size, raises a one-line :class:`ArchitectureError`.
    """
    check_arch_name(arch)
    plan = make_plan(arch, resolution, small_stem)
    fixed = None
    if plan.fixed:
        plan, fixed = _fit_fixed(arch, plan, resolution)
    for probe_device in ("meta", "cpu"):  # the CPU only for forwards that meta tensors cannot run
        shape_model = _create(arch, plan, probe_device)
        min_input, embed_dim = _min_input(shape_model, fixed or resolution, plan.multiple)
        if min_input is not None:
            break
    else:
        raise ArchitectureError(f"architecture {arch!r} runs at no input side from {PROBE_SIDES[0]} to {PROBE_SIDES[-1]} px")
    notes = list(plan.notes)
    if fixed is not None and min_input == PROBE_SIDES[0]:
        fixed = None  # takes img_size, yet runs from the smallest side up (a plain CNN): not fixed
    if fixed is not None:
        min_input = fixed
        notes.append(f"fixed {fixed} px input (views resized)")
    elif min_input > PROBE_SIDES[0]:
        notes.append(f"views under {min_input} px upsampled")
    if plan.multiple > 1:
        notes.append(f"sides rounded up to a multiple of {plan.multiple}")
    model = _create(arch, plan, device or "cpu")
    return Backbone(
        model,
        arch,
        embed_dim,
        fixed_input=fixed,
        min_input=min_input,
        multiple=plan.multiple,
        small_stem=bool(plan.changes),
        adaptation=", ".join(notes),
    )


def make_plan(arch: str, resolution: int, small_stem: bool | None = None) -> Plan:
    """Decide the timm kwargs and the stem of ``arch`` at ``resolution`` from its class."""
    default = _create(arch, Plan(), "meta")
    params = init_params(type(default))
    if "dynamic_img_size" in params:
        kwargs: dict[str, Any] = {"img_size": resolution, "dynamic_img_size": True}
        notes = ["dynamic input size"]
        patch = _patch_size(default)
        if patch is not None and "patch_size" in params:
            kwargs["patch_size"] = small_patch(patch, resolution, _native_side(default))
            if kwargs["patch_size"] != patch:
                notes.insert(0, f"patch {patch}->{kwargs['patch_size']}")
            patch = kwargs["patch_size"]
        if "dynamic_img_pad" in params:
            kwargs["dynamic_img_pad"] = True
            patch = 1
        changes: frozenset[str] = frozenset()
        if wants_small(resolution, small_stem) and pools_class_token(default):
            changes = frozenset({"gap_vit"})
            kwargs.update(GAP_VIT)
            if not _has_layerscale(default):
                kwargs["init_values"] = LAYERSCALE_INIT
            notes.append(GAP_VIT_NOTE)
        elif wants_small(resolution, small_stem) and is_distilled_vit(default) and not _has_layerscale(default):
            changes = frozenset({"layerscale"})
            kwargs["init_values"] = LAYERSCALE_INIT
            notes.append(LAYERSCALE_NOTE)
        return Plan(kwargs, multiple=patch or 1, notes=tuple(notes), changes=changes)
    if "img_size" in params:
        if wants_small(resolution, small_stem) and normal_init_maxxvit(arch, default):
            return Plan(dict(VIT_EFF_INIT), fixed=True, notes=(VIT_EFF_NOTE,), changes=frozenset({"init"}))
        if wants_small(resolution, small_stem) and isinstance(default, timm.models.efficientformer.EfficientFormer):
            return Plan(fixed=True, notes=(ATTENTION_GRID_NOTE,), changes=frozenset({"stem", "attention_grid"}))
        return Plan(fixed=True)
    notes_by_change = small_input_changes(default) if wants_small(resolution, small_stem) else {}
    kwargs = {}
    if "shortcut" in notes_by_change:
        kwargs = {"downsample": "avg"} if isinstance(default, timm.models.regnet.RegNet) else {"avg_down": True}
    if "layerscale" in notes_by_change:
        kwargs["ls_init_value"] = CONVNEXT_LAYERSCALE_INIT
    return Plan(kwargs, notes=tuple(notes_by_change.values()), changes=frozenset(notes_by_change))


def wants_small(resolution: int, small_stem: bool | None) -> bool:
    """Whether the small-input adaptation applies: ``small_stem``, or below ``SMALL_STEM_BELOW`` px when None."""
    return resolution < SMALL_STEM_BELOW if small_stem is None else small_stem


def is_distilled_vit(model: nn.Module) -> bool:
    """A timm DeiT-distilled ViT (class and distillation tokens, both read by its head)."""
    return isinstance(model, timm.models.deit.VisionTransformerDistilled)


def _has_layerscale(vit: nn.Module) -> bool:
    first_block = next(iter(vit.get_submodule("blocks").children()))
    return not isinstance(getattr(first_block, "ls1", None), nn.Identity)


def pools_class_token(model: nn.Module) -> bool:
    """A plain timm ViT whose feature is its class token (not DeiT-distilled: its head reads two tokens)."""
    vit = timm.models.vision_transformer.VisionTransformer
    return type(model) is vit and model.cls_token is not None and model.global_pool == "token"


def small_patch(patch: int, resolution: int, native: int) -> int:
    """``patch`` at or above the arch's ``native`` side; below it, the largest power of two
    not above ``patch`` that keeps a side of ``resolution`` ``MIN_PATCHES`` patches wide."""
    if resolution >= native:
        return patch
    p = 1
    while p * 2 <= resolution // MIN_PATCHES:
        p *= 2
    return min(patch, p)


def small_input_changes(model: nn.Module) -> dict[str, str]:
    """The small-input adaptation of ``model``'s family, ``{"stem": note, "shortcut": note,
    "se": note, "layerscale": note, "zero_init": note}`` (any may be absent; empty for archs it does
    not apply to). ``model`` is a default build."""
    changes = {}
    if isinstance(model, timm.models.resnet.ResNet):
        changes["stem"] = "no stem max-pool"
    elif _has_4x_stem(model):
        changes["stem"] = "stem stride 2"
    elif _stride2_stem_conv(model) is not None:
        changes["stem"] = "stride-1 stem conv"
    if _conv_shortcuts(model):
        changes["shortcut"] = "average-pooled shortcuts (ResNet-D) instead of strided 1x1 convs"
    if isinstance(model, timm.models.efficientnet.EfficientNet) and _sigmoid_se_expands(model):
        changes["se"] = SE_OPEN_NOTE
    if convnext_without_layerscale(model):
        changes["layerscale"] = CONVNEXT_LAYERSCALE_NOTE
    if isinstance(model, timm.models.mobilenetv3.MobileNetV3) and _residual_last_norms(model):
        changes["zero_init"] = ZERO_INIT_NOTE
    return changes


def _residual_last_norms(model: nn.Module) -> list[nn.Module]:
    """The last BatchNorm of each residual inverted-bottleneck or depthwise-separable block of a
    timm EfficientNet-style model (MobileNetV4's universal blocks are not among them)."""
    blocks = timm.models._efficientnet_blocks
    norms: list[nn.Module] = []
    for block in model.modules():
        if isinstance(block, blocks.InvertedResidual) and block.has_skip:
            norms.append(block.bn3)
        elif isinstance(block, blocks.DepthwiseSeparableConv) and block.has_skip:
            norms.append(block.bn2)
    return norms


def zero_init_residuals(model: nn.Module) -> None:
    """In place, start each residual block's last BatchNorm at scale 0, so the block starts as its
    shortcut (timm's ``zero_init_last`` for ResNets; its MobileNetV3 starts them at 1)."""
    with torch.no_grad():
        for norm in _residual_last_norms(model):
            norm.weight.zero_()  # type: ignore[operator]  # a BatchNorm's weight


def convnext_without_layerscale(model: nn.Module) -> bool:
    """A timm ConvNeXt whose blocks have no LayerScale (ConvNeXt-V2: ``ls_init_value=None``)."""
    if not isinstance(model, timm.models.convnext.ConvNeXt):
        return False
    blocks = [m for m in model.modules() if isinstance(m, timm.models.convnext.ConvNeXtBlock)]
    return bool(blocks) and all(b.gamma is None for b in blocks)


def normal_init_maxxvit(arch: str, model: nn.Module) -> bool:
    """Whether ``model`` (a default build of ``arch``) is a timm MaxxVit-class model whose config
    initialises every conv and linear from N(0, 0.02) (``weight_init='normal'``: MaxxViT, CoAtNeXt)."""
    maxxvit = timm.models.maxxvit
    if not isinstance(model, maxxvit.MaxxVit):
        return False
    cfg = maxxvit.model_cfgs.get(arch) or maxxvit.model_cfgs.get(arch.rsplit("_", 1)[0])  # timm's own lookup
    return cfg is not None and cfg.weight_init == "normal"


def _sigmoid_se_expands(model: nn.Module) -> list[nn.Conv2d]:
    """The expand convs of ``model``'s sigmoid-gated squeeze-excite blocks (timm's EfficientNet
    blocks; hard-sigmoid gates, flat above 3, would never leave an open start)."""
    se = timm.models._efficientnet_blocks.SqueezeExcite
    return [m.conv_expand for m in model.modules() if isinstance(m, se) and isinstance(m.gate, nn.Sigmoid)]


def open_squeeze_excite(model: nn.Module) -> None:
    """In place, start every sigmoid squeeze-excite gate open: expand conv weights 0, bias
    ``SE_OPEN_BIAS`` (gate σ(3) = 0.95 for any input; the gradient still reaches every weight)."""
    with torch.no_grad():
        for conv in _sigmoid_se_expands(model):
            conv.weight.zero_()
            if conv.bias is not None:
                conv.bias.fill_(SE_OPEN_BIAS)


def _has_4x_stem(model: nn.Module) -> bool:
    stem = getattr(model, "stem", None)
    return (
        isinstance(model, (timm.models.convnext.ConvNeXt, timm.models.inception_next.MetaNeXt))
        and isinstance(stem, nn.Sequential)
        and not isinstance(stem[-1], nn.Conv2d)
    )


def _stride2_stem_conv(model: nn.Module) -> nn.Conv2d | None:
    """The 3×3 stride-2 stem conv of RegNet, EfficientNet/MobileNetV2, MobileNetV3/V4 and
    GhostNet builds, else None."""
    families = (
        timm.models.regnet.RegNet,
        timm.models.efficientnet.EfficientNet,
        timm.models.mobilenetv3.MobileNetV3,
        timm.models.ghostnet.GhostNet,
    )
    if not isinstance(model, families):
        return None
    conv = model.stem.conv if isinstance(model, timm.models.regnet.RegNet) else getattr(model, "conv_stem", None)
    if isinstance(conv, nn.Conv2d) and tuple(conv.stride) == (2, 2) and tuple(conv.kernel_size) == (3, 3):
        return conv
    return None


def _conv_shortcuts(model: nn.Module) -> bool:
    """Whether a ResNet's or RegNet's first down-sampling shortcut is a strided 1×1 conv (not
    average-pooled)."""
    if isinstance(model, timm.models.resnet.ResNet):
        down = getattr(model.get_submodule("layer2.0"), "downsample", None)
    elif isinstance(model, timm.models.regnet.RegNet):
        down = getattr(model.get_submodule("s2.b1"), "downsample", None)
    else:
        return False
    convs = [m for m in down.modules() if isinstance(m, nn.Conv2d)] if down is not None else []
    return len(convs) == 1 and tuple(convs[0].stride) == (2, 2) and tuple(convs[0].kernel_size) == (1, 1)


def apply_small_stem(model: nn.Module) -> None:
    """In place, halve the stem's down-sampling, keeping every parameter: a ResNet drops its
    stem max-pool; a ConvNeXt / Inception-NeXt 4×4 stride-4 patchify conv runs at stride 2 with
    padding 1 (an overlapping stem's last stride-2 conv at stride 1); a 3×3 stride-2 stem conv
    runs at stride 1 (padding 1 keeps the side). Each leaves output stride 16: a 2×2 last map at
    32 px."""
    conv = _stride2_stem_conv(model)
    if conv is not None:
        conv.stride = (1, 1)
        return
    if isinstance(model, timm.models.resnet.ResNet):
        model.maxpool = nn.Identity()  # type: ignore[assignment]  # timm types it as the Sequential of some builds
        return
    last = [m for m in model.get_submodule("stem").children() if isinstance(m, nn.Conv2d)][-1]
    if tuple(last.stride) == (4, 4) and tuple(last.kernel_size) == (4, 4):
        last.stride, last.padding = (2, 2), (1, 1)
    else:
        last.stride = (1, 1)


def init_params(cls: type) -> set[str]:
    """Constructor parameter names of ``cls``, following ``**kwargs`` up the MRO."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is nn.Module:
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names.update(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _patch_size(model: nn.Module) -> int | None:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return None
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def _native_side(model: nn.Module) -> int:
    return int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])  # type: ignore[union-attr, operator]  # timm sets it


def _create(arch: str, plan: Plan, device: str | torch.device = "cpu") -> nn.Module:
    """``arch`` built by ``plan`` on ``device`` (headless: ``num_classes=0``)."""
    model = on_device(lambda: timm.create_model(arch, pretrained=False, num_classes=0, **plan.kwargs), device)
    drop_empty_head(model)
    if "stem" in plan.changes:
        apply_small_stem(model)
    if "se" in plan.changes:
        open_squeeze_excite(model)
    if "zero_init" in plan.changes:
        zero_init_residuals(model)
    if "attention_grid" in plan.changes:
        fit_attention_grid(model, int(plan.kwargs.get("img_size", _native_side(model))))
    return model


def fit_attention_grid(model: nn.Module, side: int) -> None:
    """In place, rebuild each attention's relative-position bias table of an EfficientFormer (V1)
    for the token grid its last stage has at ``side`` px: ⌈side / output stride⌉ on each axis
    (stride-2 3×3 convs with padding 1 take n to ⌈n/2⌉). timm builds the table for 7×7 tokens
    (224 px); the new one comes from timm's own ``Attention`` (zero biases, its index rule)."""
    former = timm.models.efficientformer
    stride = 2 ** sum(
        1 for m in model.modules() if isinstance(m, nn.Conv2d) and tuple(m.stride) == (2, 2) and m.kernel_size != (1, 1)
    )
    grid = -(-side // stride)
    for attn in [m for m in model.modules() if isinstance(m, former.Attention)]:
        weight = attn.qkv.weight
        fresh = former.Attention(
            attn.qkv.in_features,
            attn.key_dim,
            attn.num_heads,
            attn.attn_ratio,
            resolution=grid,
            device=weight.device,
            dtype=weight.dtype,
        )
        attn.attention_biases = fresh.attention_biases
        attn.attention_bias_idxs = fresh.attention_bias_idxs
        attn.attention_bias_cache = {}


def on_device(build: Callable[[], nn.Module], device: str | torch.device) -> nn.Module:
    """``build()`` with ``device`` as the default device; a meta build whose constructor runs an
    operator that has no meta kernel (``torch.unique`` in some timm versions' RegNet width
    schedule) is built on the CPU instead."""
    try:
        with torch.device(device):
            return build()
    except NotImplementedError:
        if torch.device(device).type != "meta":
            raise
    with torch.device("cpu"):
        return build()


def drop_empty_head(model: nn.Module) -> None:
    """Make a headless model's output its pooled features: some timm versions (InceptionNeXt
    before 1.0.31) keep a 0-output ``nn.Linear`` as the classifier when ``num_classes=0``, so
    the model returns [B, 0]; ``reset_classifier(0)`` replaces it by the identity."""
    if any(isinstance(m, nn.Linear) and m.out_features == 0 for m in model.modules()):
        model.reset_classifier(0)  # type: ignore[operator]  # a timm model's method, not a submodule


def _probe(model: nn.Module, side: int) -> int | None:
    """The feature width ``model`` maps a [1, 3, side, side] input to (eval, no grad), or
    None if it fails at that side or does not return pooled features [1, C]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, side, side, device=device))
    except Exception:  # any failure means "not at this side"
        return None
    finally:
        model.train(was_training)
    return int(out.shape[1]) if out.ndim == 2 else None


def _min_input(model: nn.Module, resolution: int, multiple: int) -> tuple[int | None, int]:
    """(smallest probe side the model runs at, feature width), provided it also runs at
    ``resolution``; (None, 0) if not."""
    for side in PROBE_SIDES:
        if side % multiple or (dim := _probe(model, side)) is None:
            continue
        if side < resolution and _probe(model, -(-resolution // multiple) * multiple) is None:
            break
        return side, dim
    return None, 0


def _fit_fixed(arch: str, plan: Plan, resolution: int) -> tuple[Plan, int]:
    """(plan with ``img_size``, side) for the smallest side ≥ ``resolution`` an ``img_size``
    arch builds and runs at."""
    for side in [resolution] + [s for s in PROBE_SIDES if s > resolution]:
        sized = replace(plan, kwargs={**plan.kwargs, "img_size": side})
        try:
            model = _create(arch, sized, "meta")
        except Exception:  # the arch rejects this img_size at construction
            continue
        if _probe(model, side) is not None:
            return sized, side
    raise ArchitectureError(f"architecture {arch!r} runs at no input side from {resolution} to {PROBE_SIDES[-1]} px")
