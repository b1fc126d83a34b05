"""What the generating commands (txt2img, img2img, inpaint, depth2img, upscale) share.

Their common flags are declared once here (`shared_flags`), and `generating_command` registers a command
from a function that takes only the command's own flags and returns its Mode (ldm.modes); each command
sets its own defaults.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Optional

from ldm.cli.app import app
from ldm.cli import options as opt
from ldm.cli.entry import ready_for_interrupts
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
    ddim_eta: opt.DdimEta = None,
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
    emphasis: opt.Emphasis = "original",
    clip_skip: opt.ClipSkip = 1,
    embeddings: opt.Embeddings = None,
    lora: opt.Lora = None,
    lora_dir: opt.LoraDir = None,
    backend: opt.Backend = "torch",
    skip_existing: opt.SkipExisting = False,
    devices: opt.Devices = None,
    num_nodes: opt.NumNodes = 1,
    accelerator: opt.Accelerator = None,
    from_image: opt.FromImage = None,
    max_side: opt.MaxSide = Limits.max_side,
    max_steps: opt.MaxSteps = Limits.max_steps,
    max_batch: opt.MaxBatch = Limits.max_batch,
    max_images: opt.MaxImages = Limits.max_images,
    max_chunks: opt.MaxChunks = Limits.max_chunks,
) -> None:
    """The flags every generating command takes (the signature is what counts)."""


# Flags whose default depends on the task and the model (ldm.loading.families), resolved once the model is chosen.
MODEL_DEPENDENT = ("steps", "n_iter", "n_samples", "scale")
# The shared flags that are ldm.limits.Limits fields, passed on as one Limits.
LIMIT_FLAGS = ("max_side", "max_steps", "max_batch", "max_images", "max_chunks")
# The shared flags that are ldm.runtime.policy.RuntimeOptions fields, passed on as one RuntimeOptions.
RUNTIME_FLAGS = ("device", "precision", "compile", "torchscript", "ipex", "threads", "trust_config", "backend")


def run_command(task, *, plms: bool, dpm: bool, sampler: Optional[str], schedule: Optional[str], **fields) -> None:
    """Run a generating command's task with the shared flags (prompt, seeds, batching, outdir, model...).

    A MODEL_DEPENDENT flag the user left out (None) takes the task's default for the chosen model
    (ldm.loading.families: the reference's for SD checkpoints, the demo model's own). An image task's size is its
    input's; plain txt2img takes --H/--W, by default the model's native size (known once it is loaded)."""
    from ldm.loading import families
    from ldm.batch.run import run_job
    from ldm.loading.detect import choose_files
    from ldm.plan import Job, SamplingSettings
    from ldm.runtime.policy import RuntimeOptions
    from ldm.tasks import ImageTask, image_job

    config, ckpt, demo = choose_files(fields.pop("config"), fields.pop("ckpt"), task.name)
    fields.update(config=config, ckpt=ckpt)
    sampler_name = opt.pick_sampler(sampler, plms=plms, dpm=dpm)
    defaults = families.task_defaults(task.name, demo)
    for name in MODEL_DEPENDENT:
        if fields[name] is None:
            fields[name] = defaults[name]
    sampling = SamplingSettings(steps=fields.pop("steps"), sampler=sampler_name, schedule=schedule,
                                eta=fields.pop("ddim_eta"), scale=fields.pop("scale"))
    fields["precision"] = opt.pick_precision(fields["precision"], fields.pop("bf16"))
    fields["runtime"] = RuntimeOptions(**{name: fields.pop(name) for name in RUNTIME_FLAGS})
    fields["loras"] = tuple(fields.pop("lora") or ())
    fields["limits"] = Limits(**{name: fields.pop(name) for name in LIMIT_FLAGS})
    if isinstance(task, ImageTask):
        job = image_job(task, sampling=sampling, **fields)
    else:
        job = Job(H=task.H, W=task.W, sampling=sampling, **fields)
    ready_for_interrupts()  # every module is imported: Ctrl-C from now on stops the run cleanly
    run_job(job, task)


def generating_command(name: str, help: str, fixed: Optional[dict] = None, **defaults) -> Callable:
    """Register `sd NAME` from a function of the command's own flags that returns its Task (ldm.tasks).

    The command takes those flags first, then the shared ones with `defaults` replacing theirs; flags in
    `fixed` are not offered and take the given values (the upscaler's C and f). The MODEL_DEPENDENT flags
    (steps, batch, scale, eta) default to None and are resolved by run_command from ldm.loading.families.
    """
    fixed = fixed or {}
    defaults.update({key: None for key in MODEL_DEPENDENT})

    def register(make_task: Callable) -> Callable:
        own = list(inspect.signature(make_task, eval_str=True).parameters.values())
        shared = [p.replace(default=defaults.pop(p.name, p.default))
                  for p in inspect.signature(shared_flags, eval_str=True).parameters.values() if p.name not in fixed]
        if defaults:
            raise TypeError(f"unknown defaults for {name}: {sorted(defaults)}")

        def command(**kwargs) -> None:
            task = make_task(**{p.name: kwargs.pop(p.name) for p in own})
            run_command(task, **kwargs, **fixed)

        command.__signature__ = inspect.Signature(own + shared)
        command.__annotations__ = {p.name: p.annotation for p in own + shared}
        command.__name__ = command.__qualname__ = name
        app.command(name, help=help)(command)
        return make_task

    return register
