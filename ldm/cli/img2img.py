"""`sd img2img`: the reference's scripts/img2img.py flags and defaults, on the shared run loop.

Also the options the image commands (img2img, inpaint, depth2img, upscale) share beyond ldm.cli.options,
and `run_image_command`, which turns their common flags into a Job.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.cli import app
from ldm.cli import options as opt

Steps = Annotated[int, typer.Option("--steps", "--ddim_steps", "--ddim-steps", help="Number of sampling steps.")]
NIter = Annotated[int, typer.Option("--n_iter", "--n-iter", help="Sample this often.")]
NSamples = Annotated[int, typer.Option("--n_samples", "--n-samples", help="Images per batch (batch size).")]
InitImg = Annotated[Path, typer.Option("--init-img", "--init_img", help="The input image (any size; sides are "
                                       "shrunk to multiples of 8).")]
Strength = Annotated[float, typer.Option(
    "--strength", help="How much of the input is redone, 0..1: 0 returns it, 1 ignores it (runs int(strength * steps) steps).")]


def run_image_command(mode, *, steps: int, plms: bool, dpm: bool, sampler: Optional[str], schedule: Optional[str],
                      ddim_eta: float, scale: float, **fields) -> None:
    """Run an image command's mode with the shared flags (prompt, seeds, batching, outdir, model...)."""
    from ldm import generate, modes

    sampler_name = opt.pick_sampler(sampler, plms=plms, dpm=dpm)
    job = modes.image_job(mode, sampling=generate.SamplingSettings(
        steps=steps, sampler=sampler_name, schedule=schedule, eta=ddim_eta, scale=scale), **fields)
    generate.run_job(job, mode)


@app.command("img2img", help="Redraw an image guided by a prompt (the reference's scripts/img2img.py).")
def img2img(
    init_img: InitImg,
    prompt: opt.Prompt = "a painting of a virus monster playing guitar",
    negative_prompt: opt.NegativePrompt = "",
    strength: Strength = 0.8,
    outdir: opt.Outdir = Path("outputs/img2img-samples"),
    steps: Steps = 50,
    plms: opt.Plms = False,
    dpm: opt.Dpm = False,
    sampler: opt.Sampler = None,
    schedule: opt.Schedule = None,
    fixed_code: opt.FixedCode = False,
    ddim_eta: opt.DdimEta = 0.0,
    n_iter: NIter = 1,
    C: opt.LatentChannels = 4,
    f: opt.Factor = 8,
    n_samples: NSamples = 2,
    n_rows: opt.NRows = 0,
    scale: opt.Scale = 9.0,
    from_file: opt.FromFile = None,
    config: opt.Config = Path("configs/stable-diffusion/v2-inference.yaml"),
    ckpt: opt.Ckpt = None,
    seed: opt.Seed = 42,
    precision: opt.Precision = "autocast",
    repeat: opt.Repeat = 1,
    device: opt.Device = "auto",
) -> None:
    from ldm.modes import Img2Img

    mode = Img2Img(init_img, strength)
    run_image_command(
        mode, steps=steps, plms=plms, dpm=dpm, sampler=sampler, schedule=schedule, ddim_eta=ddim_eta, scale=scale,
        prompt=prompt, negative_prompt=negative_prompt, from_file=from_file, repeat=repeat, n_samples=n_samples,
        n_iter=n_iter, n_rows=n_rows, seed=seed, fixed_code=fixed_code, C=C, f=f, outdir=outdir, config=config,
        ckpt=ckpt, device=device, precision=precision)
