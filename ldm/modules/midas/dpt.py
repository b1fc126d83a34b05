"""MiDaS v3 DPT-Hybrid: a ViT-hybrid encoder (timm's R50+ViT-B/16) and DPT's RefineNet decoder.

The encoder is timm's own model, so its parameter names are timm's (`pretrained.model.blocks.3.attn.qkv`,
`pretrained.model.patch_embed.backbone.stages.1.blocks.0.conv2`, ...). We do not use timm's forward:
DPT needs the outputs of the first two ResNet stages and of two transformer blocks, and a position
embedding resized to the input's token grid (MiDaS's `forward_flex`). Those are read off directly in
`HybridViTEncoder.forward` instead of through forward hooks and a module-global dict.
"""
from __future__ import annotations

import math
from functools import partial

import timm
import torch
import torch.nn.functional as F
from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ldm.modules.midas.blocks import FeatureFusionBlock, Reassemble, depth_head

# Pixels per transformer token: the ResNet stem (4) and its stages 2 and 3 (2 each).
PATCH = 16
# Sides must be multiples of this: layer 4 works at 1/32 and every fusion step doubles the size exactly.
MULTIPLE = 32


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample a (1, 1 + g * g, C) position embedding to a (gh, gw) token grid.

    The class-token entry stays; the square grid part is resized bilinearly (align_corners=False),
    as MiDaS's _resize_pos_embed does. At the native grid this is the identity.
    """
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]  # (1, 1, C), (1, g * g, C)
    side = math.isqrt(grid_pos.shape[1])
    grid_pos = grid_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
    grid_pos = F.interpolate(grid_pos, size=grid, mode="bilinear", align_corners=False)  # (1, C, gh, gw)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)  # (1, gh * gw, C)
    return torch.cat([cls_pos, grid_pos], dim=1)  # (1, 1 + gh * gw, C)


def vit_hybrid(tiny: bool = False) -> VisionTransformer:
    """timm's ViT-hybrid without any weights (they come from the checkpoint; nothing is downloaded).

    tiny=True is for tests only: the same timm classes (ResNetV2 with SAME-padded weight-standardised
    convs, HybridEmbed, VisionTransformer) with one block per stage, widths 16-128, 3 blocks of width 32
    and a 64 px native size (4 x 4 tokens), so a forward pass takes milliseconds.
    """
    if not tiny:
        # R50 stages (3, 4, 9) + ViT-B/16, native 384 px: 24 x 24 tokens + class token.
        return timm.create_model("vit_base_r50_s16_384", pretrained=False)
    backbone = ResNetV2(
        layers=(1, 1, 1),
        channels=(32, 64, 128),
        stem_chs=16,
        num_classes=0,
        global_pool="",
        preact=False,
        stem_type="same",
        conv_layer=partial(StdConv2dSame, eps=1e-8),  # as timm's _resnetv2 for hybrid ViTs
        norm_layer=partial(GroupNormAct, num_groups=8),  # 32 groups would not divide 8-channel layers
    )
    return VisionTransformer(
        img_size=64,
        patch_size=1,
        embed_dim=32,
        depth=3,
        num_heads=2,
        num_classes=10,
        embed_layer=partial(HybridEmbed, backbone=backbone),
    )


class HybridViTEncoder(nn.Module):
    """The checkpoint's `pretrained`: timm's ViT-hybrid as `model` plus the two token reassemblers.

    forward(x) -> four feature maps at 1/4, 1/8, 1/16 and 1/32 of the input: the outputs of ResNet
    stages 1 and 2 as they are (MiDaS's act_postprocess1/2 are identities), and the outputs of
    transformer blocks `hooks` reassembled into images.
    """

    def __init__(self, model: VisionTransformer, hooks: tuple[int, int]):
        super().__init__()
        self.model = model
        self.hooks = hooks
        width = model.embed_dim
        self.act_postprocess3 = Reassemble(width, width, downsample=False)
        self.act_postprocess4 = Reassemble(width, width, downsample=True)

    @property
    def widths(self) -> tuple[int, int, int, int]:
        """Channels of the four feature maps forward returns."""
        info = self.model.patch_embed.backbone.feature_info  # [stem, stage 1, stage 2, stage 3]
        return info[1]["num_chs"], info[2]["num_chs"], self.model.embed_dim, self.model.embed_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        vit = self.model
        resnet = vit.patch_embed.backbone
        grid = (x.shape[2] // PATCH, x.shape[3] // PATCH)  # (gh, gw)

        h = resnet.stem(x)  # (B, 64, H/4, W/4)
        layer1 = resnet.stages[0](h)  # (B, 256, H/4, W/4)
        layer2 = resnet.stages[1](layer1)  # (B, 512, H/8, W/8)
        h = resnet.norm(resnet.stages[2:](layer2))  # (B, 1024, H/16, W/16); norm is an Identity (no pre-act)

        tokens = vit.patch_embed.proj(h).flatten(2).transpose(1, 2)  # (B, gh * gw, 768)
        cls = vit.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, 768)
        tokens = torch.cat([cls, tokens], dim=1) + resize_pos_embed(vit.pos_embed, grid)  # (B, 1 + gh * gw, 768)
        tokens = vit.pos_drop(tokens)

        taps = {}
        for i, block in enumerate(vit.blocks[: max(self.hooks) + 1]):  # later blocks and the final norm are unused
            tokens = block(tokens)
            if i in self.hooks:
                taps[i] = tokens
        layer3 = self.act_postprocess3(taps[self.hooks[0]], grid)  # (B, 768, H/16, W/16)
        layer4 = self.act_postprocess4(taps[self.hooks[1]], grid)  # (B, 768, H/32, W/32)
        return layer1, layer2, layer3, layer4


class DPTDepthModel(nn.Module):
    """DPT with a depth head: (B, 3, H, W) normalised to [-1, 1] -> (B, H, W) relative inverse depth.

    H and W must be multiples of 32. `pretrained` is the encoder, `scratch` the decoder
    (MiDaS's names): layerN_rn bring the four encoder maps to `features` channels, refinenet4..1 fuse
    them from coarse to fine, output_conv is the head.
    """

    def __init__(self, pretrained: HybridViTEncoder, features: int = 256, non_negative: bool = True):
        super().__init__()
        self.pretrained = pretrained
        self.scratch = nn.Module()
        for i, width in enumerate(pretrained.widths, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(width, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FeatureFusionBlock(features))
        self.scratch.output_conv = depth_head(features, non_negative)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scratch
        layer1, layer2, layer3, layer4 = self.pretrained(x)
        path = s.refinenet4(s.layer4_rn(layer4))  # (B, F, H/16, W/16)
        path = s.refinenet3(path, s.layer3_rn(layer3))  # (B, F, H/8, W/8)
        path = s.refinenet2(path, s.layer2_rn(layer2))  # (B, F, H/4, W/4)
        path = s.refinenet1(path, s.layer1_rn(layer1))  # (B, F, H/2, W/2)
        return s.output_conv(path).squeeze(1)  # (B, H, W)


def dpt_hybrid(tiny: bool = False) -> DPTDepthModel:
    """MiDaS's "dpt_hybrid" (backbone vitb_rn50_384, readout "project", non_negative=True).

    The real model taps transformer blocks 8 and 11 and fuses at 256 channels; the test-only tiny
    one taps its blocks 1 and 2 and fuses at 32.
    """
    if tiny:
        return DPTDepthModel(HybridViTEncoder(vit_hybrid(tiny=True), hooks=(1, 2)), features=32)
    return DPTDepthModel(HybridViTEncoder(vit_hybrid(), hooks=(8, 11)), features=256)
