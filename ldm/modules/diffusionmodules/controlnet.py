"""ControlNet (Zhang et al. 2023) for the SD 2.x UNet: a trainable copy of the UNet's encoder and middle block
that reads a hint picture (edges, depth, a pose...) and returns one residual per UNet skip plus one for the
middle block, which the UNet adds (UNetModel.forward's `control`).

Attribute names are the keys of a ControlNet file (thibaud/controlnet-sd21's, or `control_model.*` inside the
reference's ControlLDM checkpoints): time_embed, input_hint_block.N (eight convolutions, SiLU between them,
the hint brought down 8x to the latent's size), input_blocks, zero_convs.N.0 (1x1, one per input block),
middle_block, middle_block_out.0. Parameters are cldm's ControlNet's, which are the UNet's plus hint_channels;
the class label (num_classes) of unCLIP or the upscaler has no ControlNet in the reference and none here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm.errors import SDError
from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, _Blocks, _check_config, _Encoder
from ldm.modules.diffusionmodules.util import zero_module

HINT_FACTOR = 8  # the hint block's three stride-2 convolutions: hints are 8x the latent's size
HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)  # the hint block's convolutions before the last, zeroed one
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)


class ControlNet(_Encoder):
    def __init__(self, image_size, in_channels: int, model_channels: int, hint_channels: int,
                 num_res_blocks: int | Sequence[int], attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 use_checkpoint: bool = False, use_fp16: bool = False, use_bf16: bool = False, num_heads: int = -1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_new_attention_order: bool = False,
                 use_spatial_transformer: bool = False, transformer_depth: int | Sequence[int] = 1,
                 context_dim: int | None = None, n_embed: int | None = None, legacy: bool = True,
                 disable_self_attentions: Sequence[bool] | None = None,
                 num_attention_blocks: Sequence[int] | None = None, disable_middle_self_attn: bool = False,
                 use_linear_in_transformer: bool = False):
        super().__init__()
        levels = _check_config(dims=dims, use_spatial_transformer=use_spatial_transformer, context_dim=context_dim,
                               n_embed=n_embed, resblock_updown=resblock_updown, num_heads=num_heads,
                               num_head_channels=num_head_channels, num_classes=None, adm_in_channels=None,
                               model_channels=model_channels, channel_mult=channel_mult,
                               num_res_blocks=num_res_blocks, transformer_depth=transformer_depth,
                               num_attention_blocks=num_attention_blocks,
                               disable_self_attentions=disable_self_attentions)
        self.in_channels, self.model_channels, self.hint_channels = in_channels, model_channels, hint_channels
        self.context_dim = context_dim
        # What the UNet it steers must have for the residuals to fit (ControlledApply checks it).
        self.unet_shape = dict(model_channels=model_channels, channel_mult=list(channel_mult),
                               num_res_blocks=list(levels.res_blocks), context_dim=context_dim)
        time_embed_dim = self._build_embedding(model_channels)
        blocks = _Blocks(time_embed_dim, dropout, context_dim, num_heads, num_head_channels, use_scale_shift_norm,
                         use_linear_in_transformer)
        layers: list[nn.Module] = []
        width = hint_channels
        for out, stride in zip(HINT_WIDTHS, HINT_STRIDES):
            layers += [nn.Conv2d(width, out, 3, padding=1, stride=stride), nn.SiLU()]
            width = out
        layers.append(zero_module(nn.Conv2d(width, model_channels, 3, padding=1)))
        self.input_hint_block = TimestepEmbedSequential(*layers)
        skip_chans = self._build_encoder(in_channels, model_channels, channel_mult, attention_resolutions,
                                         conv_resample, levels, blocks)
        self.zero_convs = nn.ModuleList([TimestepEmbedSequential(zero_module(nn.Conv2d(ch, ch, 1)))
                                         for ch in skip_chans])
        self._build_middle(skip_chans[-1], levels, blocks, disable_middle_self_attn)
        self.middle_block_out = TimestepEmbedSequential(zero_module(nn.Conv2d(skip_chans[-1], skip_chans[-1], 1)))

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor) -> list[torch.Tensor]:
        """x (B, in_channels, h, w) the UNet's noisy latent (its first channels for an inpainting UNet), hint
        (B, hint_channels, 8h, 8w) in [0, 1], timesteps (B,), context (B, n, context_dim) -> the residuals,
        one per input block then the middle block's, unweighted."""
        if hint.ndim != 4 or hint.shape[1] != self.hint_channels:
            raise SDError(f"ControlNet hint has shape {tuple(hint.shape)}; expected (B, {self.hint_channels}, H, W)")
        want = (x.shape[-2] * HINT_FACTOR, x.shape[-1] * HINT_FACTOR)
        if tuple(hint.shape[-2:]) != want:
            raise SDError(f"ControlNet hint is {hint.shape[-1]}x{hint.shape[-2]}; a {x.shape[-1]}x{x.shape[-2]} "
                          f"latent needs {want[1]}x{want[0]}")
        dtype = self.time_embed[0].weight.dtype
        emb = self._embed(timesteps, x.shape[0])
        context = context.to(dtype)
        guided = self.input_hint_block(hint.to(dtype), emb, context)
        h, outs = x.to(dtype), []
        for k, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if k == 0:
                h = h + guided
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs
