"""`sd upscale`: the x4 upscaler (the reference's upscaling demo as a command), tiled when large."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.cli.command import generating_command
from ldm.loading.families import SD_DEFAULTS

Image = Annotated[Path, typer.Option("--image", help="The low-resolution image; the result is 4x per side.")]
NoiseLevel = Annotated[int, typer.Option(
    "--noise-level", "--noise_level", help="Noise added to the input before upscaling, 0..350: more lets the "
    "model invent more detail.")]
Tile = Annotated[Optional[bool], typer.Option(
    "--tile/--no-tile", help="Run on overlapping tiles (default: only when an untiled run would not fit in memory).")]
TileSize = Annotated[int, typer.Option("--tile-size", "--tile_size", help="Tile side in input pixels.")]
TileOverlap = Annotated[Optional[int], typer.Option(
    "--tile-overlap", "--tile_overlap", help="Overlap of neighbouring tiles in input pixels (default: tile size / 4).")]


@generating_command("upscale", help="Enlarge an image 4x per side, guided by a prompt (x4-upscaler-ema.ckpt).",
                    fixed={"C": 4, "f": 4}, outdir=Path("outputs/upscale-samples"))
def upscale(image: Image, noise_level: NoiseLevel = SD_DEFAULTS["upscale"]["noise_level"], tile: Tile = None, tile_size: TileSize = 128,
            tile_overlap: TileOverlap = None):
    from ldm.tasks import Upscale

    return Upscale(image, noise_level, tile=tile, tile_size=tile_size, overlap=tile_overlap)
