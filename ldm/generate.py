"""Planning and running generation jobs: the shared engine behind every generating command.

A run is planned before any sampling: a list of items (global image index k, prompt, negative prompt,
seed + k), grouped into batches. Image k always starts from noise drawn by a CPU generator seeded with
seed + k, so it can be reproduced alone whatever the batch size or device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ldm.errors import SDError
from ldm.runtime import load_for_inference, precision_context, resolve_device


@dataclass(frozen=True)
class Item:
    index: int  # global image index k within the run
    prompt: str
    negative_prompt: str
    seed: int  # the seed of this image's generators (seed + k, or seed with --fixed_code)


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise SDError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SDError(f"prompt file {path} is not UTF-8 text") from exc
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise SDError(f"prompt file {path} has no prompts (one prompt a line)")
    return prompts


def plan_batches(prompts: list[str], *, n_samples: int, n_iter: int, repeat: int, from_file: bool,
                 seed: int, fixed_code: bool, negative_prompt: str) -> list[list[Item]]:
    """The reference's batching, as a plan of items.

    Without a prompt file a batch is n_samples copies of the prompt; with one, the prompts (each
    repeated `repeat` times) are grouped n_samples to a batch. The whole set runs n_iter times.
    """
    if from_file:
        expanded = [p for p in prompts for _ in range(repeat)]
        batches = [expanded[i:i + n_samples] for i in range(0, len(expanded), n_samples)]
    else:
        batches = [[prompts[0]] * n_samples]
    plan: list[list[Item]] = []
    k = 0
    for _ in range(n_iter):
        for batch in batches:
            items = []
            for prompt in batch:
                items.append(Item(k, prompt, negative_prompt, seed if fixed_code else seed + k))
                k += 1
            plan.append(items)
    return plan


def start_noise(items: list[Item], shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(B, C, h, w) start noise, image k from a CPU generator seeded with its seed.

    The generators are returned too: ancestral and SDE samplers continue each image's own stream.
    """
    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in items]
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return noise, generators


@dataclass
class SamplingSettings:
    steps: int = 50
    sampler: str = "ddim"
    schedule: Optional[str] = None  # None: the sampler's own default
    eta: float = 0.0
    scale: float = 9.0


class PromptEncoder:
    """Encodes each distinct prompt once per run (prompt files often repeat prompts)."""

    def __init__(self, model):
        self.model = model
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        todo = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if todo:
            embeddings = self.model.get_learned_conditioning(todo)
            for prompt, emb in zip(todo, embeddings):
                self.cache[prompt] = emb
        return torch.stack([self.cache[p] for p in prompts])


def chunks(seq: list, size: int) -> Iterator[list]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def check_size(H: int, W: int, f: int) -> None:
    for name, value in (("H", H), ("W", W)):
        if value <= 0 or value % 8:
            raise SDError(f"--{name} {value} is not a positive multiple of 8")
        if value < 256:
            raise SDError(f"--{name} {value} is below 256: every image carries the invisible watermark, "
                          "which needs at least 256x256 pixels")
        if value % f:
            raise SDError(f"--{name} {value} is not a multiple of the first stage's factor --f {f}")


@dataclass
class Job:
    """Everything a txt2img run needs, validated up front by `check()` before any model is loaded."""
    prompt: str
    negative_prompt: str
    from_file: Optional[Path]
    repeat: int
    n_samples: int
    n_iter: int
    n_rows: int
    seed: int
    fixed_code: bool
    H: int
    W: int
    C: int
    f: int
    outdir: Path
    config: Path
    ckpt: Optional[Path]
    device: str
    precision: str
    sampling: SamplingSettings = field(default_factory=SamplingSettings)

    def check(self) -> list[str]:
        """Validate every input that needs no model; returns the prompts."""
        for name in ("n_samples", "n_iter", "repeat"):
            if getattr(self, name) < 1:
                raise SDError(f"--{name} must be at least 1 (got {getattr(self, name)})")
        if self.n_rows < 0:
            raise SDError("--n_rows must be 0 (= n_samples) or more")
        if self.sampling.steps < 1:
            raise SDError(f"--steps must be at least 1 (got {self.sampling.steps})")
        if self.sampling.eta < 0:
            raise SDError(f"--ddim_eta must be 0 or more (got {self.sampling.eta})")
        if self.precision not in ("full", "autocast"):
            raise SDError(f"--precision must be full or autocast (got '{self.precision}')")
        check_size(self.H, self.W, self.f)
        from ldm.models.diffusion.samplers import check_sampler
        check_sampler(self.sampling.sampler, self.sampling.schedule)
        prompts = read_prompt_file(self.from_file) if self.from_file else [self.prompt]
        if self.ckpt is None:
            raise SDError("no checkpoint given: pass --ckpt FILE (.ckpt or .safetensors; see checkpoints/README.md)")
        if not Path(self.ckpt).exists():
            raise SDError(f"checkpoint not found: {self.ckpt} (see checkpoints/README.md)")
        if not Path(self.config).is_file():
            raise SDError(f"config file not found: {self.config}")
        return prompts


@dataclass
class BatchInputs:
    """What a mode adds to one batch: image conditioning and, for img2img-style runs, a start latent."""
    extra_cond: Optional[dict] = None  # c_concat / c_adm (and uc_adm for the unconditional branch)
    start_latents: Optional[torch.Tensor] = None  # (B, C, h, w) scaled latents to noise to the trimmed start
    strength: float = 1.0


