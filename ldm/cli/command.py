"""What the generating commands (txt2img, img2img, inpaint, depth2img, upscale) share.

Their common flags are declared once here (`shared_flags`), and `generating_command` registers a command
from a function that takes only the command's own flags and returns its Mode (ldm.modes); each command
sets its own defaults.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Optional

from ldm.batch import options as bopt
from ldm.cli import app
from ldm.cli import options as opt


def shared_flags(
    prompt: opt.Prompt = "",
    negative_prompt: opt.NegativePrompt = "",
    outdir: opt.Outdir = Path("outputs"),
    steps: opt.Steps = 50,
    plms: opt.Plms = False,
    dpm: opt.Dpm = False,
    sampler: opt.Sampler = None,
    schedule: opt.Schedule = None,
    fixed_code: opt.FixedCode = False,
    ddim_eta: opt.DdimEta = 0.0,
    n_iter: opt.NIter = 1,
    C: opt.LatentChannels = 4,
    f: opt.Factor = 8,
    n_samples: opt.NSamples = 1,
    n_rows: opt.NRows = 0,
    scale: opt.Scale = None,
    from_file: opt.FromFile = None,
    config: opt.Config = None,
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
    """The flags every generating command takes (the signature is what counts)."""


def run_command(mode, *, steps: int, plms: bool, dpm: bool, sampler: Optional[str], schedule: Optional[str],
                ddim_eta: float, scale: Optional[float], scale_default: float,
                model_config: Optional[Path] = None, model_needs: str = "", **fields) -> None:
    """Run a generating command's mode with the shared flags (prompt, seeds, batching, outdir, model...).

    An image mode's size is its input's; plain txt2img (generate.Txt2Img) takes --H/--W, by default the
    model's native size."""
    from ldm import generate, modes
    from ldm.demo import DEMO_SCALE, choose_model

    model = choose_model(fields.pop("config"), fields.pop("ckpt"), command_config=model_config, command_needs=model_needs)
    fields.update(config=model.config, ckpt=model.ckpt)
    if scale is None:
        scale = DEMO_SCALE if model.demo else scale_default
    sampler_name = opt.pick_sampler(sampler, plms=plms, dpm=dpm)
    fields["precision"] = opt.pick_precision(fields["precision"], fields.pop("bf16"))
    sampling = generate.SamplingSettings(steps=steps, sampler=sampler_name, schedule=schedule, eta=ddim_eta, scale=scale)
    if isinstance(mode, modes.ImageMode):
        job = modes.image_job(mode, sampling=sampling, **fields)
    else:
        job = generate.Job(H=mode.H or model.native_size, W=mode.W or model.native_size, sampling=sampling, **fields)
    generate.run_job(job, mode)


def generating_command(name: str, help: str, fixed: Optional[dict] = None, stochastic_eta: Optional[float] = None,
                       model_config: Optional[Path] = None, model_needs: str = "", **defaults) -> Callable:
    """Register `sd NAME` from a function of the command's own flags that returns its Mode (ldm.modes).

    The command takes those flags first, then the shared ones with `defaults` replacing theirs; flags in
    `fixed` are not offered and take the given values (the upscaler's C and f). With `stochastic_eta`
    (the inpainting demo's DDIM eta 1.0), --ddim_eta defaults to that value for samplers that take an
    eta and to none for the deterministic ones, which refuse any. A command that needs its own kind of
    model gives its config (`model_config`, used with --ckpt when --config is absent) and what it needs
    (`model_needs`, said when no --ckpt is given: the demo model cannot serve it).
    """
    fixed = fixed or {}
    scale_default = float(defaults.pop("scale", 9.0))  # applied at run time: the demo model has its own
    if stochastic_eta is not None:
        defaults["ddim_eta"] = None

    def register(make_mode: Callable) -> Callable:
        own = list(inspect.signature(make_mode, eval_str=True).parameters.values())
        shared = [p.replace(default=defaults.pop(p.name, p.default))
                  for p in inspect.signature(shared_flags, eval_str=True).parameters.values() if p.name not in fixed]
        if defaults:
            raise TypeError(f"unknown defaults for {name}: {sorted(defaults)}")

        def command(**kwargs) -> None:
            mode = make_mode(**{p.name: kwargs.pop(p.name) for p in own})
            if kwargs.get("ddim_eta") is None:
                from ldm.models.diffusion.samplers import check_sampler

                sampler = opt.pick_sampler(kwargs["sampler"], plms=kwargs["plms"], dpm=kwargs["dpm"])
                kwargs["ddim_eta"] = stochastic_eta if check_sampler(sampler).eta is not None else 0.0
            run_command(mode, **kwargs, **fixed, scale_default=scale_default, model_config=model_config,
                        model_needs=model_needs)

        command.__signature__ = inspect.Signature(own + shared)
        command.__annotations__ = {p.name: p.annotation for p in own + shared}
        command.__name__ = command.__qualname__ = name
        command.scale_default = scale_default  # what --scale (default None) becomes with an SD checkpoint
        app.command(name, help=help)(command)
        return make_mode

    return register
