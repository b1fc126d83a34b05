"""`sd img2img`: the reference's scripts/img2img.py flags and defaults, on the shared run loop."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ldm.cli.command import generating_command
from ldm.loading.families import SD_DEFAULTS

InitImg = Annotated[Path, typer.Option("--init-img", "--init_img", help="The input image (any size; sides are "
                                            "shrunk to multiples of 8).")]
Strength = Annotated[float, typer.Option(
    "--strength", help="How much of the input is redone, 0..1: 0 returns it, 1 ignores it (runs int(strength * steps) steps).")]


@generating_command("img2img", help="Redraw an image guided by a prompt (the reference's scripts/img2img.py).",
                    prompt="a painting of a virus monster playing guitar", outdir=Path("outputs/img2img-samples"))
def img2img(init_img: InitImg, strength: Strength = SD_DEFAULTS["img2img"]["strength"]):
    from ldm.tasks import Img2Img

    return Img2Img(init_img, strength)