class Mode:
    """A generating command's own part of the shared run; plain txt2img adds nothing.

    The hooks are called in this order: check (before any model is loaded), prepare (after), then for
    every batch `batch` before sampling and `finish` on the decoded images.
    """
    name = "txt2img"

    def check(self, job: "Job") -> None:
        """Validate the mode's own inputs (image files, strengths...) before loading the model."""

    def prepare(self, model, job: "Job", device: torch.device) -> None:
        """Check the model suits the mode and load what every batch shares."""

    def latent_shape(self, job: "Job") -> tuple[int, int, int]:
        return (job.C, job.H // job.f, job.W // job.f)

    def image_size(self, job: "Job") -> tuple[int, int]:
        """(W, H) of the saved images."""
        return (job.W, job.H)

    def steps_run(self, steps: int) -> int:
        return steps

    def batch(self, model, items: list[Item], generators: list[torch.Generator], device: torch.device) -> BatchInputs:
        return BatchInputs()

    def finish(self, images: torch.Tensor, items: list[Item]) -> torch.Tensor:
        """Post-process decoded images (B, 3, H, W) in [-1, 1], e.g. paste unmasked pixels back."""
        return images

    def settings(self) -> dict:
        """Extra fields for the PNG metadata."""
        return {}


def run_job(job: Job, mode: Optional[Mode] = None) -> list[Path]:
    """Plan, sample, decode and save a run of any generating command; returns the sample paths written."""
    from tqdm import tqdm

    from ldm.cli import imageio

    mode = mode or Mode()
    prompts = job.check()
    mode.check(job)
    samples_dir = job.outdir / "samples"
    imageio.ensure_writable_dir(samples_dir)
    device = resolve_device(job.device)
    model = load_for_inference(job.config, job.ckpt, device, job.precision)
    if job.C != model.latent_channels or job.f != model.downsampling_factor:
        raise SDError(f"--C {job.C} / --f {job.f} do not fit the model (it has {model.latent_channels} latent "
                      f"channels and factor {model.downsampling_factor})")
    mode.prepare(model, job, device)
    plan = plan_batches(prompts, n_samples=job.n_samples, n_iter=job.n_iter, repeat=job.repeat,
                        from_file=job.from_file is not None, seed=job.seed, fixed_code=job.fixed_code,
                        negative_prompt=job.negative_prompt)
    encoder = PromptEncoder(model)
    settings = job.sampling
    width, height = mode.image_size(job)
    base_settings = {
        "Steps": settings.steps, "Sampler": settings.sampler, "CFG scale": settings.scale,
        "Size": f"{width}x{height}", "Model hash": imageio.model_hash(job.ckpt), "Model": Path(job.ckpt).stem,
        "Config": Path(job.config).name, "Eta": settings.eta, "Mode": mode.name, **mode.settings(),
    }
    if settings.schedule:
        base_settings["Schedule type"] = settings.schedule
    written: list[Path] = []
    all_images = []
    total_steps = len(plan) * mode.steps_run(settings.steps)
    with tqdm(total=total_steps, desc="sampling", unit="step", dynamic_ncols=True) as bar, torch.inference_mode():
        for items in plan:
            noise, generators = start_noise(items, mode.latent_shape(job))
            with precision_context(device, job.precision):
                c = encoder([it.prompt for it in items]).to(device)
                uc = encoder([it.negative_prompt for it in items]).to(device) if settings.scale != 1.0 else None
                inputs = mode.batch(model, items, generators, device)
                latents = sample_latents(model, noise.to(device), generators, c, uc, settings, progress=bar.update,
                                         start_latents=inputs.start_latents, strength=inputs.strength,
                                         extra_cond=inputs.extra_cond)
                images = mode.finish(model.decode_first_stage(latents).float(), items)
            for item, pil in zip(items, imageio.tensor_to_pil(images.cpu())):
                meta = imageio.format_parameters(item.prompt, item.negative_prompt, {**base_settings, "Seed": item.seed})
                written.append(imageio.save_numbered(pil, samples_dir, digits=5, metadata={"parameters": meta}))
                all_images.append(pil)
    n_rows = job.n_rows or job.n_samples
    grid = imageio.make_grid(all_images, n_rows)
    imageio.save_numbered(grid, job.outdir, digits=4, prefix="grid-", metadata=None)
    print(f"Your samples are ready and waiting for you here: {job.outdir}")
    return written


def sample_latents(model, noise: torch.Tensor, generators: list[torch.Generator], c: torch.Tensor,
                   uc: Optional[torch.Tensor], settings: SamplingSettings, progress: Callable[[int], None],
                   start_latents: Optional[torch.Tensor] = None, strength: float = 1.0,
                   extra_cond: Optional[dict] = None) -> torch.Tensor:
    """Run the chosen sampler on one batch; image-mode conditioning enters through `extra_cond`."""
    from ldm.models.diffusion import samplers
    from ldm.models.diffusion.denoiser import CFGDenoiser, DiscreteDenoiser

    extra = extra_cond or {}
    cond = {"c_crossattn": c, "c_concat": extra.get("c_concat"), "c_adm": extra.get("c_adm")}
    denoiser = DiscreteDenoiser(model)
    if uc is not None:
        uncond = {"c_crossattn": uc, "c_concat": extra.get("c_concat"), "c_adm": extra.get("uc_adm", extra.get("c_adm"))}
        denoiser = CFGDenoiser(denoiser, settings.scale)
        cond = {"cond": cond, "uncond": uncond}
    return samplers.run(
        denoiser, noise, cond, settings.sampler, steps=settings.steps, schedule=settings.schedule,
        eta=settings.eta, generators=generators, callback=lambda *_: progress(1),
        start_latents=start_latents, strength=strength,
    )
