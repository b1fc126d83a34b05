"""`sd depth2img`: img2img that keeps the input's depth (the reference's depth demo as a command)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.cli.command import generating_command
from ldm.cli.img2img import InitImg, Strength

DepthMap = Annotated[Optional[Path], typer.Option(
    "--depth-map", "--depth_map", help="Use this grayscale image (brighter = nearer) instead of MiDaS's depth.")]
SaveDepth = Annotated[bool, typer.Option(
    "--save-depth", "--save_depth", help="Also write the depth map used as OUTDIR/depth-NNNN.png.")]


@generating_command("depth2img", help="Redraw an image guided by a prompt while keeping its depth (512-depth-ema.ckpt).",
                    outdir=Path("outputs/depth2img-samples"), model_config=Path("configs/stable-diffusion/v2-midas-inference.yaml"),
                    model_needs="a depth checkpoint: --ckpt 512-depth-ema.ckpt")
def depth2img(init_img: InitImg, strength: Strength = 0.9, depth_map: DepthMap = None, save_depth: SaveDepth = False):
    from ldm.modes import Depth2Img

    return Depth2Img(init_img, strength, depth_map=depth_map, save_depth=save_depth)
