"""Planning a run: the job (every setting, validated before any model loads) and its batches.

A run is planned before any sampling: a list of batches of items (global image index k, prompt,
negative prompt, seed, sampling settings, size). Image k always starts from noise drawn by a CPU
generator seeded with its own seed, so it can be reproduced alone whatever the batch size or device.
The plan fixes each batch's composition from the job alone (never from the number of processes), and
processes take whole batches: every image is computed in the same batch, at the same position, as in a
one-process run, which is what makes multi-process runs byte-identical to single ones (batched
convolutions round differently from single ones, ~3e-5 in the latents, enough to flip uint8 pixels).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from ldm.batch.prompts import PromptLine, read_prompt_lines
from ldm.errors import SDError
from ldm.limits import MAX_ETA, MAX_SCALE, SEED_MAX, Limits, check_number, check_seed, is_whole
from ldm.runtime.policy import RuntimeOptions

if TYPE_CHECKING:
    from ldm.adapters.lora import LoraPlan


@dataclass
class SamplingSettings:
    steps: int = 50
    sampler: str = "ddim"
    schedule: Optional[str] = None  # None: the sampler's own default
    eta: Optional[float] = None  # None: the task's or the sampler's own (ldm.loading.families.resolve_eta)
    scale: float = 9.0


@dataclass(frozen=True)
class Item:
    index: int  # global image index k within the run
    prompt: str
    negative_prompt: str
    seed: int  # the seed of this image's generators (seed + k, or seed with --fixed_code)
    sampling: Optional[SamplingSettings] = None  # this item's settings when a prompt-file line set them
    size: Optional[tuple[int, int]] = None  # (W, H) of this item when a prompt-file line set it


@dataclass
class Batch:
    """Items sampled together: they share sampling settings and size. `index` is b, the batch's place in
    the plan; with `keep` set only the image at that position is saved (--from-image rebuilds the batch
    an image was made in, to reproduce its float rounding)."""
    index: int
    items: list[Item]
    sampling: SamplingSettings
    size: tuple[int, int]  # (W, H)
    keep: Optional[int] = None

    def kept(self) -> list[int]:
        """Positions whose images are saved."""
        return [self.keep] if self.keep is not None else list(range(len(self.items)))


def _plan(lines: list[PromptLine], *, n_samples: int, n_iter: int, repeat: int, from_file: bool, seed: int,
          fixed_code: bool, negative_prompt: str, sampling: SamplingSettings, size: tuple[int, int]) -> list[Batch]:
    """The reference's batching, extended to prompt-file lines with their own settings.

    Without a prompt file a batch is n_samples copies of the prompt; with one, the lines (each repeated
    `repeat` times) are grouped n_samples to a batch, a new batch also starting where the settings or size
    change. The whole set runs n_iter times. Image k gets seed + k, or, for a line with its own seed s,
    s + (how many images of that line came before); --fixed_code drops the offsets.
    """
    order = [i for i in range(len(lines)) for _ in range(repeat)] if from_file else [0] * n_samples
    plan: list[Batch] = []
    copies = [0] * len(lines)  # images made so far from each line
    k = 0
    for _ in range(n_iter):
        run: list[Item] = []
        for i in order:
            line = lines[i]
            overrides = {key: getattr(line, key) for key in ("steps", "sampler", "schedule", "eta", "scale")
                         if getattr(line, key) is not None}
            base_seed = seed if line.seed is None else line.seed
            offset = k if line.seed is None else copies[i]
            run.append(Item(k, line.prompt, negative_prompt if line.negative_prompt is None else line.negative_prompt,
                            base_seed if fixed_code else base_seed + offset,
                            dataclasses.replace(sampling, **overrides), line.size or size))
            copies[i] += 1
            k += 1
        start = 0
        for end in range(1, len(run) + 1):  # cut where the batch is full or the settings change
            if end == len(run) or end - start == n_samples or _batch_key(run[end]) != _batch_key(run[start]):
                plan.append(Batch(len(plan), run[start:end], run[start].sampling, run[start].size))
                start = end
    return plan


def _batch_key(item: Item) -> tuple:
    return dataclasses.astuple(item.sampling), item.size


def check_size(H: int, W: int, f: int, names: tuple[str, str] = ("--H", "--W"), max_side: Optional[int] = None) -> None:
    for name, value in zip(names, (H, W)):
        if max_side is not None and value > max_side:
            raise SDError(f"{name} {value} is above --max-side {max_side}")
        if value <= 0 or value % 8:
            raise SDError(f"{name} {value} is not a positive multiple of 8")
        if value < 256:
            raise SDError(f"{name} {value} is below 256: every image carries the invisible watermark, "
                          "which needs at least 256x256 pixels")
        if value % f:
            raise SDError(f"{name} {value} is not a multiple of the first stage's factor --f {f}")


ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
MAX_CLIP_SKIP = 12  # A1111's slider; a text encoder's own depth may bound it lower (checked once loaded)
# The size a job whose --H/--W waits for the model's native size is checked at before the model loads
# (every native size passes the same checks).
STAND_IN_SIZE = 512


def check_steps(sampling: "SamplingSettings", limits: Limits, timesteps: int, where: str = "--steps") -> None:
    """Steps within --max-steps and what the sampler's schedule can make for a model of `timesteps`."""
    from ldm.models.diffusion.samplers import make_sigmas

    if not 1 <= sampling.steps <= limits.max_steps:
        raise SDError(f"{where} must be from 1 to {limits.max_steps} (--max-steps; got {sampling.steps})")
    # The schedules are pure arithmetic on the model's sigma table: build one on a stand-in table of the
    # config's length, so a step count the schedule cannot make fails here, not after the load.
    stand_in = torch.linspace(0.03, 15.0, timesteps, dtype=torch.float64)
    make_sigmas(sampling.schedule or sampling.sampler, stand_in, sampling.steps)


