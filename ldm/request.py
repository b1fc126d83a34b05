"""What one call to a model asks for: a Request, the same under every front end.

A Request holds what the images need (the task with its inputs, prompts, seed rule, size, sampler settings,
batch size and count, LoRAs, embeddings, text options) and nothing of files, flags or HTTP. The command
line, the batch runner, the DDP workers, the Python API, the A1111 API and the page each build one and
rename its fields for their users (the CLI says --steps and --n_samples, the API steps and batch_size):
`check(names)` validates a request by itself, its messages naming fields through the front end's names.

Defaults are resolved in one place, `Request.resolved`: what a front end leaves None takes the task's
default for the model family (ldm.loading.families), eta included, and the seed a random one.
"""
from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

import torch

from ldm.errors import SDError
from ldm.limits import MAX_ETA, MAX_SCALE, Limits, check_number, check_seed, is_whole

if TYPE_CHECKING:
    from ldm.adapters.lora import LoraPlan
    from ldm.hires import Hires
    from ldm.tasks.base import Task

MAX_CLIP_SKIP = 12  # A1111's slider; a text encoder's own depth may bound it lower (checked once loaded)
EMPHASIS = ("original", "none", "off")  # how (word:1.2) weights apply (ldm.text.chunks)
AUTOENCODERS = ("full", "taesd")  # decode / encode: the model's own VAE, or TAESD (--taesd)
MAX_TOME = 0.9  # A1111's token merging sliders end here


@dataclass
class SamplingSettings:
    """The sampler's settings; None: the task's default for the model (Request.resolved)."""
    steps: Optional[int] = None
    sampler: Optional[str] = None  # None: the model's default (ddim; euler_a for few-step models)
    schedule: Optional[str] = None  # None: the model's (trailing for few-step models), else the sampler's own
    eta: Optional[float] = None
    scale: Optional[float] = None


@dataclass(frozen=True)
class PromptLine:
    """A prompt with the settings it sets itself (None: the request's), e.g. a line of a prompt file.
    Each pass over the lines makes `repeat` images of it."""
    prompt: str
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None  # this line's images use seed, seed + 1, ...
    steps: Optional[int] = None
    scale: Optional[float] = None
    size: Optional[tuple[int, int]] = None  # (width, height)
    sampler: Optional[str] = None
    schedule: Optional[str] = None
    eta: Optional[float] = None
    where: str = ""  # "FILE:LINE", for messages
    repeat: int = 1

    def overrides(self, keys=("steps", "sampler", "schedule", "eta", "scale")) -> dict:
        """The sampling settings this line sets."""
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}


@dataclass(frozen=True)
class Item:
    """One image a request asks for, as its plan (ldm.plan) places it and the task hooks see it."""
    index: int  # global image index k within the run
    prompt: str
    negative_prompt: str
    seed: int  # the seed of this image's generators (seed + k, or seed when it is fixed)
    sampling: Optional[SamplingSettings] = None  # this item's settings when a prompt-file line set them
    size: Optional[tuple[int, int]] = None  # (width, height) of this item when a prompt-file line set it


# How a prompt line's own fields are named in messages: by their JSON key.
LINE_NAMES = {name: f'"{name}"' for name in ("steps", "scale", "sampler", "eta", "seed")}
LINE_NAMES.update(width="width", height="height", prompt="the prompt",
                  negative_prompt="the negative prompt")


def _txt2img() -> "Task":
    from ldm.tasks.base import Txt2Img

    return Txt2Img()


