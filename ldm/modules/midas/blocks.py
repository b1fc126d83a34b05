"""DPT building blocks: token reassembly, residual fusion and the depth head.

Attribute names and child indices are MiDaS's, because they are the checkpoint keys
(`pretrained.act_postprocess3.0.project.0.weight`, `scratch.refinenet1.resConfUnit2.conv1.weight`,
`scratch.output_conv.4.bias`, ...).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class ProjectReadout(nn.Module):
    """MiDaS's "project" readout: every patch token is concatenated with the class token and projected back.

    This is how DPT keeps the global (class-token) information when the token sequence becomes an image.
    """

    def __init__(self, width: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: (B, 1 + N, C), the class token first
        patches = tokens[:, 1:]  # (B, N, C)
        readout = tokens[:, :1].expand_as(patches)  # (B, N, C)
        return self.project(torch.cat([patches, readout], dim=-1))  # (B, N, C)


class Reassemble(nn.Sequential):
    """Transformer tokens -> feature map at a chosen stride ("act_postprocess" in MiDaS).

    Children keep the checkpoint's indices: 0 is the readout, 3 the 1x1 projection to `out_width`
    and, when `downsample` is set, 4 a stride-2 3x3 conv (DPT's layer 4 works at 1/32 of the input).
    MiDaS's indices 1 and 2 were the parameter-free transpose and unflatten, done here in `forward`
    with the actual token grid so any input size works.
    """

    def __init__(self, vit_width: int, out_width: int, downsample: bool):
        layers = OrderedDict([("0", ProjectReadout(vit_width)), ("3", nn.Conv2d(vit_width, out_width, 1))])
        if downsample:
            layers["4"] = nn.Conv2d(out_width, out_width, 3, stride=2, padding=1)
        super().__init__(layers)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        # tokens: (B, 1 + gh * gw, C); grid: (gh, gw)
        readout, *convs = self
        x = readout(tokens).transpose(1, 2)  # (B, C, gh * gw)
        x = x.reshape(x.shape[0], x.shape[1], *grid)  # (B, C, gh, gw)
        for conv in convs:
            x = conv(x)  # (B, out_width, gh, gw), then (B, out_width, gh / 2, gw / 2)
        return x


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, added to the input (MiDaS's ResidualConvUnit_custom without BN)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in place: x is still needed for the skip connection.
        h = self.conv1(F.relu(x))
        h = self.conv2(F.relu(h))
        return h + x


class FeatureFusionBlock(nn.Module):
    """One RefineNet step: add the (refined) skip feature, refine, upsample x2, project (1x1).

    Upsampling is bilinear with align_corners=True, as MiDaS's DPT models were trained with.
    """

    def __init__(self, width: int):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(width)  # refines the skip input; unused by the deepest block
        self.resConfUnit2 = ResidualConvUnit(width)
        self.out_conv = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        # x, skip: (B, W, h, w)
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)  # (B, W, 2h, 2w)
        return self.out_conv(x)


def depth_head(width: int, non_negative: bool = True) -> nn.Sequential:
    """DPTDepthModel's head: (B, width, H/2, W/2) -> (B, 1, H, W) relative inverse depth.

    Indices match the checkpoint's scratch.output_conv.{0,2,4}; the trailing Identity that MiDaS
    appends is left out (it holds no weights).
    """
    return nn.Sequential(
        nn.Conv2d(width, width // 2, 3, padding=1),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(width // 2, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 1, 1),
        nn.ReLU() if non_negative else nn.Identity(),  # inverse depth cannot be negative
    )
