"""`sd depth2img`: img2img that keeps the input's depth (the reference's depth demo as a command)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.cli.command import generating_command
from ldm.cli.img2img import InitImg, Strength
from ldm.loading.families import SD_DEFAULTS

DepthMap = Annotated[Optional[Path], typer.Option(
    "--depth-map", "--depth_map", help="Use this grayscale image (brighter = nearer) instead of MiDaS's depth.")]
SaveDepth = Annotated[bool, typer.Option(
    "--save-depth", "--save_depth", help="Also write the depth map used as OUTDIR/depth-NNNN.png.")]


@generating_command("depth2img", help="Redraw an image guided by a prompt while keeping its depth (512-depth-ema.ckpt).",
                    outdir=Path("outputs/depth2img-samples"))
def depth2img(init_img: InitImg, strength: Strength = SD_DEFAULTS["depth2img"]["strength"], depth_map: DepthMap = None, save_depth: SaveDepth = False):
    from ldm.tasks import Depth2Img

    task = Depth2Img(init_img, strength, depth_map=depth_map)
    task.save_depth = save_depth
    return task
