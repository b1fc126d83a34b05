"""`sd inpaint`: repaint the white part of a mask (the reference's inpainting demo as a command)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ldm.cli import app
from ldm.cli import options as opt
from ldm.cli.img2img import NIter, NSamples, Steps, run_image_command

Image = Annotated[Path, typer.Option("--image", help="The image to edit (any size).")]
Mask = Annotated[Path, typer.Option(
    "--mask", help="White (any bright colour; transparent = black) = repaint, black = keep. A mask of "
    "another size is resized to the image's; its aspect ratio must match within 1%.")]


@app.command("inpaint", help="Repaint the masked part of an image. An inpainting checkpoint uses its 9-channel "
             "UNet; any txt2img checkpoint inpaints by latent blending. Unmasked pixels are kept exactly.")
def inpaint(
    image: Image,
    mask: Mask,
    prompt: opt.Prompt = "",
    negative_prompt: opt.NegativePrompt = "",
    outdir: opt.Outdir = Path("outputs/inpaint-samples"),
    steps: Steps = 45,
    plms: opt.Plms = False,
    dpm: opt.Dpm = False,
    sampler: opt.Sampler = None,
    schedule: opt.Schedule = None,
    fixed_code: opt.FixedCode = False,
    ddim_eta: opt.DdimEta = 1.0,
    n_iter: NIter = 1,
    C: opt.LatentChannels = 4,
    f: opt.Factor = 8,
    n_samples: NSamples = 4,
    n_rows: opt.NRows = 0,
    scale: opt.Scale = 10.0,
    from_file: opt.FromFile = None,
    config: opt.Config = Path("configs/stable-diffusion/v2-inpainting-inference.yaml"),
    ckpt: opt.Ckpt = None,
    seed: opt.Seed = 42,
    precision: opt.Precision = "autocast",
    repeat: opt.Repeat = 1,
    device: opt.Device = "auto",
) -> None:
    from ldm.modes import Inpaint

    run_image_command(
        Inpaint(image, mask), steps=steps, plms=plms, dpm=dpm, sampler=sampler, schedule=schedule,
        ddim_eta=ddim_eta, scale=scale, prompt=prompt, negative_prompt=negative_prompt, from_file=from_file,
        repeat=repeat, n_samples=n_samples, n_iter=n_iter, n_rows=n_rows, seed=seed, fixed_code=fixed_code, C=C,
        f=f, outdir=outdir, config=config, ckpt=ckpt, device=device, precision=precision)
