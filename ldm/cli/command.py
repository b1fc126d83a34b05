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
from ldm.entry import ready_for_interrupts
from ldm.limits import Limits


def shared_flags(
    prompt: opt.Prompt = "",
    negative_prompt: opt.NegativePrompt = "",
    outdir: opt.Outdir = Path("outputs"),
    steps: opt.Steps = None,
    plms: opt.Plms = False,
    dpm: opt.Dpm = False,
    sampler: opt.Sampler = None,
    schedule: opt.Schedule = None,
    fixed_code: opt.FixedCode = False,
    ddim_eta: opt.DdimEta = 0.0,
    n_iter: opt.NIter = None,
    C: opt.LatentChannels = 4,
    f: opt.Factor = 8,
    n_samples: opt.NSamples = None,
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
    trust_config: opt.TrustConfig = False,
    skip_existing: bopt.SkipExisting = False,
    devices: bopt.Devices = None,
    num_nodes: bopt.NumNodes = 1,
    accelerator: bopt.Accelerator = None,
    from_image: bopt.FromImage = None,
    max_side: opt.MaxSide = Limits.max_side,
    max_steps: opt.MaxSteps = Limits.max_steps,
    max_batch: opt.MaxBatch = Limits.max_batch,
    max_images: opt.MaxImages = Limits.max_images,
) -> None:
    """The flags every generating command takes (the signature is what counts)."""


# Flags whose default depends on the model, resolved once it is chosen: these values, or a command's own,
# for Stable Diffusion checkpoints; ldm.demo.DEMO_DEFAULTS (and a command's demo_defaults) for the demo model.
MODEL_DEPENDENT = {"steps": 50, "n_iter": 1, "n_samples": 1, "scale": 9.0}


def run_command(mode, *, plms: bool, dpm: bool, sampler: Optional[str], schedule: Optional[str], ddim_eta: float,
                defaults: dict, model_config: Optional[Path] = None, model_needs: str = "", **fields) -> None:
    """Run a generating command's mode with the shared flags (prompt, seeds, batching, outdir, model...).

    `defaults` maps each MODEL_DEPENDENT flag to (its default with an SD checkpoint, with the demo model);
    a flag the user gave (not None) keeps its value. An image mode's size is its input's; plain txt2img
    (generate.Txt2Img) takes --H/--W, by default the model's native size."""
    from ldm import generate, modes
    from ldm.demo import choose_model

    model = choose_model(fields.pop("config"), fields.pop("ckpt"), command_config=model_config, command_needs=model_needs)
    fields.update(config=model.config, ckpt=model.ckpt)
    for name, (sd_default, demo_default) in defaults.items():
        if fields[name] is None:
            fields[name] = demo_default if model.demo else sd_default
    steps, scale = fields.pop("steps"), fields.pop("scale")
    sampler_name = opt.pick_sampler(sampler, plms=plms, dpm=dpm)
    fields["precision"] = opt.pick_precision(fields["precision"], fields.pop("bf16"))
    sampling = generate.SamplingSettings(steps=steps, sampler=sampler_name, schedule=schedule, eta=ddim_eta, scale=scale)
    fields["limits"] = Limits(**{name: fields.pop(name) for name in ("max_side", "max_steps", "max_batch", "max_images")})
    if isinstance(mode, modes.ImageMode):
        job = modes.image_job(mode, sampling=sampling, **fields)
    else:
        job = generate.Job(H=model.native_size if mode.H is None else mode.H,
                           W=model.native_size if mode.W is None else mode.W, sampling=sampling, **fields)
    ready_for_interrupts()  # every module is imported: Ctrl-C from now on stops the run cleanly
    generate.run_job(job, mode)


def generating_command(name: str, help: str, fixed: Optional[dict] = None, stochastic_eta: Optional[float] = None,
                       model_config: Optional[Path] = None, model_needs: str = "", demo_defaults: Optional[dict] = None,
                       **defaults) -> Callable:
    """Register `sd NAME` from a function of the command's own flags that returns its Mode (ldm.modes).

    The command takes those flags first, then the shared ones with `defaults` replacing theirs; flags in
    `fixed` are not offered and take the given values (the upscaler's C and f). The MODEL_DEPENDENT flags
    (steps, batch, scale) are resolved once the model is known: `defaults` give them for SD checkpoints,
    ldm.demo.DEMO_DEFAULTS updated by `demo_defaults` for the built-in demo model. With `stochastic_eta`
    (the inpainting demo's DDIM eta 1.0), --ddim_eta defaults to that value for samplers that take an
    eta and to none for the deterministic ones, which refuse any. A command that needs its own kind of
    model gives its config (`model_config`, used with --ckpt when --config is absent) and what it needs
    (`model_needs`, said when no --ckpt is given: the demo model cannot serve it).
    """
    from ldm.demo import DEMO_DEFAULTS

    fixed = fixed or {}
    sd_defaults = {key: defaults.pop(key, value) for key, value in MODEL_DEPENDENT.items()}
    demo = {**sd_defaults, **DEMO_DEFAULTS, **(demo_defaults or {})}
    model_defaults = {key: (sd_defaults[key], demo[key]) for key in MODEL_DEPENDENT}
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
            run_command(mode, **kwargs, **fixed, defaults=model_defaults, model_config=model_config,
                        model_needs=model_needs)

        command.__signature__ = inspect.Signature(own + shared)
        command.__annotations__ = {p.name: p.annotation for p in own + shared}
        command.__name__ = command.__qualname__ = name
        command.model_defaults = model_defaults  # flag -> (default with an SD checkpoint, with the demo model)
        app.command(name, help=help)(command)
        return make_mode

    return register
