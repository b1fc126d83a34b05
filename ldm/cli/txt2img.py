"""`sd txt2img`: the reference txt2img script's flags, defaults and output layout."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.cli.command import generating_command

Height = Annotated[Optional[int], typer.Option("--H", help="Image height in pixels [default: 512; 256 with the demo model].")]
Width = Annotated[Optional[int], typer.Option("--W", help="Image width in pixels [default: 512; 256 with the demo model].")]


@generating_command("txt2img", help="Generate images from a text prompt (the reference's scripts/txt2img.py).",
                    prompt="a professional photograph of an astronaut riding a triceratops",
                    outdir=Path("outputs/txt2img-samples"))
def txt2img(H: Height = None, W: Width = None):
    from ldm.tasks import Txt2Img

    return Txt2Img(H, W)
