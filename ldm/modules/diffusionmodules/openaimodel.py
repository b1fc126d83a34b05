"""The SD 2.x denoising UNet (`UNetModel`) and its building blocks.

Attribute names are the checkpoint keys under `model.diffusion_model.`: time_embed, label_emb,
input_blocks.N.M, middle_block.M, output_blocks.N.M, out; inside the blocks in_layers / emb_layers /
out_layers / skip_connection (ResBlock), op (Downsample), conv (Upsample). The model builds on the meta
device unchanged (no buffers), so a loader can assign checkpoint tensors with load_state_dict(assign=True).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import SDError
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import normalization, timestep_embedding, zero_module


class TimestepBlock(nn.Module):
    """A block whose forward also takes the timestep embedding: forward(x, emb)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to TimestepBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, out_size)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then (use_conv) a 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=padding)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # `size` is the size of the skip connection this output must meet: 2H x 2W, or one less
        # where the encoder's stride-2 convolution rounded an odd size up (latents of 8k+4 pixels...).
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")  # (B, C, *size)
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution (use_conv) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=padding)
        elif out_channels != channels:
            raise SDError(f"Downsample without a convolution cannot change channels ({channels} -> {out_channels})")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # (B, C', H/2, W/2)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    h = conv(silu(norm(x))); h += proj(emb) (or, with use_scale_shift_norm, norm(h) * (1 + scale) + shift);
    out = skip(x) + conv(dropout(silu(norm(h)))). skip is the identity, or a 1x1 convolution
    (3x3 with use_conv) when the channel count changes.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, C_out or 2 C_out, 1, 1)
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _per_level(name: str, value: int | Sequence[int], levels: int) -> list[int]:
    """An int or a per-level list from the config, as a list of one entry per channel_mult level."""
    if isinstance(value, int):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise SDError(f"{name}={value} needs one entry per channel_mult level ({levels})")
    return value


@dataclass(frozen=True)
class _Levels:
    """Per channel_mult level: res blocks, transformer depth, how many blocks get a transformer, and
    whether those transformers skip self-attention."""
    res_blocks: list[int]
    depths: list[int]
    attn_blocks: list[int]
    no_self_attn: list[bool]


def _check_config(*, dims, use_spatial_transformer, context_dim, n_embed, resblock_updown, num_heads,
                  num_head_channels, num_classes, adm_in_channels, model_channels, channel_mult, num_res_blocks,
                  transformer_depth, num_attention_blocks, disable_self_attentions) -> _Levels:
    """One-line SDErrors for UNet configs sd cannot build; the per-level lists of a valid one."""
    levels = len(channel_mult)
    if dims != 2:
        raise SDError(f"UNetModel: dims={dims} is not supported (SD 2.x UNets are 2-D, dims=2)")
    if not use_spatial_transformer:
        raise SDError("UNetModel: use_spatial_transformer=False (the legacy AttentionBlock UNet) is not supported")
    if not isinstance(context_dim, int):
        raise SDError(f"UNetModel: context_dim={context_dim!r} must be one integer (the text embedding width)")
    if n_embed is not None:
        raise SDError("UNetModel: n_embed (codebook-id prediction) is not supported")
    if resblock_updown:
        raise SDError("UNetModel: resblock_updown=True is not supported (SD 2.x resamples with Downsample/Upsample)")
    if num_heads == -1 and num_head_channels == -1:
        raise SDError("UNetModel: set num_heads or num_head_channels")
    if num_classes is not None and not isinstance(num_classes, int) and num_classes != "sequential":
        raise SDError(f"UNetModel: num_classes={num_classes!r} is not supported (an int or 'sequential')")
    if num_classes == "sequential" and adm_in_channels is None:
        raise SDError("UNetModel: num_classes='sequential' needs adm_in_channels")
    for mult in channel_mult:
        if (model_channels * mult) % 32:
            raise SDError(f"UNetModel: model_channels * channel_mult = {model_channels * mult} is not a "
                          "multiple of 32 (GroupNorm groups)")
    res_blocks = _per_level("num_res_blocks", num_res_blocks, levels)
    depths = _per_level("transformer_depth", transformer_depth, levels)
    # How many blocks of each level get a transformer (counted per level in encoder and decoder); by default all.
    if num_attention_blocks is None:
        attn_blocks = [r + 1 for r in res_blocks]
    else:
        attn_blocks = _per_level("num_attention_blocks", num_attention_blocks, levels)
        if any(a > r for a, r in zip(attn_blocks, res_blocks)):
            raise SDError(f"UNetModel: num_attention_blocks={attn_blocks} exceeds num_res_blocks={res_blocks}")
    no_self_attn = [bool(d) for d in disable_self_attentions] if disable_self_attentions is not None \
        else [False] * levels
    if len(no_self_attn) != levels:
        raise SDError(f"UNetModel: disable_self_attentions needs one entry per channel_mult level ({levels})")
    return _Levels(res_blocks, depths, attn_blocks, no_self_attn)