@dataclass
class Job:
    """Everything a run needs, validated up front by `check()` before any model is loaded."""
    prompt: str
    negative_prompt: str
    from_file: Optional[Path]
    repeat: int
    n_samples: int
    n_iter: int
    n_rows: int
    seed: int
    fixed_code: bool
    H: Optional[int]  # None: the model's native size (Job.sized, once the model is loaded)
    W: Optional[int]
    C: int
    f: int
    outdir: Path
    config: Optional[Path]  # None: chosen from the checkpoint's keys (ldm.loading.detect)
    ckpt: Optional[Path]
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)  # --device, --precision, the fast paths
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    emphasis: str = "original"  # --emphasis: original | none | off (ldm.text.chunks)
    clip_skip: int = 1  # --clip-skip: A1111's "Clip skip" (1: the model's own text layer)
    embeddings: Optional[Path] = None  # --embeddings DIR (None: embeddings/ beside the checkpoints folder)
    loras: tuple = ()  # --lora FILE[:W], for every image
    lora_dir: Optional[Path] = None  # --lora-dir: where <lora:NAME:W> finds NAME (None: loras/ beside the checkpoints)
    # Batch jobs (ldm/batch): resume, scale-out, reproduction.
    skip_existing: bool = False  # skip items whose file exists with matching metadata
    devices: Optional[int] = None  # processes per node (Lightning DDP); None: one process, no Lightning
    num_nodes: int = 1
    accelerator: Optional[str] = None  # cpu | gpu | auto; None: from --device
    from_image: Optional[Path] = None  # rebuild the job from this PNG's parameters (ldm.batch.reproduce)
    reproduce: Optional[tuple[int, int]] = None  # (batch size, position) of the image --from-image rebuilds
    limits: Limits = field(default_factory=Limits)

    @property
    def distributed(self) -> bool:
        """Run through Lightning's DDP predict loop (any scale-out flag given)."""
        return self.devices is not None or self.num_nodes != 1 or self.accelerator is not None

    @property
    def indexed_names(self) -> bool:
        """Sample names are base + k (resume, several processes) instead of the next free numbers."""
        return self.skip_existing or self.distributed

    def prompt_lines(self) -> list[PromptLine]:
        """The run's prompts: the --from-file lines, or --prompt."""
        if "_lines" not in self.__dict__:
            self.__dict__["_lines"] = read_prompt_lines(self.from_file) if self.from_file else [PromptLine(self.prompt)]
        return self.__dict__["_lines"]

    def check(self) -> list[str]:
        """Validate every input that needs no model; returns the prompts."""
        from ldm.models.diffusion.sampler_names import check_sampler
        from ldm.text.chunks import check_prompt

        self.runtime.check()

        for name in ("n_samples", "n_iter", "repeat", "num_nodes", "C", "f"):
            if getattr(self, name) < 1:
                raise SDError(f"--{name} must be at least 1 (got {getattr(self, name)})")
        if self.devices is not None and self.devices < 1:
            raise SDError(f"--devices must be at least 1 (got {self.devices})")
        if self.accelerator is not None and self.accelerator not in ACCELERATORS:
            raise SDError(f"--accelerator must be one of {', '.join(ACCELERATORS)} (got '{self.accelerator}')")
        if self.n_rows < 0:
            raise SDError("--n_rows must be 0 (= n_samples) or more")
        self.limits.check()
        if self.n_samples > self.limits.max_batch:
            raise SDError(f"--n_samples {self.n_samples} is above --max-batch {self.limits.max_batch}")
        check_number("--scale", self.sampling.scale, maximum=MAX_SCALE)
        if self.sampling.eta is not None:
            check_number("--ddim_eta", self.sampling.eta, minimum=0, maximum=MAX_ETA)
        check_seed(self.seed)
        check_prompt("--prompt", self.prompt, self.limits.max_chunks)
        check_prompt("--negative-prompt", self.negative_prompt, self.limits.max_chunks)
        if not is_whole(self.clip_skip, 1, MAX_CLIP_SKIP):
            raise SDError(f"--clip-skip must be a whole number from 1 to {MAX_CLIP_SKIP} (got {self.clip_skip})")
        if self.emphasis not in ("original", "none", "off"):
            raise SDError(f"--emphasis must be one of original, none, off (got '{self.emphasis}')")
        # names first: check_steps builds the schedule
        check_sampler(self.sampling.sampler, self.sampling.schedule, self.sampling.eta)
        timesteps = self.timesteps()
        check_steps(self.sampling, self.limits, timesteps)
        stand_in = self.sized(STAND_IN_SIZE)
        check_size(stand_in.H, stand_in.W, self.f, max_side=self.limits.max_side)
        lines = self.prompt_lines()
        for line in lines:  # a line's own settings, reported with its file and line number
            try:
                if line.prompt != self.prompt:
                    check_prompt("the prompt", line.prompt, self.limits.max_chunks)
                check_prompt("the negative prompt", line.negative_prompt or "", self.limits.max_chunks)
                if line.size is not None:
                    check_size(line.size[1], line.size[0], self.f, names=("height", "width"), max_side=self.limits.max_side)
                if line.sampler is not None or line.schedule is not None or line.eta is not None:
                    check_sampler(line.sampler or self.sampling.sampler, line.schedule or self.sampling.schedule,
                                  self.sampling.eta if line.eta is None else line.eta)
                if line.scale is not None:
                    check_number("\"scale\"", line.scale, maximum=MAX_SCALE)
                if line.eta is not None:
                    check_number("\"eta\"", line.eta, minimum=0, maximum=MAX_ETA)
                if line.seed is not None:
                    check_seed(line.seed, "\"seed\"")
                overrides = {k: getattr(line, k) for k in ("steps", "sampler", "schedule") if getattr(line, k) is not None}
                if overrides:
                    check_steps(dataclasses.replace(self.sampling, **overrides), self.limits, timesteps, "\"steps\"")
            except SDError as exc:
                raise SDError(f"{line.where}: {exc}") from None
        self.lora_files()
        if self.embeddings is not None and not Path(self.embeddings).is_dir():
            raise SDError(f"--embeddings {self.embeddings}: no such folder")
        if self.ckpt is None:
            raise SDError("no checkpoint given: pass --ckpt FILE (.ckpt or .safetensors; see checkpoints/README.md)")
        if not Path(self.ckpt).exists():
            raise SDError(f"checkpoint not found: {self.ckpt} (see checkpoints/README.md)")
        if self.config is not None and not Path(self.config).is_file():
            raise SDError(f"config file not found: {self.config}")
        return [line.prompt for line in lines]

    def timesteps(self) -> int:
        """The model's number of diffusion timesteps, read from the config (no model is built)."""
        from ldm.util import load_config

        if self.config is None or not Path(self.config).is_file():
            return 1000
        params = load_config(self.config).model.get("params", {}) or {}
        value = params.get("timesteps", 1000)
        return value if isinstance(value, int) and value > 1 else 1000

    def lora_files(self) -> "LoraPlan":
        """The run's LoRA files: --lora ones for every image, <lora:NAME:...> tags looked up in the LoRA
        folder (checked here, before any model loads)."""
        from ldm.adapters.lora import LoraPlan

        if "_loras" not in self.__dict__:
            from ldm.adapters.lora import default_folder

            folder = Path(self.lora_dir) if self.lora_dir is not None else default_folder(self.ckpt)
            prompts = [self.prompt] + [line.prompt for line in self.prompt_lines()]
            self.__dict__["_loras"] = LoraPlan.make(self.loras, folder, prompts)
        return self.__dict__["_loras"]

    def embeddings_dir(self) -> tuple[Optional[Path], bool]:
        """(the textual-inversion folder, whether it was asked for): --embeddings, else embeddings/ beside
        the folder that holds the checkpoint."""
        if self.embeddings is not None:
            return Path(self.embeddings), True
        from ldm.adapters.textual_inversion import default_folder

        return default_folder(self.ckpt), False

    def sized(self, native_size: int) -> "Job":
        """This job with the model's native size wherever --H/--W was left out."""
        return dataclasses.replace(self, H=native_size if self.H is None else self.H,
                                   W=native_size if self.W is None else self.W)

    def for_batch(self, batch: "Batch") -> "Job":
        """This job with a batch's own settings and size (what the Mode hooks see for that batch)."""
        W, H = batch.size
        return dataclasses.replace(self, sampling=batch.sampling, H=H, W=W)


