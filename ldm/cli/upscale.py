"""`sd upscale`: the x4 upscaler (the reference's upscaling demo as a command), tiled when large."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.cli import app
from ldm.cli import options as opt
from ldm.cli.img2img import NIter, NSamples, Steps, run_image_command

Image = Annotated[Path, typer.Option("--image", help="The low-resolution image; the result is 4x per side.")]
NoiseLevel = Annotated[int, typer.Option(
    "--noise-level", "--noise_level", help="Noise added to the input before upscaling, 0..350: more lets the "
    "model invent more detail.")]
Tile = Annotated[Optional[bool], typer.Option(
    "--tile/--no-tile", help="Run on overlapping tiles (default: only when an untiled run would not fit in memory).")]
TileSize = Annotated[int, typer.Option("--tile-size", "--tile_size", help="Tile side in input pixels.")]
TileOverlap = Annotated[Optional[int], typer.Option(
    "--tile-overlap", "--tile_overlap", help="Overlap of neighbouring tiles in input pixels (default: tile size / 4).")]


@app.command("upscale", help="Enlarge an image 4x per side, guided by a prompt (x4-upscaler-ema.ckpt).")
def upscale(
    image: Image,
    prompt: opt.Prompt = "",
    negative_prompt: opt.NegativePrompt = "",
    noise_level: NoiseLevel = 20,
    tile: Tile = None,
    tile_size: TileSize = 128,
    tile_overlap: TileOverlap = None,
    outdir: opt.Outdir = Path("outputs/upscale-samples"),
    steps: Steps = 75,
    plms: opt.Plms = False,
    dpm: opt.Dpm = False,
    sampler: opt.Sampler = None,
    schedule: opt.Schedule = None,
    fixed_code: opt.FixedCode = False,
    ddim_eta: opt.DdimEta = 0.0,
    n_iter: NIter = 1,
    n_samples: NSamples = 1,
    n_rows: opt.NRows = 0,
    scale: opt.Scale = 10.0,
    from_file: opt.FromFile = None,
    config: opt.Config = Path("configs/stable-diffusion/x4-upscaling.yaml"),
    ckpt: opt.Ckpt = None,
    seed: opt.Seed = 42,
    precision: opt.Precision = "autocast",
    repeat: opt.Repeat = 1,
    device: opt.Device = "auto",
) -> None:
    from ldm.modes import Upscale

    run_image_command(
        Upscale(image, noise_level, tile=tile, tile_size=tile_size, overlap=tile_overlap), steps=steps, plms=plms,
        dpm=dpm, sampler=sampler, schedule=schedule, ddim_eta=ddim_eta, scale=scale, prompt=prompt,
        negative_prompt=negative_prompt, from_file=from_file, repeat=repeat, n_samples=n_samples, n_iter=n_iter,
        n_rows=n_rows, seed=seed, fixed_code=fixed_code, C=4, f=4, outdir=outdir, config=config, ckpt=ckpt,
        device=device, precision=precision)
