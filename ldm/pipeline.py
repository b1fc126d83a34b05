"""The Python API: load a model once, generate many times, get images and their metadata back in memory.

    from ldm.pipeline import Pipeline

    pipe = Pipeline.load()                       # no checkpoint: the built-in demo model
    for image in pipe.txt2img("a red circle on a blue background", seed=1):
        image.image.save(f"{image.seed}.png")    # a watermarked PIL image; image.png() gives PNG bytes

Every front end is a layer over this module and hands it one ldm.request.Request: the commands and the
batch runner (ldm.batch) call `Pipeline.session` for each run, the server and the page `Pipeline.generate`,
Python callers the per-task methods, which build the Request from keyword arguments. Each task's defaults
(the reference's, or the demo model's own) are filled in by Request.resolved, so the same few arguments
make the same image from the command line and from Python. Nothing here reads a command line or writes a file.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image

from ldm.loading import families
from ldm.files import imageio, metadata
from ldm.errors import SDError
from ldm.limits import Limits
from ldm.plan import Batch, make_plan
from ldm.request import Request, SamplingSettings
from ldm.runtime.policy import OPENVINO_INT8, RuntimeOptions, autocast_context
from ldm.sampling import sample_latents, start_noise
from ldm.text.encoder import PromptEncoder
from ldm.tasks import Depth2Img, Img2Img, Inpaint, PriorTxt2Img, Task, Txt2Img, Upscale, Variations
from ldm.tasks.base import ImageInput, is_unclip


class Skipped(Exception):
    """skip() ended the running batch (the call goes on with the next)."""


class Cancelled(Exception):
    """Raised by a generating call that Pipeline.cancel() stopped between two steps; `images` holds the
    images of the batches that had finished (a server returns them, as AUTOMATIC1111's interrupt does)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.images: list[GeneratedImage] = []


@dataclass
class GeneratedImage:
    """One generated image with everything needed to save or reproduce it."""
    image: Image.Image  # watermarked ("SDV2", as every image sd makes)
    seed: int
    parameters: str  # AUTOMATIC1111's "parameters" text: prompt, negative prompt, settings
    index: int  # k: the image's place in the call (seed + k unless a seed was fixed)
    batch_size: int
    position: int  # place in its batch (with batch_size, what reproduces the exact pixels)
    first_pass: Optional[Image.Image] = None  # the hires fix's first pass, watermarked, when it was kept

    def png(self) -> bytes:
        """The image as PNG bytes carrying its "parameters" text: what `sd` would write to a file."""
        return imageio.png_bytes(self.image, {metadata.PARAMETERS_KEY: self.parameters})


@dataclass
class Progress:
    """What a progress callback gets after every sampling step of a call."""
    step: int  # steps done in this call, 1 .. total
    total: int  # steps the whole call takes (all its batches)
    batch: int  # the batch running, 0-based
    batches: int
    denoised: torch.Tensor = field(repr=False)  # the current x0 estimate, latents (B, C, h, w): see preview()


ProgressCallback = Callable[[Progress], None]
PREVIEWS = ("full", "taesd", "cheap")  # Pipeline.preview's methods (A1111's Full, TAESD, Approx cheap)


class Pipeline:
    """A loaded model and the generating tasks on it; see Pipeline.load."""

    def __init__(self, model, choice, options: RuntimeOptions):
        from ldm.adapters.lora import Merged

        self.model, self.choice, self.options = model, choice, options
        self.loras = Merged(model)  # the LoRAs merged into this model's weights (undone exactly when others come)
        self.prior = None  # Karlo's prior, for unCLIP-L text-to-image (load_prior)
        self.taesd = None  # TAESD, the tiny autoencoder (load_taesd): decode / encode "taesd", cheap previews
        self.controlnets: dict = {}  # ControlNet files loaded for this model, by (path, size, mtime)
        self.midas = None  # MiDaS for the depth preprocessor of ControlNet (load_midas)
        self._x4: Optional[tuple] = None  # ((path, size, mtime), the x4 upscaler's Pipeline) for the hires fix
        self._cancel = threading.Event()
        self._skip = threading.Event()

    @classmethod
    def load(cls, ckpt: Optional[str | Path] = None, config: Optional[str | Path] = None, *, device: str = "auto",
             precision: str = "auto", compile: bool = False, torchscript: bool = False, ipex: Optional[bool] = None,
             threads: Optional[int] = None, trust_config: bool = False, task: str = "txt2img",
             quiet: bool = False, backend: str = "torch", taesd: Optional[str | Path] = None) -> "Pipeline":
        """Load a checkpoint (no ckpt: the built-in demo model). Without `config` the checkpoint's keys (and
        for txt2img checkpoints a one-call probe of the UNet) choose the reference config. `device`
        (auto, cpu, cuda), `precision` (auto, full, autocast, bf16, fp16) and the fast paths are the
        commands' flags of the same names; `backend` "openvino" runs the UNet, VAE and text encoder with OpenVINO,
        "auto" the fastest fp32-accurate backend for the device (OpenVINO on CPUs);
        `task` only matters without a checkpoint (depth2img and upscale need one); `quiet` drops the notes;
        `taesd` loads TAESD too (load_taesd)."""
        options = RuntimeOptions(device=device, precision=precision, compile=compile, torchscript=torchscript,
                                 ipex=ipex, threads=threads, trust_config=trust_config, backend=backend)
        pipeline = cls.open(ckpt, config, options, task=task, quiet=quiet)
        if taesd is not None:
            pipeline.load_taesd(taesd)
        return pipeline

    @classmethod
    def open(cls, ckpt: Optional[str | Path], config: Optional[str | Path], options: RuntimeOptions, *,
             task: str = "txt2img", quiet: bool = False) -> "Pipeline":
        """Pipeline.load with the runtime settings as one RuntimeOptions (what a command's BatchJob carries)."""
        return cls(*cls._read(options, ckpt, config, task, quiet), options)

    @staticmethod
    def _read(options: RuntimeOptions, ckpt, config, task: str, quiet: bool):
        from ldm.loading.detect import choose_files, load_chosen

        options.check()
        config, ckpt, demo = choose_files(config, ckpt, task, quiet)
        return load_chosen(config, ckpt, demo, options.resolved(quiet), quiet)

    def load_taesd(self, path: str | Path) -> None:
        """Load TAESD (ldm.models.taesd: its decoder file, the encoder beside it, or a diffusers AutoencoderTiny
        folder) for requests that decode or encode with it, and for previews. It stays across load_model: it
        fits every SD 1/2 checkpoint's latents."""
        from ldm.models.taesd import load_taesd

        taesd = load_taesd(path, self.model.runtime.device if self.model is not None else "cpu")
        if self.model is not None and self.model.runtime.options.backend == "openvino":
            # converted like the VAE (per shape, cached), keyed by the decoder file's hash
            from ldm.runtime.openvino import OpenVINOPart

            digest = metadata.model_hash(taesd.files[0], length=64)
            taesd.decoder = OpenVINOPart(taesd.decoder, "taesd-decoder", digest, "f32")
            if taesd.encoder is not None:
                taesd.encoder = OpenVINOPart(taesd.encoder, "taesd-encoder", digest, "f32")
        self.taesd = taesd

    def controlnet(self, path: str | Path):
        """The ControlNet in `path`, loaded for this model's UNet (ldm.control.apply.load_controlnet) and kept
        while the file is unchanged; the last four files stay loaded."""
        from omegaconf import OmegaConf

        from ldm.control.apply import load_controlnet
        from ldm.util import load_config

        from ldm.files.reading import file_stamp

        path = Path(path)
        key = file_stamp(path)
        if key not in self.controlnets:
            unet = self.model.model.diffusion_model
            params = OmegaConf.to_container(load_config(self.config).model.params.unet_config.params, resolve=True)
            net = load_controlnet(path, params, self.model.latent_channels, unet.time_embed[0].weight.dtype,
                                  unet.time_embed[0].weight.device)
            while len(self.controlnets) >= 4:
                self.controlnets.pop(next(iter(self.controlnets)))
            self.controlnets[key] = net
        return self.controlnets[key]

    def x4_upscaled(self, ckpt: str | Path, pictures: torch.Tensor, items, config: Optional[str | Path] = None,
                    steps: Optional[int] = None) -> torch.Tensor:
        """Pictures (B, 3, h, w) in [-1, 1] through the x4 upscaler (the hires fix's "SD x4"): each with its item's
        prompt and seed at the upscaler's defaults, unwatermarked; the x4 model is loaded beside this one and kept
        while its file is unchanged."""
        from ldm.tasks import Upscale

        from ldm.files.reading import file_stamp

        path = Path(ckpt)
        key = (*file_stamp(path), str(config))
        if self._x4 is None or self._x4[0] != key:
            self._x4 = None
            self._x4 = (key, Pipeline.open(path, config, self.options, task="upscale", quiet=True))
        x4 = self._x4[1]
        out = []
        for picture, item in zip(imageio.tensor_to_pil(pictures.float().cpu()), items):
            request = x4.resolve(x4.request(Upscale(picture, x4.defaults("upscale")["noise_level"]), item.prompt,
                                            negative_prompt=item.negative_prompt, seed=item.seed, steps=steps))
            request.check({}, x4.model.num_timesteps)
            plan = make_plan(request, {})
            out.append(imageio.pil_to_tensor(x4.session(request).sample(plan[0])[0]))
        return torch.cat(out).to(pictures)

    def load_midas(self, path: str | Path) -> None:
        """MiDaS (the depth2img checkpoint's depth_model, or a file of MiDaS's own keys) for ControlNet's
        depth preprocessor."""
        from ldm.control.preprocess import load_midas

        self.midas = load_midas(path, self.model.runtime.device if self.model is not None else "cpu")

    def load_model(self, ckpt: Optional[str | Path] = None, config: Optional[str | Path] = None,
                   quiet: bool = False) -> None:
        """Replace the loaded model by another checkpoint (same device and precision). The first model is
        released before the second is read, so the two never take memory at once."""
        from ldm.adapters.lora import Merged

        self.close()
        self.model, self.choice = self._read(self.options, ckpt, config, "txt2img", quiet)
        self.loras = Merged(self.model)

    def switch_model(self, ckpt: str | Path) -> None:
        """load_model(ckpt), but when that checkpoint cannot be loaded the one held before is loaded again and
        the SDError says which file failed (a server keeps serving the model that worked)."""
        previous = (self.ckpt, self.config)
        try:
            self.load_model(ckpt, quiet=True)
        except SDError as exc:
            self.load_model(*previous, quiet=True)
            raise SDError(f"cannot load {Path(ckpt).name}: {exc}") from None

    def close(self) -> None:
        """Drop the model and give its memory back (measured, docs/benchmarks.md); load_model loads another."""
        from ldm.loading.build import release_memory

        self.model = self.choice = self.loras = self.prior = None
        self.controlnets, self._x4 = {}, None  # built for the model's UNet; the x4 model with it
        release_memory()

    # -- what is loaded -------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        """The config the model was built from (given, or chosen from the checkpoint)."""
        return self.choice.config

    @property
    def ckpt(self) -> Path:
        """The checkpoint file loaded."""
        return self.choice.ckpt

    @property
    def demo(self) -> bool:
        """True for the built-in demo model."""
        return self.choice.demo

    @property
    def native_size(self) -> int:
        """The default side of txt2img images: 256 (demo), 512 (eps models), 768 (v models)."""
        return self.choice.native_size

    def defaults(self, task: str) -> dict:
        """The settings `task` uses when none are given, for this model (ldm.loading.families)."""
        return families.task_defaults(task, self.demo, self.preset)

    @property
    def preset(self) -> str:
        """Whose defaults this model runs with: "turbo" (a few-step model, by its file name) or "sd"."""
        return "sd" if self.demo else families.preset_of(self.ckpt)

    def resolve(self, request: Request) -> Request:
        """`request` with this model's defaults where it left settings None (Request.resolved)."""
        return request.resolved(self.demo, self.ckpt, self.native_size, self.model.latent_channels,
                                self.model.downsampling_factor)

    # -- the tasks ------------------------------------------------------------------------------------
    def txt2img(self, prompt: str, *, width: Optional[int] = None, height: Optional[int] = None,
                **settings) -> list[GeneratedImage]:
        """Images of `prompt`, `width` x `height` (default: the model's native size). Settings (all tasks):
        negative_prompt, seed (None or -1: a random one), steps, scale, sampler, schedule, eta,
        batch_size, n_iter, limits (ldm.limits.Limits), emphasis ("original", "none", "off": how
        AUTOMATIC1111's (word:1.2) weights apply), embeddings (a folder of textual-inversion files; by
        default embeddings/ beside the checkpoints folder), progress (a callback taking a Progress), names
        (how messages name these settings: a front end's own names, e.g. {"scale": "cfg_scale"})."""
        prior = {k: settings.pop(k) for k in ("noise_level", "prior_steps", "prior_scale") if k in settings}
        if self.prior is not None and is_unclip(self.model):  # unCLIP-L through the Karlo prior
            task = PriorTxt2Img(prior=self.prior, **prior)
        elif prior:
            raise SDError(f"{', '.join(prior)}: only for unCLIP-L with the Karlo prior (Pipeline.load_prior)")
        else:
            task = Txt2Img()
        return self._generate(task, prompt, settings, width=width, height=height)

    def load_prior(self, ckpt: str | Path, clip: Optional[str | Path] = None,
                   clip_stats: Optional[str | Path] = None) -> None:
        """Load Karlo v1 alpha's prior for an unCLIP-L model: txt2img then turns each prompt into the image
        embedding unCLIP-L takes (settings noise_level 0..999, prior_steps 25, prior_scale 4.0). `clip`:
        OpenAI's ViT-L-14.pt (default: beside the prior, else the checkpoint's own copy); `clip_stats`:
        ViT-L-14_stats.th (default: the reference's path, karlo_models/ beside the checkpoint or the prior)."""
        task = PriorTxt2Img(prior_ckpt=ckpt, prior_clip=clip, clip_stats=clip_stats)
        request = self.resolve(Request(task=task))
        task.check(request)
        with torch.inference_mode():
            task.prepare(self.model, request, self.model.runtime.device, self.choice)
        self.prior = task.prior

    def img2img(self, image: ImageInput, prompt: str, *, strength: Optional[float] = None,
                **settings) -> list[GeneratedImage]:
        """`image` (a path or PIL image) redrawn after `prompt`; strength 0 keeps it, 1 ignores it."""
        strength = self.defaults("img2img")["strength"] if strength is None else strength
        return self._generate(Img2Img(image, strength), prompt, settings)

    def depth2img(self, image: ImageInput, prompt: str, *, strength: Optional[float] = None,
                  depth_map: Optional[ImageInput] = None, **settings) -> list[GeneratedImage]:
        """img2img that keeps the image's depth (MiDaS's, or `depth_map`: grayscale, brighter = nearer)."""
        strength = self.defaults("depth2img")["strength"] if strength is None else strength
        return self._generate(Depth2Img(image, strength, depth_map=depth_map), prompt, settings)

    def inpaint(self, image: ImageInput, mask: ImageInput, prompt: str, *, strength: float = 1.0,
                **settings) -> list[GeneratedImage]:
        """Repaint the white part of `mask`; the other pixels are kept exactly. strength < 1 starts the
        masked part from the input noised to that level instead of from full noise."""
        return self._generate(Inpaint(image, mask, strength), prompt, settings)

    def upscale(self, image: ImageInput, prompt: str, *, noise_level: Optional[int] = None,
                tile: Optional[bool] = None, tile_size: int = 128, tile_overlap: Optional[int] = None,
                **settings) -> list[GeneratedImage]:
        """`image` enlarged 4x per side (the x4 upscaler), tiled when it would not fit in memory."""
        noise_level = self.defaults("upscale")["noise_level"] if noise_level is None else noise_level
        task = Upscale(image, noise_level, tile=tile, tile_size=tile_size, overlap=tile_overlap)
        return self._generate(task, prompt, settings)

    def variations(self, images: ImageInput | list[ImageInput], prompt: str = "", *,
                   weights: Optional[list[float]] = None, noise_level: Optional[int] = None,
                   width: Optional[int] = None, height: Optional[int] = None,
                   clip_stats: Optional[str | Path] = None, **settings) -> list[GeneratedImage]:
        """Stable unCLIP (an unCLIP checkpoint): images in the manner of `images` (a path or PIL image, or
        several mixed by `weights`, default equal), `width` x `height` (default 768). noise_level 0..999 adds
        noise to the image embedding: higher strays further from the pictures. `clip_stats`:
        ViT-L-14_stats.th, which unCLIP-L needs above level 0."""
        noise_level = self.defaults("variations")["noise_level"] if noise_level is None else noise_level
        task = Variations(images, weights, noise_level, clip_stats)
        return self._generate(task, prompt, settings, width=width, height=height)

    def _generate(self, task: Task, prompt: str, settings: dict, **size) -> list[GeneratedImage]:
        progress, names = settings.pop("progress", None), settings.pop("names", {})
        return self.generate(self.request(task, prompt, **settings, **size), progress, names)

    def request(self, task: Task, prompt: str, *, steps: Optional[int] = None, sampler: Optional[str] = None,
                schedule: Optional[str] = None, eta: Optional[float] = None, scale: Optional[float] = None,
                batch_size: int = 1, n_iter: int = 1, **fields) -> Request:
        """The Request of one call from the per-task methods' keyword arguments (their names are the
        Request's; the sampler's are flat); what is None is resolved for this model when it runs. One image
        per call unless batch_size or n_iter say otherwise."""
        known = {f.name for f in dataclasses.fields(Request)} - {"prompt", "task", "sampling", "lines", "reproduce"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"unknown setting{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
        for key in ("embeddings", "lora_dir"):
            if fields.get(key) is not None:
                fields[key] = Path(fields[key])
        if "limits" in fields and fields["limits"] is None:
            fields["limits"] = Limits()
        return Request(prompt=prompt, task=task, sampling=SamplingSettings(steps, sampler, schedule, eta, scale),
                       batch_size=batch_size, n_iter=n_iter, **{**fields, "loras": tuple(fields.get("loras", ()))})

    def generate(self, request: Request, progress: Optional[ProgressCallback] = None,
                 names: dict = {}) -> list[GeneratedImage]:
        """Run a request (every batch of its plan) and return its images in order. The request is resolved
        for this model and checked first; `names` says its fields as the caller's users know them."""
        self._cancel.clear()
        self._skip.clear()
        request = self.resolve(request)
        request.check(names, self.model.num_timesteps)
        plan = make_plan(request, names)
        session = self.session(request, names)
        counter = _StepCounter(self, progress, plan, session)
        images: list[GeneratedImage] = []
        try:
            for batch in plan:
                counter.start(batch.index)
                try:
                    images += session.images(batch, counter)
                except Skipped:  # skip(): this batch ends with its partial images, the next ones run
                    self._skip.clear()
                    images += session.partial(batch, counter.denoised)
        except Cancelled as stop:
            # the batches finished, then the running batch's images as they stand (A1111's interrupt)
            stop.images = images + session.partial(batch, counter.denoised)
            raise
        return images

    def session(self, request: Request, names: dict = {}) -> "Session":
        """A run of a resolved `request` on this model: the task prepared, prompts encoded once each (the
        batch runner's unit: it calls Session.images batch by batch). `names`: as for generate."""
        return Session(self, request, names)

    def skip(self) -> None:
        """End the running batch after its current step, keeping its partial images, and go on with the next
        batch (A1111's "skip"). Safe to call from another thread."""
        self._skip.set()

    def cancel(self) -> None:
        """Stop the running call after its current step (it raises Cancelled); the pipeline stays usable.
        Safe to call from another thread (a server's "interrupt")."""
        self._cancel.set()

    def stop_if_cancelled(self, where: str) -> None:
        """Raise Cancelled if cancel() was called (the step hook's check, for work between steps)."""
        if self._cancel.is_set():
            raise Cancelled(f"cancelled {where}")

    def preview(self, denoised: torch.Tensor, method: str = "full") -> list[Image.Image]:
        """A Progress's x0 latents as (unwatermarked) previews: decoded by the model's VAE ("full"), by TAESD
        ("taesd"), or by A1111's "Approx cheap" linear map of the latent channels ("cheap", no weights; what
        "taesd" falls back to without TAESD, or where TAESD does not fit the model's latents). See PREVIEWS."""
        from ldm.models import preview as approx

        if method not in PREVIEWS:
            raise SDError(f"unknown preview method '{method}' (one of {', '.join(PREVIEWS)})")
        with torch.inference_mode(), autocast_context(self.model):
            z = denoised.to(self.model.runtime.device)
            if method == "taesd" and self.taesd is not None and approx.fits_sd_latents(self.model, self.demo):
                images = self.taesd.decode(z).float()
            elif method == "full":
                images = self.model.decode_first_stage(z).float()
            else:
                images = approx.cheap(z.float(), self.model.downsampling_factor)
        return imageio.tensor_to_pil(images.cpu())


class _StepCounter:
    """The per-step hook of a call: counts steps for the progress callback and honours cancel()."""

    def __init__(self, pipeline: Pipeline, progress: Optional[ProgressCallback], plan: list[Batch], session: "Session"):
        self.pipeline, self.progress = pipeline, progress
        self.total = sum(session.steps_run(batch.sampling) for batch in plan)
        self.batches, self.batch, self.done = len(plan), 0, 0
        self.denoised: Optional[torch.Tensor] = None  # the running batch's latest x0 (its partial images)

    def start(self, batch: int) -> None:
        self.batch, self.denoised = batch, None

    def __call__(self, info: dict) -> None:
        self.done += 1
        self.denoised = info["denoised"]
        if self.progress is not None:
            self.progress(Progress(self.done, self.total, self.batch, self.batches, info["denoised"]))
        self.pipeline.stop_if_cancelled(f"after step {self.done} of {self.total}")
        if self.pipeline._skip.is_set():
            raise Skipped(f"skipped after step {self.done} of {self.total}")


class Session:
    """One run's task prepared on a loaded model: what all its batches share."""

    def __init__(self, pipeline: Pipeline, request: Request, names: dict = {}):
        model, task = pipeline.model, request.task
        self.pipeline, self.model, self.request, self.task = pipeline, model, request, task
        self.device = model.runtime.device
        if request.C != model.latent_channels or request.f != model.downsampling_factor:
            raise SDError(f"latent channels C {request.C} / factor f {request.f} do not fit the model (it has "
                          f"{model.latent_channels} latent channels and factor {model.downsampling_factor})")
        self.decoder = self._autoencoder(request, names)
        if request.tome > 0:
            self.need_plain_unet(f"token merging ({names.get('tome', 'tome')}) changes the UNet's attention, which")
        task.prepare(model, request, self.device, pipeline.choice)
        self.control = self._controlnets(request, names)
        self.first_pass: Optional[list[Image.Image]] = None  # the running batch's, when the hires fix keeps it
        from ldm.adapters.textual_inversion import load_folder

        folder, asked = request.embeddings_dir(pipeline.ckpt)
        self.embeddings = load_folder(folder, model.cond_stage_model.model.token_embedding.weight.shape[1], asked)
        prompts = [request.prompt] + [line.prompt for line in request.lines]
        for lora in request.lora_files().all_files(prompts):  # every LoRA fits before anything is sampled or written
            pipeline.loras.check(lora)
        self.encoder = PromptEncoder(model, emphasis=request.emphasis,
                                     embeddings={name: e.vectors for name, e in self.embeddings.items()},
                                     max_chunks=request.limits.max_chunks, limit=names.get("max_chunks", "max_chunks"),
                                     between=lambda: pipeline.stop_if_cancelled("while encoding the prompt"))
        self.common = {"Model hash": metadata.model_hash(pipeline.ckpt), "Model": Path(pipeline.ckpt).stem,
                       "Config": Path(pipeline.config).name, "Mode": task.name,
                       "Precision": model.runtime.precision.mode, **task.settings(),
                       "Backend": _backend_field(model),
                       # A1111 writes Emphasis only when it is not its default, "Original", Clip skip above 1
                       "Emphasis": {"none": "No norm", "off": "None"}.get(request.emphasis),
                       "Clip skip": request.clip_skip if request.clip_skip != 1 else None,
                       # A1111's fields, written when not "Full"; the encoder only where a picture was encoded
                       "VAE Decoder": "TAESD" if request.decode == "taesd" else None,
                       "VAE Encoder": "TAESD" if request.encode == "taesd" and task.encodes_input else None,
                       "Token merging ratio": request.tome or None,
                       # the extension's fields, one per unit
                       **{f"ControlNet {i}": unit.infotext(Path(unit.model).stem, metadata.model_hash(unit.model))
                          for i, (_, unit, _) in enumerate(self.control)}}
        with model.cond_stage_model.clip_skip(request.clip_skip):  # within this text encoder's depth
            pass

    def _controlnets(self, request: Request, names: dict) -> list:
        """(ControlNet, unit, hint picture) of each unit: files loaded for this model, preprocessors run once."""
        if not request.control:
            return []
        from ldm.control.apply import prepared_hints

        what = names.get("control", "ControlNet")
        if self.task.name not in ("txt2img", "img2img", "inpaint"):
            raise SDError(f"{what} steers SD 2.x txt2img, img2img and inpaint models, not {self.task.name}")
        self.need_plain_unet(f"{what} adds residuals inside the UNet, which")
        hints = prepared_hints(list(request.control), self.pipeline.midas)
        return [(self.pipeline.controlnet(unit.model), unit, hint) for unit, hint in zip(request.control, hints)]

    def controller(self, request: Request, batch_size: int, steps: int, guided: bool):
        """This batch's Controller (None without units): the hints at its latent's size."""
        if not self.control:
            return None
        from ldm.control.apply import Controller, fit_hint, hint_tensor
        from ldm.modules.diffusionmodules.controlnet import HINT_FACTOR

        _, h, w = self.task.latent_shape(request)
        units = [(net, unit, hint_tensor(fit_hint(picture, w * HINT_FACTOR, h * HINT_FACTOR, unit.resize)))
                 for net, unit, picture in self.control]
        return Controller(units, steps, batch_size, guided)

    def _autoencoder(self, request: Request, names: dict) -> Callable:
        """The decoder of this run's final images (latents -> [-1, 1] pictures); the task's encoder set for
        prepare. TAESD only where it was loaded and fits the model's latents (SD 1/2's 4 channels)."""
        from ldm.models.preview import fits_sd_latents

        pipeline, task = self.pipeline, self.task
        task.encoder = None
        for key in ("decode", "encode"):
            if getattr(request, key) != "taesd" or (key == "encode" and not task.encodes_input):
                continue
            flag = names.get(key, key)
            said = f"{flag} TAESD" if flag.startswith("override_settings.") else f"{flag} taesd"  # A1111's value
            if pipeline.taesd is None:
                where = "start sd serve with" if flag.startswith("override_settings.") else "load them with"
                raise SDError(f"{said} needs TAESD's files: {where} --taesd PATH (taesd_decoder.pth or "
                              ".safetensors, or a diffusers AutoencoderTiny folder)")
            if not fits_sd_latents(self.model, pipeline.demo) or task.name == "upscale":
                raise SDError(f"{said}: TAESD decodes SD 1/2 latents, and this model's "
                              f"{'are its own' if pipeline.demo or task.name == 'upscale' else 'differ'}; use full")
            if key == "encode":
                pipeline.taesd.require_encoder()
                task.encoder = pipeline.taesd.encode
        if request.decode == "taesd":
            return lambda model, latents: pipeline.taesd.decode(latents)
        return task.decode

    def parameters(self, batch: Batch, position: int) -> str:
        """The "parameters" text of the image at `position` of `batch` (known before sampling)."""
        item, s = batch.items[position], batch.sampling
        width, height = self.task.image_size(self.request.for_batch(batch.sampling, batch.size))
        several = len(batch.items) > 1  # A1111 writes the batch fields only for batches of several images
        from ldm.adapters.textual_inversion import used_in

        used = used_in([item.prompt, item.negative_prompt], self.embeddings)
        ti = ", ".join(f"{e.name}: {e.hash}" for e in used) or None  # A1111's "TI hashes" field
        loras = ", ".join(f"{lora.name}: {lora.hash}" for lora, _, _ in self.loras_of(batch.items)) or None
        hires = self.request.hires.fields((width, height)) if self.request.hires is not None else {}
        return metadata.Infotext.of_run(
            item.prompt, item.negative_prompt, steps=s.steps, sampler=s.sampler, schedule=s.schedule, scale=s.scale,
            seed=item.seed, width=width, height=height, eta=s.eta, **self.common, **hires, **{
                "TI hashes": ti, "Lora hashes": loras, "Batch size": len(batch.items) if several else None,
                "Batch pos": position if several else None}).text()

    def images(self, batch: Batch, on_step: Optional[Callable[[dict], None]] = None,
               positions: Optional[list[int]] = None) -> list[GeneratedImage]:
        """Sample `batch` and return its kept images (or those at `positions`), watermarked."""
        return self.generated(batch, self.sample(batch, on_step), positions)

    def generated(self, batch: Batch, pictures: list[Image.Image], positions: Optional[list[int]] = None):
        """The batch's kept pictures (or those at `positions`) as watermarked GeneratedImages."""
        out = []
        first, self.first_pass = self.first_pass, None
        for pos in batch.kept() if positions is None else positions:
            item = batch.items[pos]
            out.append(GeneratedImage(imageio.apply_watermark(pictures[pos]), item.seed, self.parameters(batch, pos),
                                      item.index, len(batch.items), pos,
                                      imageio.apply_watermark(first[pos]) if first is not None else None))
        return out

    def partial(self, batch: Batch, denoised: Optional[torch.Tensor]) -> list[GeneratedImage]:
        """A stopped batch's images as they stand: its latest x0 decoded as the finished ones are (none when it
        had not begun sampling, or when those latents are not finite)."""
        if denoised is None:
            return []
        try:
            with torch.inference_mode(), autocast_context(self.model):
                pictures = self.decoded(batch.items, denoised)
        except SDError:
            return []
        return self.generated(batch, pictures)

    def loras_of(self, items) -> list:
        """The batch's LoRAs: (file, text weight, UNet weight) from --lora and its prompts' tags."""
        return self.request.lora_files().for_prompts([it.prompt for it in items])

    def merge_loras(self, items) -> None:
        """Merge exactly the batch's LoRAs into the model (undoing others); the fast paths bake weights in."""
        wanted = self.loras_of(items)
        if wanted:
            self.need_plain_unet("LoRA is merged into the UNet's weights, which")
        self.pipeline.loras.apply(wanted)
        self.encoder.state = self.pipeline.loras.active

    def need_plain_unet(self, what: str) -> None:
        """SDError unless the UNet runs as sd's own modules in PyTorch: `what` needs them (LoRA merges into
        their weights, token merging changes their attention), which the fast paths have baked in."""
        options = self.pipeline.options
        if options.compile or options.torchscript or type(self.model.model.diffusion_model).__name__ != "UNetModel":
            baked = ("--backend openvino has baked in: use --backend torch for it" if _backend_field(self.model) else
                     "--compile, --torchscript and --ipex have baked in: drop them to use it")
            raise SDError(f"{what} {baked}")

    def conditioning(self, items, guided: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Text features of the batch's prompts (B, 77 * k, width) and, when guided, of its negative prompts,
        padded to one chunk count."""
        self.merge_loras(items)
        with self.model.cond_stage_model.clip_skip(self.request.clip_skip):
            c = self.encoder.encode([it.prompt for it in items])
            uc = self.encoder.encode([it.negative_prompt for it in items]) if guided else []
        length = max(f.shape[0] for f in c + uc)
        return (self.encoder.stack(c, length).to(self.device),
                self.encoder.stack(uc, length).to(self.device) if guided else None)

    def steps_run(self, settings: SamplingSettings) -> int:
        """The steps a batch of these settings takes: the task's, and the hires fix's second pass."""
        steps = self.task.steps_run(settings)
        hires = self.request.hires
        if hires is not None:
            from ldm.tasks.base import steps_for_strength

            steps += steps_for_strength(self.hires_settings(settings), hires.strength)
        return steps

    def hires_settings(self, settings: SamplingSettings) -> SamplingSettings:
        """The second pass's sampling: its own steps, sampler and schedule where the hires fix sets them."""
        hires = self.request.hires
        changed = hires.sampler is not None and hires.sampler != settings.sampler
        eta = settings.eta
        if changed:
            from ldm.loading import families

            eta = families.resolve_eta(self.task.name, self.pipeline.demo, hires.sampler, None)
        return dataclasses.replace(settings, steps=hires.steps or settings.steps, sampler=hires.sampler or settings.sampler,
                                   schedule=hires.schedule or (None if changed else settings.schedule), eta=eta)

    def sample(self, batch: Batch, on_step: Optional[Callable[[dict], None]] = None) -> list[Image.Image]:
        """Sample and decode one batch: PIL images for every position, not yet watermarked."""
        request, items, task, settings = (self.request.for_batch(batch.sampling, batch.size), batch.items,
                                          self.task, batch.sampling)
        noise, generators = start_noise([item.seed for item in items], task.latent_shape(request))
        with torch.inference_mode(), autocast_context(self.model):
            c, uc = self.conditioning(items, guided=settings.scale != 1.0)
            inputs = task.batch(self.model, items, generators, self.device)
            latents = self.run_pass(request, items, settings, task.steps_run(settings), noise, generators, c, uc,
                                    on_step, request.tome, start_latents=inputs.start_latents, strength=inputs.strength,
                                    extra_cond=inputs.extra_cond, apply_model=task.apply_model(self.model))
            if request.hires is not None:
                latents = self.hires_pass(request, items, settings, latents, c, uc, on_step)
            return self.decoded(items, latents)

    def run_pass(self, request: Request, items, settings: SamplingSettings, steps: int, noise: torch.Tensor,
                 generators, c, uc, on_step, tome: float, **inputs) -> torch.Tensor:
        """One sampling pass of a batch at `request`'s size: its ControlNets and token merging around the walk."""
        from ldm.control.apply import controlled
        from ldm.modules.tome import token_merging

        controller = self.controller(request, len(items), steps, settings.scale != 1.0)
        if controller is not None:
            on_step = _chained(controller.on_step, on_step)
        with controlled(self.model, controller), token_merging(self.model.model.diffusion_model, tome):
            return sample_latents(self.model, noise.to(self.device), generators, c, uc, settings, on_step, **inputs)

    def hires_pass(self, request: Request, items, settings: SamplingSettings, latents: torch.Tensor, c, uc,
                   on_step) -> torch.Tensor:
        """A1111's hires fix on a first pass's latents: upscale (in latent space, or decode, resize and
        encode), crop to the asked size, then img2img at that size from fresh noise of the same seeds."""
        from ldm import hires as hr

        fix, f = request.hires, self.model.downsampling_factor
        (up_w, up_h), (width, height) = fix.target(request.width, request.height)
        if fix.keep_first:
            self.first_pass = self.decoded(items, latents)
        if fix.upscaler in hr.LATENT_MODES:
            z = hr.upscale_latents(latents, (up_h // f, up_w // f), fix.upscaler)
        else:
            pictures = self.decoder(self.model, latents)
            if fix.upscaler == hr.X4:
                pictures = self.pipeline.x4_upscaled(fix.x4, pictures, items, fix.x4_config, fix.x4_steps)
            pictures = hr.upscale_pictures(pictures, (up_w, up_h), "Lanczos" if fix.upscaler == hr.X4 else fix.upscaler)
            z = self.task.encode(self.model, pictures)
        z = hr.crop_latents(z, (width, height), f)
        second = dataclasses.replace(request, width=width, height=height)
        hr_settings = self.hires_settings(settings)
        noise, generators = start_noise([item.seed for item in items], self.task.latent_shape(second))
        if fix.prompt or fix.negative_prompt:
            items = [dataclasses.replace(item, prompt=fix.prompt or item.prompt,
                                         negative_prompt=fix.negative_prompt or item.negative_prompt) for item in items]
            c, uc = self.conditioning(items, guided=settings.scale != 1.0)
        from ldm.tasks.base import steps_for_strength

        steps = steps_for_strength(hr_settings, fix.strength)
        if steps == 0:  # a strength that keeps no step: the upscaled first pass, as A1111 gives it
            return z
        return self.run_pass(second, items, hr_settings, steps, noise,
                             generators, c, uc, on_step, request.tome if fix.tome is None else fix.tome,
                             start_latents=z, strength=fix.strength, apply_model=self.model.apply_model)

    def decoded(self, items, latents: torch.Tensor) -> list[Image.Image]:
        """The batch's pictures from its final latents (checked finite before and after decoding)."""
        self.check_finite(latents, "the sampled latents", items)
        images = self.task.finish(self.decoder(self.model, latents).float(), items)
        self.check_finite(images, "the decoded pixels", items)
        return imageio.tensor_to_pil(images.cpu())

    def check_finite(self, values: torch.Tensor, what: str, items) -> None:
        """The last wall against a silently black image: NaN or infinity anywhere fails the run in one line
        that names the likely cause, before anything is saved."""
        if bool(torch.isfinite(values).all()):
            return
        causes = []
        if self.loras_of(items):
            causes.append("a LoRA with extreme values or weights")
        if self.embeddings:
            causes.append("a textual-inversion embedding with extreme values")
        if self.model.runtime.precision.mode in ("fp16", "autocast"):
            causes.append("fp16 overflow (try --precision full or bf16)")
        causes.append("an extreme guidance scale or prompt weight")
        raise SDError(f"{what} hold NaN or infinite values, so nothing was saved; likely cause: {', or '.join(causes)}")


def _chained(first: Callable[[dict], None], then: Optional[Callable[[dict], None]]) -> Callable[[dict], None]:
    def both(info: dict) -> None:
        first(info)
        if then is not None:
            then(info)
    return both


def _backend_field(model) -> Optional[str]:
    """The PNG's "Backend" field: none for PyTorch, "openvino f32" / "openvino bf16" otherwise."""
    options = model.runtime.options
    if options.backend == "torch":
        return None
    return f"{options.backend} {options.precision if options.precision in OPENVINO_INT8 else 'f32'}"
