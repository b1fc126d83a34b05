"""Tiled evaluation for images too large to run whole: overlapping tiles blended with a smooth window.

One rule serves the UNet and the VAE decoder: a function of a latent tile is evaluated on overlapping
tiles of `tile` x `tile` latent cells (neighbours share `overlap` cells), each output tile (`scale`
times larger: 1 for the UNet, the first stage's factor for the decoder) is weighted by a window that
rises smoothly (raised cosine) across the shared band and is flat elsewhere, and the weighted sum is
divided by the summed weights. Tile borders on the image border are not faded, so every output pixel has
a positive weight and a pixel covered by one tile gets exactly that tile's value.

Tiling the UNet at `apply_model` is exact in what the sampler sees: the denoiser's x0 is, per image,
`A(sigma) * x + B(sigma) * model_output` with coefficients that do not vary across pixels, so blending
the model outputs of the tiles is the same as blending their x0 (or eps, or v) with the same weights.
What tiles cannot keep is context: attention and GroupNorm see one tile at a time.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Mapping, Optional

import torch

TileFn = Callable[[torch.Tensor, slice, slice], torch.Tensor]


def spans(size: int, tile: int, overlap: int) -> list[slice]:
    """Start/stop of tiles of length `tile` covering 0..size, neighbours overlapping by at least `overlap`.

    Tiles start every `tile - overlap` cells; the last one is moved back to end at `size` (so it may
    overlap its neighbour by more). A size that fits in one tile gives one span.
    """
    if tile >= size:
        return [slice(0, size)]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile {tile})")
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    return [slice(s, s + tile) for s in starts]


def _ramp(length: int, fade_start: int, fade_end: int) -> torch.Tensor:
    """(length,) weights: raised-cosine rise over the first `fade_start` cells, fall over the last
    `fade_end`, 1 in between. Values are sampled at cell centres, so none is 0."""
    w = torch.ones(length, dtype=torch.float64)
    for n, flip in ((fade_start, False), (fade_end, True)):
        n = min(n, length)
        if n > 0:
            rise = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / (n + 0.0))
            rise = rise.flip(0) if flip else rise
            if flip:
                w[length - n:] *= rise
            else:
                w[:n] *= rise
    return w


def _fades(index: int, all_spans: list[slice], scale: int) -> tuple[int, int]:
    """How many output cells tile `index` fades in and out: its overlap with the previous / next tile."""
    s = all_spans[index]
    before = all_spans[index - 1].stop - s.start if index > 0 else 0
    after = s.stop - all_spans[index + 1].start if index + 1 < len(all_spans) else 0
    return before * scale, after * scale


def tiled(fn: TileFn, x: torch.Tensor, tile: int, overlap: int, scale: int = 1) -> torch.Tensor:
    """Evaluate `fn(x_tile, rows, cols)` on overlapping tiles of x (B, C, h, w) and blend the results.

    `fn` gets the tile and the latent row/column slices it was cut from (to cut matching conditioning)
    and returns (B, C', tile_h * scale, tile_w * scale). Returns (B, C', h * scale, w * scale).
    """
    h, w = x.shape[-2:]
    rows, cols = spans(h, tile, overlap), spans(w, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x, rows[0], cols[0])
    out: Optional[torch.Tensor] = None
    total: Optional[torch.Tensor] = None
    for i, r in enumerate(rows):
        wy = _ramp((r.stop - r.start) * scale, *_fades(i, rows, scale))
        for j, c in enumerate(cols):
            wx = _ramp((c.stop - c.start) * scale, *_fades(j, cols, scale))
            y = fn(x[..., r, c], r, c)  # (B, C', th * scale, tw * scale)
            if out is None:  # accumulate in at least float32, whatever the tiles' dtype
                acc = torch.promote_types(y.dtype, torch.float32)
                out = torch.zeros((*y.shape[:2], h * scale, w * scale), dtype=acc, device=x.device)
                total = torch.zeros((h * scale, w * scale), dtype=acc, device=x.device)
            window = (wy[:, None] * wx[None, :]).to(out)  # (th * scale, tw * scale)
            ys, xs = slice(r.start * scale, r.stop * scale), slice(c.start * scale, c.stop * scale)
            out[..., ys, xs] += y.to(out) * window
            total[ys, xs] += window
    return (out / total).to(y.dtype)


def crop_spatial(cond: Mapping[str, Optional[torch.Tensor]], size: tuple[int, int], rows: slice, cols: slice) -> dict:
    """The conditioning of one tile: tensors laid out over the latent grid (B, C, h, w), like c_concat,
    are cut to the tile; the others (text context, class labels) are shared by every tile."""
    out = {}
    for key, value in cond.items():
        spatial = isinstance(value, torch.Tensor) and value.ndim == 4 and tuple(value.shape[-2:]) == tuple(size)
        out[key] = value[..., rows, cols] if spatial else value
    return out


class TiledApplyModel:
    """`apply_model(x_t, t, cond)` evaluated on overlapping latent tiles (see the module docstring)."""

    def __init__(self, apply_model: Callable, tile: int, overlap: int):
        self.apply_model, self.tile, self.overlap = apply_model, tile, overlap

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Mapping) -> torch.Tensor:
        size = tuple(x_t.shape[-2:])
        return tiled(lambda x, r, c: self.apply_model(x, t, crop_spatial(cond, size, r, c)), x_t, self.tile, self.overlap)


class TiledDecoder:
    """`decode_first_stage(z)` on overlapping latent tiles, blended in pixels."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], factor: int, tile: int, overlap: int):
        self.decode, self.factor, self.tile, self.overlap = decode, factor, tile, overlap

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return tiled(lambda x, r, c: self.decode(x), z, self.tile, self.overlap, scale=self.factor)


# -- does an untiled run fit? -----------------------------------------------------------------------

def available_memory() -> int:
    """Bytes the kernel reports as available (MemAvailable), or the physical total if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# Peak activation memory, measured on the full-size x4 upscaler (random weights, float32, CPU) by one
# UNet call (batch 2, i.e. with guidance) at latent 32, 64 and 96 and one VAE decode at latent 32, 64 and
# 128 per side: the UNet holds about 17 float32 tensors of model_channels per latent cell and image; the
# decoder about 4.5 of its full-resolution width per output pixel, plus its middle attention, which on
# the CPU holds two (N, N) float32 matrices for N latent cells (2.5 GiB at 128x128: measured 2.497).
UNET_LIVE_TENSORS = 17.0
DECODER_LIVE_TENSORS = 4.5
DECODER_ATTENTION_MATRICES = 2


def untiled_peak_bytes(model, latent_h: int, latent_w: int, batch: int, guided: bool) -> int:
    """Estimate of the activation memory of the larger of one untiled UNet call and one untiled VAE decode.

    For the x4 upscaler at 512x512 -> 2048x2048 this gives about 8.5 GiB for the UNet with guidance and
    about 0.5 TiB for the decoder (its attention over 262144 cells), so such a run is tiled; 128x128
    tiles need about 0.5 GiB (UNet) and 2.5 GiB (decoder) on top of the weights.
    """
    unet = model.model.diffusion_model
    width = model.first_stage_model.decoder.conv_out.in_channels  # decoder channels at full resolution
    f = model.downsampling_factor
    cells = latent_h * latent_w
    unet_bytes = 4 * batch * (2 if guided else 1) * unet.model_channels * cells * UNET_LIVE_TENSORS
    decoder_bytes = batch * (4 * cells * f * f * width * DECODER_LIVE_TENSORS + 4 * DECODER_ATTENTION_MATRICES * cells ** 2)
    return int(max(unet_bytes, decoder_bytes))
