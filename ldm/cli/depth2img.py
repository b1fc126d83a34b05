"""`sd depth2img`: img2img that keeps the input's depth (the reference's depth demo as a command)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.cli import app
from ldm.cli import options as opt
from ldm.cli.img2img import InitImg, NIter, NSamples, Steps, Strength, run_image_command

DepthMap = Annotated[Optional[Path], typer.Option(
    "--depth-map", "--depth_map", help="Use this grayscale image (brighter = nearer) instead of MiDaS's depth.")]
SaveDepth = Annotated[bool, typer.Option(
    "--save-depth", "--save_depth", help="Also write the depth map used as OUTDIR/depth-NNNN.png.")]


@app.command("depth2img", help="Redraw an image guided by a prompt while keeping its depth (512-depth-ema.ckpt).")
def depth2img(
    init_img: InitImg,
    prompt: opt.Prompt = "",
    negative_prompt: opt.NegativePrompt = "",
    strength: Strength = 0.9,
    depth_map: DepthMap = None,
    save_depth: SaveDepth = False,
    outdir: opt.Outdir = Path("outputs/depth2img-samples"),
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
    n_samples: NSamples = 1,
    n_rows: opt.NRows = 0,
    scale: opt.Scale = 9.0,
    from_file: opt.FromFile = None,
    config: opt.Config = Path("configs/stable-diffusion/v2-midas-inference.yaml"),
    ckpt: opt.Ckpt = None,
    seed: opt.Seed = 42,
    precision: opt.Precision = "autocast",
    repeat: opt.Repeat = 1,
    device: opt.Device = "auto",
) -> None:
    from ldm.modes import Depth2Img

    run_image_command(
        Depth2Img(init_img, strength, depth_map=depth_map, save_depth=save_depth), steps=steps, plms=plms, dpm=dpm,
        sampler=sampler, schedule=schedule, ddim_eta=ddim_eta, scale=scale, prompt=prompt,
        negative_prompt=negative_prompt, from_file=from_file, repeat=repeat, n_samples=n_samples, n_iter=n_iter,
        n_rows=n_rows, seed=seed, fixed_code=fixed_code, C=C, f=f, outdir=outdir, config=config, ckpt=ckpt,
        device=device, precision=precision)
