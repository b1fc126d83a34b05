"""`sd variations`: Stable unCLIP image variations and mixes (the reference's Stable unCLIP demo as a command)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.cli.command import generating_command
from ldm.loading.families import SD_DEFAULTS

Images = Annotated[list[Path], typer.Option(
    "--image", help="An input picture; repeat to mix several (their CLIP embeddings are averaged by --weight).")]
Weights = Annotated[Optional[list[float]], typer.Option(
    "--weight", help="The weight of each --image, in order (default: equal); the mix is sum(w e) / sum(w).")]
NoiseLevel = Annotated[int, typer.Option(
    "--noise-level", "--noise_level", help="Noise added to the image embedding, 0..999: 0 stays closest to the "
    "pictures, higher strays further (and lets the prompt say more).")]
ClipStats = Annotated[Optional[Path], typer.Option(
    "--clip-stats", "--clip_stats", help="ViT-L-14_stats.th (Karlo v1 alpha's CLIP statistics): unCLIP-L needs it above "
    "noise level 0 [default: checkpoints/karlo_models/ViT-L-14_stats.th, else karlo_models/ beside --ckpt].")]


@generating_command("variations", help="Variations of a picture, or a weighted mix of several, with a Stable unCLIP "
                    "checkpoint (sd21-unclip-h.ckpt / sd21-unclip-l.ckpt); the prompt is optional.",
                    outdir=Path("outputs/variations-samples"), sized=True)
def variations(image: Images, weight: Weights = None,
               noise_level: NoiseLevel = SD_DEFAULTS["variations"]["noise_level"], clip_stats: ClipStats = None):
    from ldm.tasks import Variations

    return Variations(image, weight, noise_level, clip_stats)
