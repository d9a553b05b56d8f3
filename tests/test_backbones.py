"""build_backbone: small-image adaptation, view sizes, embedding width, name errors."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from lejepa.backbones import build_backbone, drop_empty_head, on_device, small_patch
from lejepa.errors import ArchitectureError

pytestmark = pytest.mark.usefixtures("one_thread")


def _features(backbone: nn.Module, side: int, batch: int = 2) -> torch.Tensor:
    backbone.train()
    return backbone(torch.rand(batch, 3, side, side))


def test_small_stem_on_below_64_px():
    backbone = build_backbone("resnet18", 32)
    assert backbone.small_stem
    conv1 = backbone.model.conv1
    assert (conv1.kernel_size, conv1.stride) == ((7, 7), (2, 2))  # timm's conv, every parameter kept
    assert isinstance(backbone.model.maxpool, nn.Identity)
    assert _features(backbone, 32).shape == (2, 512)
    assert backbone.model.forward_features(torch.rand(2, 3, 32, 32)).shape[-2:] == (2, 2)  # output stride 16


def test_small_stem_off_at_224_px_and_overridable():
    backbone = build_backbone("resnet18", 224, device="meta")
    assert not backbone.small_stem
    assert (backbone.model.conv1.kernel_size, backbone.model.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(backbone.model.maxpool, nn.MaxPool2d)
    assert not build_backbone("resnet18", 32, small_stem=False, device="meta").small_stem
    assert build_backbone("resnet18", 224, small_stem=True, device="meta").small_stem


@pytest.mark.parametrize("arch", ["resnet10t", "convnext_atto", "convnext_atto_ols", "inception_next_atto"])
def test_small_stem_halves_the_stem_stride_and_keeps_every_parameter(arch):
    adapted = build_backbone(arch, 32)
    native = build_backbone(arch, 32, small_stem=False)
    assert adapted.small_stem
    assert sum(p.numel() for p in adapted.parameters()) == sum(p.numel() for p in native.parameters())
    x = torch.rand(2, 3, 32, 32)
    assert adapted.model.forward_features(x).shape[-2:] == (2, 2)
    assert native.model.forward_features(x).shape[-2:] == (1, 1)
    assert _features(adapted, 14).shape == (2, adapted.embed_dim)  # a local view still runs


def test_small_stem_ignored_where_there_is_no_stem_to_adapt():
    assert not build_backbone("vit_wee_patch16_reg1_gap_256", 32, small_stem=True, device="meta").small_stem
    assert not build_backbone("levit_128s", 32, small_stem=True, device="meta").small_stem
    assert not build_backbone("efficientformerv2_s0", 32, small_stem=True, device="meta").small_stem


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "vit_xsmall_patch16_clip_224"])
def test_a_class_token_vit_is_built_as_a_reg1_gap_vit_below_64_px(arch):
    """No class token, one register token, average pooling, LayerScale 1e-5: timm's reg1_gap
    recipe. The pooled feature is the mean of the patch tokens, after timm's fc_norm."""
    adapted = build_backbone(arch, 32)
    native = build_backbone(arch, 32, small_stem=False)
    vit = adapted.model
    assert adapted.small_stem and "no class token" in adapted.adaptation
    assert vit.cls_token is None and vit.num_reg_tokens == 1 and vit.global_pool == "avg"
    assert all(float(b.ls1.gamma.abs().max()) == pytest.approx(1e-5) for b in vit.blocks)
    assert native.model.cls_token is not None and native.model.global_pool == "token"
    assert not build_backbone(arch, 224, device="meta").small_stem  # at its native size: timm's build
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(x)  # [B, 1 register + 64 patches, E]
        assert tokens.shape[1] == 1 + 64
        assert torch.allclose(adapted(x), vit.fc_norm(tokens[:, 1:].mean(dim=1)), atol=1e-5)
    assert _features(adapted, 14).shape == (2, adapted.embed_dim)  # a local view still runs


