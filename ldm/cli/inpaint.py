"""`sd inpaint`: repaint the white part of a mask (the reference's inpainting demo as a command)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ldm.cli.command import generating_command
from ldm.cli.img2img import Strength

Image = Annotated[Path, typer.Option("--image", help="The image to edit (any size).")]
Mask = Annotated[Path, typer.Option(
    "--mask", help="White (any bright colour; transparent = black) = repaint, black = keep. A mask of "
    "another size is resized to the image's; its aspect ratio must match within 1%.")]


@generating_command("inpaint", help="Repaint the masked part of an image. An inpainting checkpoint uses its 9-channel "
                    "UNet; any txt2img checkpoint inpaints by latent blending. Unmasked pixels are kept exactly.",
                    outdir=Path("outputs/inpaint-samples"))
def inpaint(image: Image, mask: Mask, strength: Strength = 1.0):
    from ldm.tasks import Inpaint

    return Inpaint(image, mask, strength)
