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
HiresScale = Annotated[Optional[float], typer.Option(
    "--hires-scale", help="The hires fix (AUTOMATIC1111's): a second img2img pass at this multiple of --H/--W (1-4) "
    "after the first; any --hires-* flag turns it on [default scale 2].")]
HiresSize = Annotated[Optional[str], typer.Option(
    "--hires-resize", help="The hires fix's size WIDTHxHEIGHT instead of --hires-scale (one side 0: it follows the "
    "aspect ratio; both: scaled to cover, then cropped).")]
HiresUpscaler = Annotated[Optional[str], typer.Option(
    "--hires-upscaler", help="Latent [default], Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), "
    "Latent (nearest), Latent (nearest-exact): the latents interpolated; Lanczos, Nearest: the pictures resized and "
    "encoded again.")]
HiresSteps = Annotated[Optional[int], typer.Option(
    "--hires-steps", help="Steps of the second pass's schedule [default: --steps]; it runs the last strength share.")]
HiresStrength = Annotated[Optional[float], typer.Option(
    "--hires-strength", help="Denoising strength of the second pass, 0-1 [default 0.7].")]
HiresX4 = Annotated[Optional[Path], typer.Option(
    "--hires-x4", help="The x4 upscaler's checkpoint (x4-upscaler-ema.ckpt) as the hires fix's upscaler (\"SD x4\": "
    "the first pass through it, then resized); implies --hires-upscaler \"SD x4\".")]
HiresKeepFirst = Annotated[bool, typer.Option(
    "--hires-keep-first", help="Also save the hires fix's first pass, as NNNNN-before-highres-fix.png beside each sample.")]
PriorScale = Annotated[Optional[float], typer.Option(
    "--prior-scale", help="With --prior-ckpt: the prior's guidance scale [default: 4.0].")]


@generating_command("txt2img", help="Generate images from a text prompt (the reference's scripts/txt2img.py).",
                    prompt="a professional photograph of an astronaut riding a triceratops",
                    outdir=Path("outputs/txt2img-samples"), sized=True)
def txt2img(prior_ckpt: PriorCkpt = None, prior_clip: PriorClip = None,
            clip_stats: ClipStats = None, noise_level: NoiseLevel = None, prior_steps: PriorSteps = None,
            prior_scale: PriorScale = None, hires_scale: HiresScale = None, hires_resize: HiresSize = None,
            hires_upscaler: HiresUpscaler = None, hires_steps: HiresSteps = None, hires_strength: HiresStrength = None,
            hires_keep_first: HiresKeepFirst = False, hires_x4: HiresX4 = None):
    from ldm.errors import SDError
    from ldm.tasks import PriorTxt2Img, Txt2Img

    hires = hires_of(hires_scale, hires_resize, hires_upscaler, hires_steps, hires_strength, hires_keep_first, hires_x4)
    if hires is not None:
        if prior_ckpt is not None:
            raise SDError("the hires fix (--hires-*) is a second pass of plain txt2img, not of --prior-ckpt's")
        return Txt2Img(), {"hires": hires}

    if prior_ckpt is None:
        given = [flag for flag, value in (("--prior-clip", prior_clip), ("--clip-stats", clip_stats),
                                          ("--noise-level", noise_level), ("--prior-steps", prior_steps),
                                          ("--prior-scale", prior_scale)) if value is not None]
        if given:
            raise SDError(f"{', '.join(given)} only apply with --prior-ckpt (unCLIP-L text-to-image through the Karlo prior)")
        return Txt2Img()
    return PriorTxt2Img(prior_ckpt=prior_ckpt, prior_clip=prior_clip, clip_stats=clip_stats,
                        noise_level=noise_level or 0, prior_steps=prior_steps, prior_scale=prior_scale)


def hires_of(scale, resize, upscaler, steps, strength, keep_first: bool = False, x4=None):
    """The hires fix of the --hires-* flags (None when none is given; --hires-keep-first alone turns it on too)."""
    from ldm.errors import SDError
    from ldm.hires import Hires

    if all(value is None for value in (scale, resize, upscaler, steps, strength, x4)) and not keep_first:
        return None
    if x4 is not None and upscaler is None:
        upscaler = "SD x4"
    width = height = 0
    if resize is not None:
        w, sep, h = resize.lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit() or (int(w) == 0 and int(h) == 0):
            raise SDError(f"--hires-resize {resize!r} must be WIDTHxHEIGHT (one of them may be 0)")
        width, height = int(w), int(h)
        if scale is not None:
            raise SDError("--hires-scale and --hires-resize both give the size; use one")
    fields = {key: value for key, value in (("scale", scale), ("upscaler", upscaler), ("steps", steps),
                                            ("strength", strength)) if value is not None}
    return Hires(width=width, height=height, keep_first=keep_first, x4=None if x4 is None else str(x4), **fields)