@dataclass(frozen=True)
class _Blocks:
    """Makes the UNet's ResBlocks and SpatialTransformers with the config's shared settings."""
    time_embed_dim: int
    dropout: float
    context_dim: int
    num_heads: int
    num_head_channels: int
    use_scale_shift_norm: bool
    use_linear: bool

    def heads(self, ch: int) -> tuple[int, int]:
        """(n_heads, d_head) at width ch: a fixed head width, or a fixed head count."""
        fixed_width = self.num_head_channels != -1
        name, value = ("num_head_channels", self.num_head_channels) if fixed_width else ("num_heads", self.num_heads)
        if value <= 0 or ch % value:
            raise SDError(f"UNetModel: {name}={value} does not split {ch} channels into equal heads")
        return (ch // value, value) if fixed_width else (value, ch // value)

    def transformer(self, ch: int, depth: int, disable_self_attn: bool) -> SpatialTransformer:
        n_heads, d_head = self.heads(ch)
        return SpatialTransformer(ch, n_heads, d_head, depth=depth, dropout=self.dropout, context_dim=self.context_dim,
                                  disable_self_attn=disable_self_attn, use_linear=self.use_linear)

    def resblock(self, ch: int, out_ch: int | None = None) -> ResBlock:
        return ResBlock(ch, self.time_embed_dim, self.dropout, out_ch, use_scale_shift_norm=self.use_scale_shift_norm)


class _Encoder(nn.Module):
    """What the UNet and its ControlNet (ldm.modules.diffusionmodules.controlnet) share: the time embedding,
    the encoder half (input_blocks) and the middle block, under the same keys."""

    def _build_embedding(self, model_channels: int) -> int:
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        return time_embed_dim

    def _build_middle(self, ch: int, levels: "_Levels", blocks: "_Blocks", disable_middle_self_attn: bool) -> None:
        self.middle_block = TimestepEmbedSequential(
            blocks.resblock(ch), blocks.transformer(ch, levels.depths[-1], disable_middle_self_attn), blocks.resblock(ch)
        )

    def _build_encoder(self, in_channels: int, model_channels: int, channel_mult: Sequence[int],
                       attention_resolutions: Sequence[int], conv_resample: bool, levels: "_Levels",
                       blocks: "_Blocks") -> list[int]:
        """input_blocks; returns the channels of every input block's output (the decoder's skips)."""
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for nr in range(levels.res_blocks[level]):
                layers: list[nn.Module] = [blocks.resblock(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions and nr < levels.attn_blocks[level]:
                    layers.append(blocks.transformer(ch, levels.depths[level], levels.no_self_attn[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, ch)))
                skip_chans.append(ch)
                ds *= 2
        return skip_chans

    def _embed(self, timesteps: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, 4 * model_channels) time embedding in the weights' dtype; a scalar t serves the whole batch."""
        dtype = self.time_embed[0].weight.dtype
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        return self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))


class UNetModel(_Encoder):
    """The SD 2.x UNet: eps/v prediction from a noisy latent, a timestep, a text context and (optionally)
    a class label (the x4 upscaler's noise level, unCLIP's image embedding).

    Parameters are the reference's. Accepted but without effect here: image_size (unused there too),
    use_checkpoint (gradient checkpointing saves memory in a training backward pass; inference has none),
    num_heads_upsample, use_new_attention_order and legacy (they only shape the legacy AttentionBlock or,
    for the SpatialTransformer, give the same head split either way), dropout (inference runs in eval mode).
    use_fp16 / use_bf16 only record the intended precision in `dtype_hint`: nothing is cast at construction;
    the loader decides the weights' dtype and forward computes in it.
    """

    def __init__(
        self,
        image_size,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        use_bf16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        disable_self_attentions: Sequence[bool] | None = None,
        num_attention_blocks: Sequence[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None,
    ):
        super().__init__()
        levels = _check_config(dims=dims, use_spatial_transformer=use_spatial_transformer, context_dim=context_dim,
                               n_embed=n_embed, resblock_updown=resblock_updown, num_heads=num_heads,
                               num_head_channels=num_head_channels, num_classes=num_classes,
                               adm_in_channels=adm_in_channels, model_channels=model_channels,
                               channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                               transformer_depth=transformer_depth, num_attention_blocks=num_attention_blocks,
                               disable_self_attentions=disable_self_attentions)
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.dtype_hint = torch.bfloat16 if use_bf16 else torch.float16 if use_fp16 else torch.float32

        time_embed_dim = self._build_embedding(model_channels)
        if isinstance(num_classes, int):
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        elif num_classes == "sequential":
            # unCLIP: an MLP on the (noised) image embedding; nested as the reference, hence label_emb.0.0.
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
            ))
        blocks = _Blocks(time_embed_dim, dropout, context_dim, num_heads, num_head_channels, use_scale_shift_norm,
                         use_linear_in_transformer)
        skip_chans = self._build_encoder(in_channels, model_channels, channel_mult, attention_resolutions,
                                         conv_resample, levels, blocks)
        self._build_middle(skip_chans[-1], levels, blocks, disable_middle_self_attn)
        ch = self._build_decoder(model_channels, channel_mult, attention_resolutions, conv_resample, levels, blocks,
                                 skip_chans)
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )

    def _build_decoder(self, model_channels: int, channel_mult: Sequence[int], attention_resolutions: Sequence[int],
                       conv_resample: bool, levels: "_Levels", blocks: "_Blocks", skip_chans: list[int]) -> int:
        """output_blocks, consuming the encoder's skips; returns the channels of the last one."""
        self.output_blocks = nn.ModuleList()
        ch, ds = skip_chans[-1], 2 ** (len(channel_mult) - 1)
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(levels.res_blocks[level] + 1):
                layers = [blocks.resblock(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions and i < levels.attn_blocks[level]:
                    layers.append(blocks.transformer(ch, levels.depths[level], levels.no_self_attn[level]))
                if level and i == levels.res_blocks[level]:
                    layers.append(Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        return ch

    def _check_inputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
                      y: torch.Tensor | None, control: Sequence[torch.Tensor] | None = None) -> None:
        """One-line SDErrors for inputs the reference would fail on deep inside (or silently misuse)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise SDError(f"UNet input has shape {tuple(x.shape)}; expected (B, {self.in_channels}, h, w)")
        # Any latent size works: Upsample meets each skip connection's size (see Upsample.forward).
        if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] != x.shape[0]):
            raise SDError(f"UNet timesteps have shape {tuple(timesteps.shape)}; expected ({x.shape[0]},) or a scalar")
        if context is None or context.shape[-1] != self.context_dim:
            got = "none" if context is None else f"shape {tuple(context.shape)}"
            raise SDError(f"UNet context: got {got}; expected (B, tokens, {self.context_dim})")
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise SDError(f"ControlNet residuals: got {len(control)}, this UNet takes {len(self.input_blocks) + 1}")
        if (y is None) != (self.num_classes is None):
            raise SDError("UNet class label y: required when num_classes is set, not allowed otherwise "
                          f"(num_classes={self.num_classes!r}, y {'missing' if y is None else 'given'})")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, in_channels, h, w), timesteps (B,) float or long (fractional allowed), context (B, n, context_dim),
        y (B,) long labels or (B, adm_in_channels) -> (B, out_channels, h, w) in x's dtype.

        `control`: a ControlNet's residuals, one per input block and the last for the middle block (as
        ControlNet.forward returns them, already weighted), added to the middle block's output and to
        each skip as the decoder takes it (cldm's ControlledUnetModel).

        Runs in the weights' dtype (the loader's choice); under autocast the weights stay float32 and
        autocast picks per op.
        """
        self._check_inputs(x, timesteps, context, y, control)
        dtype = self.time_embed[0].weight.dtype
        emb = self._embed(timesteps, x.shape[0])  # (B, 4 * mc)
        if isinstance(self.num_classes, int):
            emb = emb + self.label_emb(y.long())
        elif self.num_classes is not None:
            emb = emb + self.label_emb(y.to(dtype))
        h = x.to(dtype)
        context = context.to(dtype)  # (B, n, context_dim)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            h = h + control[-1].to(dtype)
        for block in self.output_blocks:
            skip = skips.pop()
            if control is not None:
                skip = skip + control[len(skips)].to(dtype)  # the residual of the input block that made it
            h = torch.cat([h, skip], dim=1)
            h = block(h, emb, context, out_size=skips[-1].shape[-2:] if skips else None)
        return self.out(h).to(x.dtype)  # (B, out_channels, h, w)