def test_a_distilled_deit_gets_layerscale_below_64_px():
    """DeiT-distilled keeps its class and distillation tokens (its head reads both) and gains
    LayerScale at 1e-5 in every block; timm's build (no LayerScale) with small_stem off or at 224 px."""
    arch = "deit_tiny_distilled_patch16_224"
    adapted = build_backbone(arch, 32)
    native = build_backbone(arch, 32, small_stem=False)
    assert adapted.small_stem and "LayerScale 1e-5" in adapted.adaptation
    assert adapted.model.num_prefix_tokens == native.model.num_prefix_tokens == 2
    assert all(float(b.ls1.gamma.abs().max()) == pytest.approx(1e-5) for b in adapted.model.blocks)
    assert all(isinstance(b.ls1, nn.Identity) for b in native.model.blocks)
    assert not build_backbone(arch, 224, device="meta").small_stem
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = adapted.model.forward_features(x)
        assert torch.allclose(adapted(x), (tokens[:, 0] + tokens[:, 1]) / 2, atol=1e-5)  # the two tokens' mean
    assert _features(adapted, 14).shape == (2, adapted.embed_dim)


def test_a_convnextv2_gets_convnext_layerscale_below_64_px():
    """ConvNeXt-V2 blocks (GRN, no LayerScale in timm's build) gain LayerScale at ConvNeXt's 1e-6
    below 64 px, so each block starts near the identity; timm's build with small_stem off or at
    224 px, and a ConvNeXt V1 (LayerScale already) is not noted as changed."""
    from timm.models.convnext import ConvNeXtBlock

    def gammas(backbone):
        return [b.gamma for b in backbone.model.modules() if isinstance(b, ConvNeXtBlock)]

    adapted = build_backbone("convnextv2_atto", 32)
    assert adapted.small_stem and "LayerScale 1e-6" in adapted.adaptation
    assert gammas(adapted) and all(float(g.abs().max()) == pytest.approx(1e-6) for g in gammas(adapted))
    assert all(g is None for g in gammas(build_backbone("convnextv2_atto", 32, small_stem=False, device="meta")))
    assert all(g is None for g in gammas(build_backbone("convnextv2_atto", 224, device="meta")))
    assert "LayerScale" not in build_backbone("convnext_atto", 32, device="meta").adaptation
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # near the identity: each block's residual branch adds about 1e-6 of its output
        stage = adapted.model.stages[0]
        inner = stage.downsample(adapted.model.stem(x))
        assert torch.allclose(stage.blocks(inner), inner, atol=1e-4)


def test_efficientformer_attends_over_its_last_stage_grid_at_32_px():
    """Below 64 px EfficientFormer's stem ends at stride 2 and its attention bias table is sized
    for the 2×2 tokens its last stage has at 32 px, so it runs at 32 px (timm's build: 224 px only)."""
    from timm.models.efficientformer import Attention

    adapted = build_backbone("efficientformer_l1", 32)
    native = build_backbone("efficientformer_l1", 32, small_stem=False, device="meta")
    assert adapted.small_stem and adapted.fixed_input == 32 and native.fixed_input == 224
    [attn] = [m for m in adapted.modules() if isinstance(m, Attention)]
    # |row difference| * 2 + |column difference| between the tokens (0,0), (0,1), (1,0), (1,1)
    expected = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0]])
    assert torch.equal(attn.attention_bias_idxs, expected)
    assert attn.attention_biases.shape == (attn.num_heads, 4)
    heads = attn.num_heads
    assert sum(p.numel() for p in native.parameters()) - sum(p.numel() for p in adapted.parameters()) == heads * (49 - 4)
    tokens = []
    attn.register_forward_hook(lambda module, args, out: tokens.append(args[0].shape[1]))
    assert _features(adapted, 32).shape == (2, adapted.embed_dim) and tokens == [4]
    assert _features(adapted, 14).shape == (2, adapted.embed_dim)  # a local view is resized to 32 px
    assert build_backbone("efficientformer_l1", 224, small_stem=True, device="meta").fixed_input == 224


