"""`sd txt2img`: the reference txt2img script's flags, defaults and output layout."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ldm.cli import app
from ldm.batch import options as bopt
from ldm.cli import options as opt
from ldm.errors import SDError


@app.command("txt2img", help="Generate images from a text prompt (the reference's scripts/txt2img.py).")
def txt2img(
    prompt: opt.Prompt = "a professional photograph of an astronaut riding a triceratops",
    negative_prompt: opt.NegativePrompt = "",
    outdir: opt.Outdir = Path("outputs/txt2img-samples"),
    steps: opt.Steps = 50,
    plms: opt.Plms = False,
    dpm: opt.Dpm = False,
    sampler: opt.Sampler = None,
    schedule: opt.Schedule = None,
    fixed_code: opt.FixedCode = False,
    ddim_eta: opt.DdimEta = 0.0,
    n_iter: opt.NIter = 3,
    H: Annotated[int, typer.Option("--H", help="Image height in pixels.")] = 512,
    W: Annotated[int, typer.Option("--W", help="Image width in pixels.")] = 512,
    C: opt.LatentChannels = 4,
    f: opt.Factor = 8,
    n_samples: opt.NSamples = 3,
    n_rows: opt.NRows = 0,
    scale: opt.Scale = 9.0,
    from_file: opt.FromFile = None,
    config: opt.Config = Path("configs/stable-diffusion/v2-inference.yaml"),
    ckpt: opt.Ckpt = None,
    seed: opt.Seed = 42,
    precision: opt.Precision = "auto",
    repeat: opt.Repeat = 1,
    device: opt.Device = "auto",
    torchscript: opt.Torchscript = False,
    ipex: opt.Ipex = None,
    bf16: opt.Bf16 = False,
    compile: opt.Compile = False,
    threads: opt.Threads = None,
    skip_existing: bopt.SkipExisting = False,
    devices: bopt.Devices = None,
    num_nodes: bopt.NumNodes = 1,
    accelerator: bopt.Accelerator = None,
    from_image: bopt.FromImage = None,
) -> None:
    from ldm import generate

    sampler_name = opt.pick_sampler(sampler, plms=plms, dpm=dpm)
    job = generate.Job(
        prompt=prompt, negative_prompt=negative_prompt, from_file=from_file, repeat=repeat,
        n_samples=n_samples, n_iter=n_iter, n_rows=n_rows, seed=seed, fixed_code=fixed_code,
        H=H, W=W, C=C, f=f, outdir=outdir, config=config, ckpt=ckpt, device=device, precision=opt.pick_precision(precision, bf16),
        compile=compile, torchscript=torchscript, ipex=ipex, threads=threads,
        sampling=generate.SamplingSettings(steps=steps, sampler=sampler_name, schedule=schedule, eta=ddim_eta, scale=scale),
        skip_existing=skip_existing, devices=devices, num_nodes=num_nodes, accelerator=accelerator, from_image=from_image,
    )
    generate.run_job(job)
