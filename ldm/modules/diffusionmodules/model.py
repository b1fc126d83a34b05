"""The KL-autoencoder's convolutional Encoder and Decoder.

Attribute names are the checkpoint keys under first_stage_model.{encoder,decoder}.*; the layout
(down.i.block.j, mid.block_1/attn_1/block_2, up.i.block.j, ...) follows the reference, including its
quirk that decoder `up[i]` is the level with resolution index i although it runs in reverse order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import SDError


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    # GroupNorm with eps 1e-6, as the checkpoints were trained with.
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    # "swish" in the reference: x * sigmoid(x). Its input is always a fresh normalisation output, so
    # without autograd it is overwritten in place: one activation-sized buffer less at the decoder's
    # full-resolution layers (150-300 MB each at 768x768), which is where a run's memory peaks.
    return F.silu(x, inplace=not torch.is_grad_enabled())


class _Resample(nn.Module):
    """Shared constructor of Upsample / Downsample: an optional 3x3 conv with the subclass's stride."""

    stride, padding = 1, 1

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=self.stride, padding=self.padding)


class Upsample(_Resample):
    """Nearest-neighbour x2, then an optional 3x3 conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x) if self.with_conv else x


class Downsample(_Resample):
    """Stride-2 3x3 conv (or 2x2 average pool) that halves H and W."""

    stride, padding = 2, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        # Asymmetric padding (right and bottom only) is what the weights were trained with; a
        # symmetric padding=1 conv would shift the image by half a pixel.
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)
        return self.conv(x)  # (B, C, H/2, W/2)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice plus a (1x1 or 3x3 conv) shortcut when the channel count changes.

    The VAE has no timestep embedding, so the reference's temb path (temb_channels=0 there) is omitted.
    """

    def __init__(self, *, in_channels: int, out_channels: int | None = None, conv_shortcut: bool = False,
                 dropout: float = 0.0, **ignored):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))  # (B, out, H, W)
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        if torch.is_grad_enabled() or h.dtype != x.dtype or h.shape != x.shape:
            return x + h
        return h.add_(x)  # h is fresh: at inference add in place (same result, one buffer less)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 convs as the projections."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_norm = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, H*W, C): one head
            # Contiguous, because SDPA's memory-efficient CPU kernel needs the channel axis dense; on the
            # strided view it falls back to the (HW, HW) matrix: 1 GB at 128x128 latents, 78 GB at 375x375.
            return t.reshape(b, 1, c, h * w).transpose(2, 3).contiguous()

        q, k, v = tokens(self.q(x_norm)), tokens(self.k(x_norm)), tokens(self.v(x_norm))
        # SDPA's default scale is C^-1/2, the reference's; fused kernels avoid the (HW, HW) matrix.
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    # "vanilla-xformers" names the same weights computed by a memory-efficient kernel, which is what
    # SDPA already is; "none" is the reference's identity.
    if attn_type in ("vanilla", "vanilla-xformers"):
        return AttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise SDError(f"VAE attn_type '{attn_type}' is not supported (use 'vanilla', 'vanilla-xformers' or 'none')")


def _attn_type(attn_type: str, use_linear_attn: bool) -> str:
    if use_linear_attn:
        raise SDError("VAE use_linear_attn is not supported (Stable Diffusion 2 VAEs use 'vanilla' attention)")
    return attn_type


def _middle(channels: int, dropout: float, attn_type: str) -> nn.Module:
    """The bottleneck shared by Encoder and Decoder: resnet, attention, resnet (keys mid.block_1/attn_1/block_2)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)
    mid.attn_1 = make_attn(channels, attn_type)
    mid.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)
    return mid


def _level(in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, attn_type: str,
           dropout: float) -> nn.Module:
    """One resolution level: `block` (resnets, the first maps in -> out channels) and `attn` (one per
    resnet at the configured attn_resolutions, else empty); the caller adds down/upsample."""
    level = nn.Module()
    level.block = nn.ModuleList(
        ResnetBlock(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels, dropout=dropout)
        for i in range(num_blocks))
    level.attn = nn.ModuleList(make_attn(out_channels, attn_type) for _ in range(num_blocks if with_attn else 0))
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i_block, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i_block](h)
    return h


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f) with f = 2^(len(ch_mult)-1)."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult=(1, 2, 4, 8), num_res_blocks: int, attn_resolutions,
                 dropout: float = 0.0, resamp_with_conv: bool = True, in_channels: int, resolution: int,
                 z_channels: int, double_z: bool = True, use_linear_attn: bool = False,
                 attn_type: str = "vanilla", **ignore_kwargs):
        super().__init__()
        attn_type = _attn_type(attn_type, use_linear_attn)
        self.num_resolutions = len(ch_mult)

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            down = _level(block_in, block_out, num_res_blocks, curr_res in attn_resolutions, attn_type, dropout)
            block_in = block_out
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = _middle(block_in, dropout, attn_type)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels,
                                  kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for i_level, down in enumerate(self.down):
            h = _run_level(down, h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))  # (B, ch*ch_mult[-1], H/f, W/f)
        return self.conv_out(nonlinearity(self.norm_out(h)))  # (B, 2*z_channels, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f)."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult=(1, 2, 4, 8), num_res_blocks: int, attn_resolutions,
                 dropout: float = 0.0, resamp_with_conv: bool = True, in_channels: int, resolution: int,
                 z_channels: int, give_pre_end: bool = False, tanh_out: bool = False,
                 use_linear_attn: bool = False, attn_type: str = "vanilla", **ignorekwargs):
        super().__init__()
        attn_type = _attn_type(attn_type, use_linear_attn)
        self.num_resolutions = len(ch_mult)
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = _middle(block_in, dropout, attn_type)

        ups = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            up = _level(block_in, block_out, num_res_blocks + 1, curr_res in attn_resolutions, attn_type, dropout)
            block_in = block_out
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            ups.insert(0, up)  # built coarse to fine, stored by level index (the checkpoint's up.i)
        self.up = nn.ModuleList(ups)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, ch*ch_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            h = _run_level(self.up[i_level], h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity(self.norm_out(h)))  # (B, out_ch, h*f, w*f)
        return torch.tanh(h) if self.tanh_out else h
