"""A generating task's own part of a run: what txt2img, img2img, inpaint, depth2img and upscale add.

The pipeline (ldm.pipeline) runs every task the same way: plan, start noise, prompts, sampler, decode.
A Task adds its inputs (image files or PIL images, masks, strengths), the size it works at, and for
every batch the extra conditioning (c_concat / c_adm) its model's conditioning builder makes
(ldm.models.diffusion.conditioned). Input images are checked when a task is made (one-line SDErrors).
The PNG field "Mode" names the task (the name files made by earlier versions carry).

What the image tasks do to the user's images before the model sees them:
- img2img / depth2img: the input is shrunk to a multiple of 8 per side (LANCZOS; the reference cuts to
  64, which changes the aspect more), encoded with the posterior MEAN (so a seed and an image give the
  same result on any machine), and the run starts from it noised to the level where the last
  int(strength * steps) steps begin. Strength 1 starts from pure noise, exactly as txt2img: the input
  is then ignored (the reference still adds sqrt(alphas_cumprod[999]) ~ 7% of it).
- inpaint: image and mask are padded at the right and bottom to a multiple of 8 by repeating their edge
  (the reference pads to 64), and the result is cropped back, so it has the input's size. The unmasked
  pixels of the result are the input's, bit for bit before the watermark (paste-back).
- upscale: the latent has the low-res image's size (f = 4), so the result is exactly 4x per side;
  large inputs run tiled (ldm.tasks.tiling).

Every random draw comes from the run's per-image generators (seed + k): start noise, then the
img2img/inpaint/augmentation noise, then the samplers' fresh noise.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

import numpy as np
import torch
from PIL import Image

from ldm.files import imageio
from ldm.errors import SDError, note

if TYPE_CHECKING:
    from ldm.loading.detect import ModelChoice
    from ldm.request import Item, Request, SamplingSettings

# An input picture: a file's path or a PIL image (the Python API's and the server's inputs).
ImageInput = Union[str, os.PathLike, Image.Image]


@dataclass
class BatchInputs:
    """What a task adds to one batch: image conditioning and, for img2img-style runs, a start latent."""
    extra_cond: Optional[dict] = None  # c_concat / c_adm (and uc_adm for the unconditional branch)
    start_latents: Optional[torch.Tensor] = None  # (B, C, h, w) scaled latents to noise to the trimmed start
    strength: float = 1.0


class Task:
    """A generating task's own part of a run; plain txt2img adds nothing.

    The hooks are called in this order: check (before any model is loaded), prepare (after), then for
    every batch `batch` before sampling, `apply_model` for the denoiser's model call, `decode` and `finish`
    on the decoded images. The request the per-batch hooks (latent_shape, image_size) see carries that
    batch's own settings and size (Request.for_batch).
    """
    name = "txt2img"

    def check(self, request: "Request", name: Callable[[str], str] = lambda key: key) -> None:
        """Validate the task's own inputs (image files, strengths...) and the size, before loading the model;
        `name` says a request field as the front end calls it."""

    def prepare(self, model, request: "Request", device: torch.device, choice: "ModelChoice") -> None:
        """Check the model (built from `choice`'s files) suits the task and load what every batch shares."""

    def latent_shape(self, request: "Request") -> tuple[int, int, int]:
        return (request.C, request.height // request.f, request.width // request.f)

    def image_size(self, request: "Request") -> tuple[int, int]:
        """(width, height) of the saved images."""
        return (request.width, request.height)

    # the encoder of input pictures ([-1, 1] -> sampler latents) a run chose: None is the model's VAE
    # (encode_mean); the Session sets TAESD's for encode "taesd"
    encoder: Optional[Callable] = None
    encodes_input = False  # True for tasks that encode an input picture (what encode "taesd" changes)

    def encode(self, model, image: torch.Tensor) -> torch.Tensor:
        """Pictures (B, 3, H, W) in [-1, 1] -> latents, by the run's encoder."""
        return (self.encoder or model.encode_mean)(image)

    def steps_run(self, sampling: "SamplingSettings") -> int:
        """The steps a batch of these settings takes (image tasks: fewer below strength 1)."""
        return sampling.steps

    def reproduce(self, fields: dict) -> None:
        """--from-image: take the task's own settings (e.g. the denoising strength) from the image's fields."""

    def batch(self, model, items: list["Item"], generators: list[torch.Generator], device: torch.device) -> BatchInputs:
        return BatchInputs()

    def apply_model(self, model) -> Callable:
        """The `apply_model(x_t, t, cond)` the sampler's denoiser calls (a task may wrap the model's)."""
        return model.apply_model

    def decode(self, model, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) about [-1, 1]."""
        return model.decode_first_stage(latents)

    def finish(self, images: torch.Tensor, items: list["Item"]) -> torch.Tensor:
        """Post-process decoded images (B, 3, H, W) in [-1, 1], e.g. paste unmasked pixels back."""
        return images

    def settings(self) -> dict:
        """Extra fields for the PNG metadata."""
        return {}


class Txt2Img(Task):
    """Plain txt2img: no image conditioning; the size is the request's (None: the model's native size)."""

    def check(self, request: "Request", name: Callable[[str], str] = lambda key: key) -> None:
        # a side left None becomes the model's native size, which passes every rule
        check_size(request.height, request.width, request.f or 8, name, request.limits.max_side)

    def prepare(self, model, request: "Request", device: torch.device, choice: "ModelChoice") -> None:
        hint = "a txt2img checkpoint (v2 base or v)"
        if is_unclip(model):
            hint += "; an unCLIP checkpoint makes images from pictures (sd variations)"
        require_model(model, None, self.name, hint, choice.config)


def check_size(height: Optional[int], width: Optional[int], f: int, name: Callable[[str], str] = lambda key: key,
               max_side: Optional[int] = None) -> None:
    """The size rule of images sized by the request: positive multiples of 8 and of the factor f, at least 256
    (the invisible watermark's need), at most max_side; a None side is not checked."""
    for key, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if max_side is not None and value > max_side:
            raise SDError(f"{name(key)} {value} is above {name('max_side')} {max_side}")
        if value <= 0 or value % 8:
            raise SDError(f"{name(key)} {value} is not a positive multiple of 8")
        if value < 256:
            raise SDError(f"{name(key)} {value} is below 256: every image carries the invisible watermark, "
                          "which needs at least 256x256 pixels")
        if value % f:
            raise SDError(f"{name(key)} {value} is not a multiple of the first stage's factor {name('f')} {f}")


def task_sets_size(task: Task) -> bool:
    """True for tasks whose input image, not the request's width and height, gives the size (they override
    Task.image_size)."""
    return type(task).image_size is not Task.image_size


# -- image tasks --------------------------------------------------------------------------------------

MULTIPLE = 8  # image sides are made multiples of this (the f = 8 first stage's factor)
# The most pixels img2img, depth2img and inpaint work at. SD 2.x was trained at 512-768 px; the VAE encoder's
# and decoder's full-resolution activations and their mid-block attention (quadratic in pixels) grow past
# several GiB above this (a 3000x3000 photo took 8 GB and failed). Larger inputs are shrunk, aspect kept.
MAX_WORK_PIXELS = 1024 * 1024


# -- input images -------------------------------------------------------------------------------------

def shrink_to_work_size(img: Image.Image, what: str) -> Image.Image:
    """Shrink (LANCZOS, aspect kept) an image of more than MAX_WORK_PIXELS pixels to fit, with one note."""
    w, h = img.size
    if w * h <= MAX_WORK_PIXELS:
        return img
    ratio = math.sqrt(MAX_WORK_PIXELS / (w * h))
    size = (max(1, int(w * ratio)), max(1, int(h * ratio)))
    note(f"{what} {w}x{h} shrunk to {size[0]}x{size[1]}: sd works on at most {MAX_WORK_PIXELS // 2**20} megapixel "
         "(larger inputs would need many GiB); resize it yourself to choose how")
    return img.resize(size, resample=Image.LANCZOS)


def fit_to_multiple(img: Image.Image, what: str) -> Image.Image:
    """Shrink to at most MAX_WORK_PIXELS, then each side to a multiple of 8 (LANCZOS), saying so when the
    size changes."""
    img = shrink_to_work_size(img, what)
    fitted = imageio.resize_to_multiple(img, MULTIPLE)
    if fitted.size != img.size:
        note(f"{what} {img.size[0]}x{img.size[1]} resized to {fitted.size[0]}x{fitted.size[1]} (sides must be multiples of {MULTIPLE})")
    return fitted


def pad_to_multiple(a: np.ndarray) -> np.ndarray:
    """(H, W, ...) array padded at the bottom and right to multiples of 8 by repeating the edge."""
    h, w = a.shape[:2]
    pad = [(0, -h % MULTIPLE), (0, -w % MULTIPLE)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pad, mode="edge")


def exact_tensor(img: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) values in [-1, 1] that imageio.tensor_to_pil turns back into exactly these pixels.

    tensor_to_pil truncates 255 * (x + 1) / 2; pil_to_tensor's 2 * p / 255 - 1 can come back as
    p - 1 after float rounding, so paste-back uses the middle of each level, 2 * (p + 0.5) / 255 - 1.
    """
    p = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    x = 2.0 * (p + 0.5) / 255.0 - 1.0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))


def check_strength(strength: float, name: Callable[[str], str] = lambda key: f"--{key}") -> None:
    if not 0.0 <= strength <= 1.0 or math.isnan(strength):
        raise SDError(f"{name('strength')} must be between 0 and 1 (got {strength})")


def extra_cond(model, cond: dict) -> dict:
    """BatchInputs.extra_cond from a conditioning builder's output and the model's unconditional extras."""
    # run_job gives both guidance branches the builder's c_concat, as uncond_extra does; only the class
    # label has an unconditional entry of its own (uc_adm).
    uncond = model.uncond_extra(cond)
    return {**cond, **({"uc_adm": uncond["c_adm"]} if "c_adm" in uncond else {})}


def repeat_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.expand(n, *x.shape[1:])


def require_model(model, cls: Optional[type], command: str, hint: str, config=None) -> None:
    """SDError unless `model` is of the class the command needs (cls None: a plain txt2img model); the message
    names the config the checkpoint was run with, which says what it is."""
    ok = isinstance(model, cls) if cls is not None else getattr(model, "build_conditioning", None) is None
    if not ok:
        fits = f"this checkpoint fits {Path(config).name}, which builds" if config is not None else "this config builds"
        raise SDError(f"{command} needs {hint}; {fits} {type(model).__name__}")


def is_unclip(model) -> bool:
    """True for a Stable unCLIP model (its UNet's class label is a CLIP image embedding)."""
    from ldm.models.diffusion.conditioned import ImageEmbeddingConditionedLatentDiffusion

    return isinstance(model, ImageEmbeddingConditionedLatentDiffusion)


def steps_for_strength(sampling: "SamplingSettings", strength: float) -> int:
    """How many steps a batch of these settings takes at `strength` (its schedule's own rule, on a stand-in
    sigma table: the rules look only at positions)."""
    from ldm.models.diffusion.samplers import make_sigmas

    return len(make_sigmas(sampling.schedule or sampling.sampler, STAND_IN_SIGMAS, sampling.steps, strength)) - 1


# A sigma table of the usual length for rules that look only at positions (step counts, what a schedule can make)
STAND_IN_SIGMAS = torch.linspace(0.03, 15.0, 1000, dtype=torch.float64)


class ImageTask(Task):
    """What the image modes share: the input image, the size the model works at and the saved size.

    The request's width and height are the size the model works at (work_size, set by Request.resolved);
    the saved image only has to carry the watermark (256 * 256 pixels in total, imageio's own rule)."""
    image: Image.Image

    @property
    def work_size(self) -> tuple[int, int]:
        """(width, height) of the model's pixel grid."""
        return self.image.size

    def image_size(self, request: "Request") -> tuple[int, int]:
        return self.image.size

    def check(self, request: "Request", name: Callable[[str], str] = lambda key: key) -> None:
        f = request.f or 8
        for key, value in zip(("width", "height"), self.work_size):
            if value <= 0 or value % f:
                raise SDError(f"image {key} {value} is not a positive multiple of the first stage's factor {f}")
        imageio.check_watermark_size(*self.image_size(request))
