"""`sd txt2img`: the reference txt2img script's flags, defaults and output layout."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.cli.command import generating_command

PriorCkpt = Annotated[Optional[Path], typer.Option(
    "--prior-ckpt", "--prior_ckpt", help="unCLIP-L only: Karlo v1 alpha's prior (prior-ckpt-step=01000000-of-01000000.ckpt) "
    "turns the prompt into the image embedding unCLIP-L takes (the reference demo's \"Use KARLO prior\").")]
PriorClip = Annotated[Optional[Path], typer.Option(
    "--prior-clip", "--prior_clip", help="The prior's text encoder, OpenAI's ViT-L-14.pt [default: beside --prior-ckpt, "
    "else unCLIP-L's own copy of the same CLIP].")]
ClipStats = Annotated[Optional[Path], typer.Option(
    "--clip-stats", "--clip_stats", help="ViT-L-14_stats.th, which the prior needs [default: the reference's "
    "checkpoints/karlo_models/, karlo_models/ beside --ckpt, or beside --prior-ckpt].")]
NoiseLevel = Annotated[Optional[int], typer.Option(
    "--noise-level", "--noise_level", help="With --prior-ckpt: noise added to the prior's embedding, 0..999 [default: 0].")]
PriorSteps = Annotated[Optional[int], typer.Option("--prior-steps", help="With --prior-ckpt: the prior's steps [default: 25].")]
PriorScale = Annotated[Optional[float], typer.Option(
    "--prior-scale", help="With --prior-ckpt: the prior's guidance scale [default: 4.0].")]


@generating_command("txt2img", help="Generate images from a text prompt (the reference's scripts/txt2img.py).",
                    prompt="a professional photograph of an astronaut riding a triceratops",
                    outdir=Path("outputs/txt2img-samples"), sized=True)
def txt2img(prior_ckpt: PriorCkpt = None, prior_clip: PriorClip = None,
            clip_stats: ClipStats = None, noise_level: NoiseLevel = None, prior_steps: PriorSteps = None,
            prior_scale: PriorScale = None):
    from ldm.errors import SDError
    from ldm.tasks import PriorTxt2Img, Txt2Img

    if prior_ckpt is None:
        given = [flag for flag, value in (("--prior-clip", prior_clip), ("--clip-stats", clip_stats),
                                          ("--noise-level", noise_level), ("--prior-steps", prior_steps),
                                          ("--prior-scale", prior_scale)) if value is not None]
        if given:
            raise SDError(f"{', '.join(given)} only apply with --prior-ckpt (unCLIP-L text-to-image through the Karlo prior)")
        return Txt2Img()
    return PriorTxt2Img(prior_ckpt=prior_ckpt, prior_clip=prior_clip, clip_stats=clip_stats,
                        noise_level=noise_level or 0, prior_steps=prior_steps, prior_scale=prior_scale)
