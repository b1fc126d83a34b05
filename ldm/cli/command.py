"""What the generating commands (txt2img, img2img, inpaint, depth2img, upscale) share.

Their common flags are declared once here (`shared_flags`), and `generating_command` registers a command
from a function that takes only the command's own flags and returns its Task (ldm.tasks); each command
sets its own defaults. `run_command` turns the flags into a Request (ldm.request) inside a BatchJob
(ldm.batch.job) and runs it.
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
    preset: opt.Preset = None,
    taesd: opt.Taesd = None,
    decode: opt.Decode = "full",
    encode: opt.Encode = "full",
    tome: opt.Tome = 0.0,
    controlnet: opt.ControlNetFiles = None,
    control_image: opt.ControlImages = None,
    control_module: opt.ControlModules = None,
    control_start: opt.ControlStarts = None,
    control_end: opt.ControlEnds = None,
    control_mode: opt.ControlModes = None,
    control_resize: opt.ControlResizes = None,
    control_midas: opt.ControlMidas = None,
    max_side: opt.MaxSide = Limits.max_side,
    max_steps: opt.MaxSteps = Limits.max_steps,
    max_batch: opt.MaxBatch = Limits.max_batch,
    max_images: opt.MaxImages = Limits.max_images,
    max_chunks: opt.MaxChunks = Limits.max_chunks,
) -> None:
    """The flags every generating command takes (the signature is what counts)."""


# The shared flags that are ldm.limits.Limits fields, passed on as one Limits.
LIMIT_FLAGS = ("max_side", "max_steps", "max_batch", "max_images", "max_chunks")
# The shared flags that are ldm.runtime.policy.RuntimeOptions fields, passed on as one RuntimeOptions.
RUNTIME_FLAGS = ("device", "precision", "compile", "torchscript", "ipex", "threads", "trust_config", "backend")
# The shared flags that are the batch layer's own options (ldm.batch.job.BatchJob).
BATCH_FLAGS = ("outdir", "from_file", "repeat", "n_rows", "skip_existing", "devices", "num_nodes", "accelerator",
               "from_image", "taesd", "control_midas")


def run_command(task, *, plms: bool, dpm: bool, sampler: Optional[str], schedule: Optional[str],
                H: Optional[int] = None, W: Optional[int] = None, request_fields: Optional[dict] = None,
                **flags) -> None:
    """Run a generating command's task with the shared flags (prompt, seeds, batching, outdir, model...).

    Flags left out (None) take the task's default for the chosen model (Request.resolved: the reference's
    for SD checkpoints, the demo model's own); --H/--W left out, the model's native size once it is loaded."""
    from ldm.batch.job import BatchJob
    from ldm.batch.run import run_job
    from ldm.loading.detect import choose_files
    from ldm.request import Request, SamplingSettings
    from ldm.runtime.policy import RuntimeOptions

    config, ckpt, demo = choose_files(flags.pop("config"), flags.pop("ckpt"), task.name)
    flags["precision"] = opt.pick_precision(flags["precision"], flags.pop("bf16"))
    runtime = RuntimeOptions(**{name: flags.pop(name) for name in RUNTIME_FLAGS})
    batch = {name: flags.pop(name) for name in BATCH_FLAGS}
    sampling = SamplingSettings(steps=flags.pop("steps"), sampler=opt.pick_sampler(sampler, plms=plms, dpm=dpm),
                                schedule=schedule, eta=flags.pop("ddim_eta"), scale=flags.pop("scale"))
    request = Request(
        prompt=flags.pop("prompt"), negative_prompt=flags.pop("negative_prompt"), task=task, seed=flags.pop("seed"),
        fixed_seed=flags.pop("fixed_code"), width=W, height=H, sampling=sampling, batch_size=flags.pop("n_samples"),
        n_iter=flags.pop("n_iter"), emphasis=flags.pop("emphasis"), clip_skip=flags.pop("clip_skip"),
        loras=tuple(flags.pop("lora") or ()), lora_dir=flags.pop("lora_dir"), embeddings=flags.pop("embeddings"),
        C=flags.pop("C"), f=flags.pop("f"), preset=flags.pop("preset"), decode=flags.pop("decode"),
        encode=flags.pop("encode"), tome=flags.pop("tome"),
        control=opt.control_units(*(flags.pop(key) for key in (
            "controlnet", "control_image", "control_module", "control_start", "control_end", "control_mode",
            "control_resize"))),
        **(request_fields or {}),
        limits=Limits(**{name: flags.pop(name) for name in LIMIT_FLAGS}))
    if flags:
        raise TypeError(f"flags not passed on: {sorted(flags)}")
    resolved = request.resolved(demo, ckpt)
    if not demo and resolved.preset == "turbo" and request.preset in (None, "auto"):
        from ldm.errors import note

        s = resolved.sampling
        note(f"{Path(ckpt).name}: its name says turbo, so what you left out takes SD-Turbo's defaults ({s.steps} "
             f"step(s), scale {s.scale:g}, {s.sampler}, {s.schedule} schedule); --preset sd for SD 2's")
    job = BatchJob(resolved, ckpt, config, runtime, names=opt.FLAG_NAMES, **batch)
    ready_for_interrupts()  # every module is imported: Ctrl-C from now on stops the run cleanly
    run_job(job)


def generating_command(name: str, help: str, fixed: Optional[dict] = None, sized: bool = False, **defaults) -> Callable:
    """Register `sd NAME` from a function of the command's own flags that returns its Task (ldm.tasks).

    The command takes those flags first (with sized=True also --H/--W, the request's size), then the shared
    ones with `defaults` replacing theirs; flags in `fixed` are not offered and take the given values (the
    upscaler's C and f). Steps, batch, scale and eta default to None: Request.resolved fills them per model.
    The function may return (task, {Request field: value}) for Request fields of its own flags.
    """
    fixed = fixed or {}

    def register(make_task: Callable) -> Callable:
        own = list(inspect.signature(make_task, eval_str=True).parameters.values())
        size = [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
                for key, annotation in (("H", opt.Height), ("W", opt.Width))] if sized else []
        shared = [p.replace(default=defaults.pop(p.name, p.default))
                  for p in inspect.signature(shared_flags, eval_str=True).parameters.values() if p.name not in fixed]
        if defaults:
            raise TypeError(f"unknown defaults for {name}: {sorted(defaults)}")

        def command(**kwargs) -> None:
            made = make_task(**{p.name: kwargs.pop(p.name) for p in own})
            # a command's own Request fields come with its task (txt2img's hires fix)
            task, fields = made if isinstance(made, tuple) else (made, {})
            run_command(task, **kwargs, **fixed, request_fields=fields)

        params = own + size + shared
        command.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__ = command.__qualname__ = name
        app.command(name, help=help)(command)
        return make_task

    return register