def test_mobilenetv3_residual_blocks_start_as_their_shortcut_below_64_px():
    """Below 64 px each residual block of a MobileNetV3 starts with its last BatchNorm's scale at 0,
    so it maps its input to itself; timm's initialisation (scale 1) with small_stem off or at 224 px,
    and MobileNetV4 (other blocks) is not changed."""
    from timm.models._efficientnet_blocks import InvertedResidual

    adapted = build_backbone("mobilenetv3_large_100", 32)
    assert adapted.small_stem and "start as their shortcut" in adapted.adaptation
    residual = [b for b in adapted.model.modules() if isinstance(b, InvertedResidual) and b.has_skip]
    assert len(residual) == 9 and all(float(b.bn3.weight.abs().max()) == 0.0 for b in residual)
    x = torch.randn(4, residual[0].conv_pw.in_channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(residual[0](x), x)
    for native in (build_backbone("mobilenetv3_large_100", 32, small_stem=False), build_backbone("mobilenetv3_large_100", 224)):
        blocks = [b for b in native.model.modules() if isinstance(b, InvertedResidual) and b.has_skip]
        assert all(float(b.bn3.weight.min()) == 1.0 for b in blocks)
    assert "shortcut" not in build_backbone("mobilenetv4_conv_small", 32, device="meta").adaptation


@pytest.mark.parametrize("arch", ["regnetx_002", "efficientnet_lite0", "mobilenetv3_small_050", "ghostnet_050"])
def test_stride2_stem_conv_runs_at_stride_1_below_64_px(arch):
    adapted = build_backbone(arch, 32, device="meta")
    native = build_backbone(arch, 32, small_stem=False, device="meta")
    conv = adapted.model.stem.conv if arch.startswith("regnet") else adapted.model.conv_stem
    assert adapted.small_stem and conv.stride == (1, 1) and "stride-1 stem conv" in adapted.adaptation
    assert sum(p.numel() for p in adapted.parameters()) == sum(p.numel() for p in native.parameters())


def test_efficientnet_squeeze_excite_gates_start_open_below_64_px():
    """Each sigmoid SE gate of an adapted EfficientNet is σ(3) = 0.95 for any input at init, with
    the same parameters as timm's build; timm's initialisation above 64 px, and no SE in lite0."""
    from timm.models._efficientnet_blocks import SqueezeExcite

    adapted = build_backbone("efficientnet_b0", 32)
    native = build_backbone("efficientnet_b0", 32, small_stem=False)
    assert "squeeze-excite gates start open" in adapted.adaptation
    assert sum(p.numel() for p in adapted.parameters()) == sum(p.numel() for p in native.parameters())
    gates: list[torch.Tensor] = []
    blocks = [m for m in adapted.modules() if isinstance(m, SqueezeExcite)]
    hooks = [b.gate.register_forward_hook(lambda m, i, o: gates.append(o)) for b in blocks]
    with torch.no_grad():
        adapted(torch.rand(4, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(gates) == len(blocks) == 16
    assert all(torch.allclose(g, torch.full_like(g, torch.sigmoid(torch.tensor(3.0)).item())) for g in gates)
    timm_gates = [m.conv_expand.weight.abs().sum() for m in native.modules() if isinstance(m, SqueezeExcite)]
    assert all(w > 0 for w in timm_gates)  # small_stem=False: timm's own initialisation
    assert "squeeze-excite" not in build_backbone("efficientnet_b0", 224, device="meta").adaptation
    assert "squeeze-excite" not in build_backbone("efficientnet_lite0", 32, device="meta").adaptation


def test_maxxvit_is_initialised_as_maxvit_below_64_px():
    """An adapted MaxxViT's convs start from He fan-out normals (sd √(2 / (k² · out / groups))) and
    its attention linears from Xavier-uniform, as MaxViT's; small_stem=False keeps timm's
    N(0, 0.02) for both. Same parameters; MaxViT itself is unchanged."""
    import math

    torch.manual_seed(0)
    adapted = build_backbone("maxxvit_rmlp_nano_rw_256", 32)
    native = build_backbone("maxxvit_rmlp_nano_rw_256", 32, small_stem=False)
    assert "MaxViT's initialisation" in adapted.adaptation and adapted.small_stem and adapted.fixed_input == 32
    assert "MaxViT's initialisation" not in native.adaptation
    assert sum(p.numel() for p in adapted.parameters()) == sum(p.numel() for p in native.parameters())

    def conv_and_qkv(backbone: nn.Module) -> tuple[nn.Conv2d, nn.Linear]:
        conv = next(m for n, m in backbone.named_modules() if n.endswith("stages.2.blocks.0.conv.conv_dw"))
        qkv = next(m for n, m in backbone.named_modules() if n.endswith("stages.2.blocks.0.attn_block.attn.qkv"))
        return conv, qkv

    conv, qkv = conv_and_qkv(adapted)
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)
    bound = math.sqrt(6.0 / (qkv.in_features + qkv.out_features))  # Xavier-uniform: sd bound / √3
    assert qkv.weight.abs().max().item() <= bound and qkv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    for module in conv_and_qkv(native):
        assert module.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert "MaxViT's initialisation" not in build_backbone("maxxvit_rmlp_nano_rw_256", 224, device="meta").adaptation
    assert "MaxViT's initialisation" not in build_backbone("maxvit_rmlp_nano_rw_256", 32, device="meta").adaptation


def test_strided_conv_shortcuts_become_average_pooled_below_64_px():
    def shortcut(backbone: nn.Module) -> nn.Module:
        model = backbone.model
        return model.layer2[0].downsample if hasattr(model, "layer2") else model.s2.b1.downsample

    for arch in ("resnet18", "seresnet18", "regnetx_002"):
        adapted = build_backbone(arch, 32, device="meta")
        assert isinstance(shortcut(adapted)[0], nn.AvgPool2d), arch
        assert "average-pooled shortcuts" in adapted.adaptation
        native = build_backbone(arch, 32, small_stem=False, device="meta")
        assert not any(isinstance(m, nn.AvgPool2d) for m in shortcut(native).modules())
        assert sum(p.numel() for p in adapted.parameters()) == sum(p.numel() for p in native.parameters())
    assert "average-pooled shortcuts" not in build_backbone("resnet18d", 32, device="meta").adaptation


def _object_images(side: int = 32, obj: int = 8) -> torch.Tensor:
    """[blank, object top-left, object bottom-right, object centre], twice (a batch for BatchNorm)."""
    images = torch.zeros(4, 3, side, side)
    images[1, :, :obj, :obj] = 1.0
    images[2, :, -obj:, -obj:] = 1.0
    c = (side - obj) // 2
    images[3, :, c : c + obj, c : c + obj] = 1.0
    return images.repeat(2, 1, 1, 1)


def spatial_sensitivity(backbone: nn.Module, side: int = 32) -> float:
    """How much the pooled feature moves (from the blank image's) for an object away from the
    top-left corner, relative to the same object in that corner: min(|f(BR) − f(0)|,
    |f(C) − f(0)|) / |f(TL) − f(0)|, in training mode (BatchNorm on batch statistics), at init."""
    torch.manual_seed(0)
    backbone.train()
    with torch.no_grad():
        f = backbone(_object_images(side))[:4].double()
    d = (f[1:] - f[0]).norm(dim=1)
    return float(torch.minimum(d[1], d[2]) / d[0].clamp_min(1e-30))


FAMILY_REPRESENTATIVES = [
    "resnet18",
    "resnet10t",
    "skresnet18",
    "ecaresnext26t_32x4d",
    "convnext_zepto_rms",
    "convnextv2_atto",
    "inception_next_atto",
    "regnetx_002",
    "regnety_002",
    "mobilenetv2_035",
    "mobilenetv3_small_050",
    "mobilenetv4_conv_small_035",
    "mobilenetv4_hybrid_medium_075",
    "efficientnet_lite0",
    "ghostnet_050",
    "ghostnetv2_100",
    "levit_128s",
    "maxvit_pico_rw_256",
    "maxxvit_rmlp_nano_rw_256",
    "efficientformerv2_s0",
    "efficientformer_l1",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "tiny_vit_5m_224",
]


@pytest.mark.parametrize("arch", FAMILY_REPRESENTATIVES)
def test_adapted_backbone_sees_the_whole_image_at_init(arch):
    """Each family's small-input adaptation gives a feature that moves with an object anywhere
    in a 32-px view, not only in the top-left corner."""
    torch.manual_seed(0)
    assert spatial_sensitivity(build_backbone(arch, 32)) > 0.15


def test_regnet_without_adaptation_reads_only_the_top_left_corner():
    """The failure the adaptation fixes: strided 1x1 shortcuts + zero-initialised last BN (each
    block is its shortcut at init, and the chain of strided 1x1 convs samples one pixel in 32)."""
    torch.manual_seed(0)
    assert spatial_sensitivity(build_backbone("regnetx_002", 32, small_stem=False)) < 1e-3


def test_vit_patch_and_img_size_adapted_and_local_views_accepted():
    backbone = build_backbone("vit_tiny_patch16_224", 32)
    embed = backbone.model.patch_embed
    assert embed.patch_size == (4, 4) and embed.img_size == (32, 32)
    assert backbone.model.dynamic_img_size
    for side in (32, 14, 4):  # global, local (32·96/224), the smallest local view
        assert _features(backbone, side).shape == (2, 192)


def test_vit_keeps_its_patch_at_224_px():
    backbone = build_backbone("vit_tiny_patch16_224", 224, device="meta")
    assert backbone.model.patch_embed.patch_size == (16, 16)


@pytest.mark.parametrize(
    ("patch", "resolution", "expected"),
    [(16, 32, 4), (14, 32, 4), (16, 64, 8), (16, 128, 16), (32, 128, 16), (16, 224, 16), (32, 224, 32), (16, 16, 2)],
)
def test_small_patch(patch, resolution, expected):
    assert small_patch(patch, resolution, native=224) == expected


def test_strict_patch_embed_rounds_sides_up():
    backbone = build_backbone("swin_tiny_patch4_window7_224", 32, device="meta")
    assert backbone.multiple == 4 and backbone.input_side(14) == 16 and backbone.input_side(32) == 32


def test_fixed_size_arch_resizes_every_view():
    backbone = build_backbone("maxvit_pico_rw_256", 32)
    assert backbone.fixed_input == 32 and backbone.input_side(14) == 32
    assert _features(backbone, 14).shape == (2, backbone.embed_dim)


def test_minimum_input_upsamples_small_views():
    backbone = build_backbone("convnext_atto", 64)  # no small stem at 64 px: its 32x reduction needs 32 px
    assert not backbone.small_stem and backbone.fixed_input is None and backbone.min_input == 32
    assert backbone.input_side(27) == 32 and backbone.input_side(64) == 64
    assert _features(backbone, 27).shape == (2, backbone.embed_dim)


@pytest.mark.parametrize("arch", ["resnet18", "inception_next_atto", "efficientformerv2_s0", "mobilenetv3_small_100"])
def test_embed_dim_matches_output(arch):
    backbone = build_backbone(arch, 32)
    assert _features(backbone, 32).shape == (2, backbone.embed_dim)


def test_unknown_arch_names_closest_in_one_line():
    with pytest.raises(ArchitectureError) as err:
        build_backbone("resnet181", 32)
    message = str(err.value)
    assert "'resnet181'" in message and "resnet18" in message and "\n" not in message


def test_a_meta_build_that_runs_an_operator_without_meta_kernel_is_built_on_the_cpu():
    # timm 1.0.29's RegNet computes its stage widths with torch.unique while being built: under a
    # meta default device that raised NotImplementedError and every RegNet failed on the H200.
    def build():
        return nn.Linear(int(torch.unique(torch.tensor([3, 3, 4, 5])).numel()), 2)

    with pytest.raises(NotImplementedError), torch.device("meta"):
        build()
    model = on_device(build, "meta")
    assert model.in_features == 3 and model.weight.device.type == "cpu"
    assert on_device(lambda: nn.Linear(3, 2), "meta").weight.device.type == "meta"


def test_an_empty_classifier_is_dropped_so_the_model_returns_its_pooled_features():
    # timm before 1.0.31 left InceptionNeXt's head a Linear(…, 0) under num_classes=0: features [B, 0].
    model = timm.create_model("inception_next_atto", pretrained=False, num_classes=0).eval()
    width = model(torch.zeros(1, 3, 32, 32)).shape[1]
    model.head.fc2 = nn.Linear(model.head.fc2.in_features if isinstance(model.head.fc2, nn.Linear) else width, 0)
    assert model(torch.zeros(1, 3, 32, 32)).shape[1] == 0
    drop_empty_head(model)
    assert model(torch.zeros(1, 3, 32, 32)).shape[1] == width > 0