def make_plan(job: Job) -> list[Batch]:
    """The job's batches, fixed before any sampling (call job.check() first); SDError when the plan goes
    past --max-images or a seed past 2**64 - 1."""
    size = (job.W, job.H)
    if job.reproduce is not None:  # --from-image: the image's batch, refilled with copies of the image
        batch_size, position = job.reproduce
        if not 1 <= batch_size <= job.limits.max_batch or not 0 <= position < batch_size:
            raise SDError(f"the image was made at position {position} of a batch of {batch_size}, outside 1 to "
                          f"--max-batch {job.limits.max_batch}")
        items = [Item(0, job.prompt, job.negative_prompt, job.seed, job.sampling, size)] * batch_size
        return [Batch(0, items, job.sampling, size, keep=position)]
    images = len(job.prompt_lines()) * job.repeat * job.n_iter if job.from_file else job.n_samples * job.n_iter
    if images > job.limits.max_images:
        raise SDError(f"this run would make {images} images, above --max-images {job.limits.max_images}")
    plan = _plan(job.prompt_lines(), n_samples=job.n_samples, n_iter=job.n_iter, repeat=job.repeat,
                 from_file=job.from_file is not None, seed=job.seed, fixed_code=job.fixed_code,
                 negative_prompt=job.negative_prompt, sampling=job.sampling, size=size)
    for batch in plan:
        for item in batch.items:
            if item.seed > SEED_MAX:
                raise SDError(f"image {item.index} would get seed {item.seed}, past 2**64 - 1: use a smaller --seed")
    return plan