@dataclass
class Request:
    """What the images of one call need; see the module's text. None: resolved (Request.resolved)."""
    prompt: str = ""
    negative_prompt: str = ""
    task: "Task" = field(default_factory=_txt2img)  # txt2img, or an image task with its inputs (ldm.tasks)
    seed: Optional[int] = None  # None or -1: a random one
    fixed_seed: bool = False  # every image starts from `seed` (the reference's --fixed_code), not seed + k
    width: Optional[int] = None  # None: the model's native size (image tasks: their input's size)
    height: Optional[int] = None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    batch_size: Optional[int] = None  # images sampled together
    n_iter: Optional[int] = None  # how many times the batches run
    lines: tuple[PromptLine, ...] = ()  # prompts with their own settings; empty: `prompt`, batch_size times
    emphasis: str = "original"  # original | none | off (ldm.text.chunks)
    clip_skip: int = 1  # A1111's "Clip skip" (1: the model's own last text layer)
    loras: tuple = ()  # "FILE[:WEIGHT]" LoRAs for every image
    lora_dir: Optional[Path] = None  # where <lora:NAME:W> finds NAME
    embeddings: Optional[Path] = None  # a folder of textual-inversion files (None: embeddings/ beside the ckpt)
    C: Optional[int] = None  # latent channels and the first stage's factor (None: the model's)
    f: Optional[int] = None
    reproduce: Optional[tuple[int, int]] = None  # (batch size, position): remake the image at that place only
    preset: Optional[str] = None  # whose defaults: "turbo", "sd"; None or "auto": by the checkpoint's file name
    decode: str = "full"  # the final images' decoder: the model's VAE ("full") or TAESD ("taesd")
    encode: str = "full"  # the input pictures' encoder (img2img, inpaint, depth2img): "full" or "taesd"
    tome: float = 0.0  # token merging ratio (tomesd's, as A1111 calls it): 0 off, up to MAX_TOME
    control: tuple = ()  # ControlNet units (ldm.control.units.ControlUnit), applied together
    hires: Optional["Hires"] = None  # the hires fix's second pass (ldm.hires), txt2img only
    limits: Limits = field(default_factory=Limits)

    # -- defaults -----------------------------------------------------------------------------------
    def resolved(self, demo: bool, ckpt: Optional[Path] = None, native_size: Optional[int] = None,
                 channels: Optional[int] = None, factor: Optional[int] = None) -> "Request":
        """This request with every default filled in for a model: the task's settings for the family (the
        demo model's or the reference's), eta for each sampler asked, a random seed for None or -1, the
        native size and the model's latent shape where known (None arguments leave those fields as they are)."""
        from ldm.loading import families

        task = self.task.name
        preset = families.preset_of(ckpt, self.preset)
        defaults = families.task_defaults(task, demo, preset)
        s = self.sampling
        # a few-step model's schedule (trailing) goes with any sampler not asked to use another
        s = dataclasses.replace(s, sampler=defaults["sampler"] if s.sampler is None else s.sampler,
                                schedule=defaults["schedule"] if s.schedule is None else s.schedule)
        sampling = dataclasses.replace(
            s, steps=defaults["steps"] if s.steps is None else s.steps,
            scale=defaults["scale"] if s.scale is None else s.scale,
            eta=families.resolve_eta(task, demo, s.sampler, s.eta) if _known_sampler(s.sampler) else s.eta)
        # a line that names its own sampler gets that sampler's eta unless it or the request set one
        lines = tuple(dataclasses.replace(line, eta=families.resolve_eta(task, demo, line.sampler, s.eta))
                      if line.sampler is not None and line.eta is None and _known_sampler(line.sampler) else line
                      for line in self.lines)
        from ldm.tasks.base import task_sets_size

        if task_sets_size(self.task):  # the input image gives the size the model works at
            width, height = self.task.work_size
        else:
            width = native_size if self.width is None else self.width
            height = native_size if self.height is None else self.height
        return dataclasses.replace(
            self, sampling=sampling, lines=lines, width=width, height=height, preset=preset,
            seed=secrets.randbelow(2 ** 32) if self.seed is None or self.seed == -1 else self.seed,
            batch_size=defaults["n_samples"] if self.batch_size is None else self.batch_size,
            n_iter=defaults["n_iter"] if self.n_iter is None else self.n_iter,
            C=channels if self.C is None else self.C, f=factor if self.f is None else self.f,
            lora_dir=self._lora_dir(ckpt))

    def _lora_dir(self, ckpt: Optional[Path]) -> Optional[Path]:
        if self.lora_dir is not None or ckpt is None:
            return None if self.lora_dir is None else Path(self.lora_dir)
        from ldm.adapters.lora import default_folder

        return default_folder(ckpt)

    # -- validation ---------------------------------------------------------------------------------
    def check(self, names: Mapping[str, str] = {}, timesteps: int = 1000) -> None:
        """Validate every field that needs no model (call on a resolved request). Messages name fields as
        `names` maps them (a front end's own names: --steps, cfg_scale), else by the field's name.
        `timesteps`: the model's (its config's) number of diffusion steps, which bounds the schedules."""
        from ldm.models.diffusion.sampler_names import check_sampler
        from ldm.text.chunks import check_prompt

        def name(key: str) -> str:
            return names.get(key, key)

        for key in ("steps", "scale"):  # what resolved() fills; a caller that skipped it gets one line
            if getattr(self.sampling, key) is None:
                raise SDError(f"the request's {name(key)} was never resolved (Request.resolved)")
        self.limits.check(name)
        for key in ("batch_size", "n_iter", "C", "f"):
            value = getattr(self, key)
            if value is not None and not is_whole(value, 1):
                what = "at least 1" if is_whole(value, -2**63) else "a whole number of at least 1"
                raise SDError(f"{name(key)} must be {what} (got {value})")
        if self.batch_size is not None and self.batch_size > self.limits.max_batch:
            raise SDError(f"{name('batch_size')} {self.batch_size} is above {name('max_batch')} {self.limits.max_batch}")
        check_number(name("scale"), self.sampling.scale, maximum=MAX_SCALE)
        if self.sampling.eta is not None:
            check_number(name("eta"), self.sampling.eta, minimum=0, maximum=MAX_ETA)
        if self.seed is not None:
            check_seed(self.seed, name("seed"))
        check_prompt(name("prompt"), self.prompt, self.limits.max_chunks, name("max_chunks"))
        check_prompt(name("negative_prompt"), self.negative_prompt, self.limits.max_chunks, name("max_chunks"))
        if not is_whole(self.clip_skip, 1, MAX_CLIP_SKIP):
            raise SDError(f"{name('clip_skip')} must be a whole number from 1 to {MAX_CLIP_SKIP} (got {self.clip_skip})")
        if self.emphasis not in EMPHASIS:
            raise SDError(f"{name('emphasis')} must be one of {', '.join(EMPHASIS)} (got '{self.emphasis}')")
        for key in ("decode", "encode"):
            if getattr(self, key) not in AUTOENCODERS:
                raise SDError(f"{name(key)} must be one of {', '.join(AUTOENCODERS)} (got '{getattr(self, key)}')")
        check_number(name("tome"), self.tome, minimum=0.0)
        if self.tome > MAX_TOME:
            raise SDError(f"{name('tome')} must be from 0 to {MAX_TOME} (got {self.tome:g})")
        # names first: check_steps builds the schedule
        check_sampler(self.sampling.sampler, self.sampling.schedule, self.sampling.eta)
        check_steps(self.sampling, self.limits, timesteps, name)
        for line in self.lines:
            try:
                self._check_line(line, lambda key: LINE_NAMES.get(key) or name(key), timesteps)
            except SDError as exc:
                raise SDError(f"{line.where}: {exc}" if line.where else str(exc)) from None
        self.lora_files()
        self._check_control(name)
        self._check_hires(name, timesteps)
        if self.embeddings is not None and not Path(self.embeddings).is_dir():
            raise SDError(f"{name('embeddings')} {self.embeddings}: no such folder")
        self.task.check(self, name)

    def _check_control(self, name) -> None:
        """The ControlNet units, each by itself; a front end names unit i's fields "control.i.FIELD"
        (e.g. alwayson_scripts.controlnet.args[0].weight), else they read "ControlNet unit i FIELD"."""
        from ldm.control.units import MAX_UNITS

        if len(self.control) > MAX_UNITS:
            raise SDError(f"{name('control')}: at most {MAX_UNITS} ControlNet units, not {len(self.control)}")
        for i, unit in enumerate(self.control):
            def called(key: str, i: int = i) -> str:
                full = f"control.{i}.{key}"
                return name(full) if name(full) != full else f"ControlNet unit {i} {key}"

            unit.check(called)

    def _check_hires(self, name, timesteps: int) -> None:
        if self.hires is None:
            return
        from ldm.models.diffusion.sampler_names import check_sampler
        from ldm.tasks.base import Txt2Img
        from ldm.text.chunks import check_prompt

        if type(self.task) is not Txt2Img:  # not the Karlo prior's txt2img either
            raise SDError(f"{name('hires')}: the hires fix is a second pass of plain txt2img, not of {self.task.name}")
        hires = self.hires
        # sizes are checked once known (a command checks before the model gives its native size)
        if self.width is not None and self.height is not None:
            hires.check(self.width, self.height, self.f or 8, self.limits.max_side, name)
        else:
            hires.check(512, 512, 8, max(self.limits.max_side, 2048), name)
        for line in self.lines:
            if line.size is not None:
                hires.check(line.size[0], line.size[1], self.f or 8, self.limits.max_side, name)
        if hires.sampler is not None or hires.schedule is not None:
            check_sampler(hires.sampler or self.sampling.sampler, hires.schedule or self.sampling.schedule, None)
        check_prompt(name("hires.prompt"), hires.prompt, self.limits.max_chunks, name("max_chunks"))
        check_prompt(name("hires.negative_prompt"), hires.negative_prompt, self.limits.max_chunks, name("max_chunks"))
        if hires.steps:
            check_steps(dataclasses.replace(self.sampling, steps=hires.steps, sampler=hires.sampler or self.sampling.sampler,
                                            schedule=hires.schedule or self.sampling.schedule),
                        self.limits, timesteps, lambda key: name("hires.steps") if key == "steps" else name(key))

    def _check_line(self, line: PromptLine, name, timesteps: int) -> None:
        """A line's own settings, named by their JSON keys."""
        from ldm.models.diffusion.sampler_names import check_sampler
        from ldm.text.chunks import check_prompt
        if line.prompt != self.prompt:
            check_prompt(name("prompt"), line.prompt, self.limits.max_chunks, name("max_chunks"))
        check_prompt(name("negative_prompt"), line.negative_prompt or "", self.limits.max_chunks, name("max_chunks"))
        if line.size is not None:
            from ldm.tasks.base import check_size

            check_size(line.size[1], line.size[0], self.f or 8, name, self.limits.max_side)
        if line.sampler is not None or line.schedule is not None or line.eta is not None:
            check_sampler(line.sampler or self.sampling.sampler, line.schedule or self.sampling.schedule,
                          self.sampling.eta if line.eta is None else line.eta)
        if line.scale is not None:
            check_number(name("scale"), line.scale, maximum=MAX_SCALE)
        if line.eta is not None:
            check_number(name("eta"), line.eta, minimum=0, maximum=MAX_ETA)
        if line.seed is not None:
            check_seed(line.seed, name("seed"))
        overrides = line.overrides(("steps", "sampler", "schedule"))
        if overrides:
            check_steps(dataclasses.replace(self.sampling, **overrides), self.limits, timesteps, name)

    # -- adapters -----------------------------------------------------------------------------------
    def lora_files(self) -> "LoraPlan":
        """The request's LoRA files: `loras` for every image, <lora:NAME:...> tags looked up in lora_dir
        (checked before any model loads)."""
        from ldm.adapters.lora import LoraPlan

        if "_loras" not in self.__dict__:
            prompts = [self.prompt] + [line.prompt for line in self.lines]
            self.__dict__["_loras"] = LoraPlan.make(self.loras, self.lora_dir, prompts)
        return self.__dict__["_loras"]

    def embeddings_dir(self, ckpt: Optional[Path]) -> tuple[Optional[Path], bool]:
        """(the textual-inversion folder, whether it was asked for): `embeddings`, else embeddings/ beside
        the folder that holds the checkpoint."""
        if self.embeddings is not None:
            return Path(self.embeddings), True
        from ldm.adapters.textual_inversion import default_folder

        return default_folder(ckpt), False

    # -- the plan's view ----------------------------------------------------------------------------
    def prompt_lines(self) -> tuple[PromptLine, ...]:
        """The prompts the plan walks: the lines, or the prompt batch_size times."""
        return self.lines or (PromptLine(self.prompt, repeat=self.batch_size or 1),)

    def for_batch(self, sampling: SamplingSettings, size: tuple) -> "Request":
        """This request with a batch's own settings and size (what the task's per-batch hooks see)."""
        width, height = size
        return dataclasses.replace(self, sampling=sampling, width=width, height=height)


def _known_sampler(name: str) -> bool:
    from ldm.models.diffusion.sampler_names import SAMPLER_INFO

    return name in SAMPLER_INFO  # an unknown name is check()'s to report, in the front end's words


def check_steps(sampling: SamplingSettings, limits: Limits, timesteps: int, name=lambda key: key) -> None:
    """Steps within the max_steps limit and what the sampler's schedule can make for a model of `timesteps`."""
    from ldm.models.diffusion.samplers import make_sigmas

    if not is_whole(sampling.steps, 1, limits.max_steps):
        raise SDError(f"{name('steps')} must be from 1 to {limits.max_steps} ({name('max_steps')}; "
                      f"got {sampling.steps})")
    # The schedules are pure arithmetic on the model's sigma table: build one on a stand-in table of the
    # config's length, so a step count the schedule cannot make fails here, not after the load.
    stand_in = torch.linspace(0.03, 15.0, timesteps, dtype=torch.float64)
    make_sigmas(sampling.schedule or sampling.sampler, stand_in, sampling.steps)
