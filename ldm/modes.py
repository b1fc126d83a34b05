"""The image commands' parts of the shared run (ldm.generate.run_job): img2img, inpaint, depth2img, upscale.

Each Mode reads and checks its input images when it is made (one-line SDErrors), tells the run the size it
works at, and calls its model's conditioning builder (ldm.models.diffusion.image_modes) for every batch.
Model facts (which channels the UNet sees, how depth is scaled, the upscaler's noise augmentation) live
in image_modes; this module only decides what the user's images become before they reach the model:

- img2img / depth2img: the input is shrunk to a multiple of 8 per side (LANCZOS; the reference cuts to
  64, which changes the aspect more), encoded with the posterior MEAN (so a seed and an image give the
  same result on any machine), and the run starts from it noised to the level where the last
  int(strength * steps) steps begin. Strength 1 starts from pure noise, exactly as txt2img: the input
  is then ignored (the reference still adds sqrt(alphas_cumprod[999]) ~ 7% of it).
- inpaint: image and mask are padded at the right and bottom to a multiple of 8 by repeating their edge
  (the reference pads to 64), and the result is cropped back, so it has the input's size. The unmasked
  pixels of the result are the input's, bit for bit before the watermark (paste-back).
- upscale: the latent has the low-res image's size (f = 4), so the result is exactly 4x per side;
  large inputs run tiled (ldm.tiling).

Every random draw comes from the run's per-image generators (seed + k): start noise, then the
img2img/inpaint/augmentation noise, then the samplers' fresh noise.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.cli import imageio
from ldm.errors import SDError, note
from ldm.generate import BatchInputs, Item, Job, Mode

MULTIPLE = 8  # image sides are made multiples of this (the f = 8 first stage's factor)
# The most pixels img2img, depth2img and inpaint work at. SD 2.x was trained at 512-768 px; the VAE encoder's
# and decoder's full-resolution activations and their mid-block attention (quadratic in pixels) grow past
# several GiB above this (a 3000x3000 photo took 8 GB and failed). Larger inputs are shrunk, aspect kept.
MAX_WORK_PIXELS = 1024 * 1024
MASK_ASPECT_TOLERANCE = 0.01  # a mask whose aspect ratio differs more from the image's is refused


@dataclasses.dataclass
class ImageJob(Job):
    """A Job whose size comes from the input image rather than --H/--W.

    Job.check applies txt2img's size rule (each side at least 256); an input image only has to give a
    saved image the watermark can carry (256 * 256 pixels in total, imageio's own rule), which
    Mode.check tests. The generic checks therefore run on a stand-in size.
    """

    def check(self) -> list[str]:
        for name, value in (("height", self.H), ("width", self.W)):
            if value <= 0 or value % self.f:
                raise SDError(f"image {name} {value} is not a positive multiple of the first stage's factor {self.f}")
        return Job.check(dataclasses.replace(self, H=256, W=256))


def image_job(mode: "ImageMode", **fields) -> ImageJob:
    """The Job of an image command: H and W are the size the mode's model works at."""
    width, height = mode.work_size
    return ImageJob(H=height, W=width, **fields)


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


def mask_to_binary(mask: Image.Image) -> np.ndarray:
    """The repaint mask (H, W) bool of a mask image: True = repaint.

    The rule: transparent pixels count as black (keep), then a pixel is repainted when its brightest
    channel is at least 128. So white on black, strokes of any bright colour, and strokes painted on a
    transparent layer all mean "repaint here"; black, dark and transparent pixels are kept.
    """
    rgba = np.asarray(mask.convert("RGBA"), dtype=np.float32)  # (H, W, 4)
    over_black = rgba[..., :3] * (rgba[..., 3:] / 255.0)
    return over_black.max(axis=-1) >= 127.5


def load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Load a mask image for an image of `size` (W, H): binary (H, W), resized if its size differs."""
    mask = imageio.load_image(path, mode="RGBA")
    if mask.size != size:
        (mw, mh), (w, h) = mask.size, size
        if abs(math.log((mw / mh) / (w / h))) > MASK_ASPECT_TOLERANCE:
            raise SDError(f"mask {path} is {mw}x{mh} but the image is {w}x{h}: the aspect ratios differ; "
                          "give a mask of the image's shape")
        note(f"mask {mw}x{mh} resized to the image's {w}x{h}")
        binary = Image.fromarray(mask_to_binary(mask).astype(np.uint8) * 255).resize(size, Image.BILINEAR)
        return np.asarray(binary) >= 128
    return mask_to_binary(mask)


def check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0 or math.isnan(strength):
        raise SDError(f"--strength must be between 0 and 1 (got {strength})")


def encode_mean(model, image: torch.Tensor) -> torch.Tensor:
    """Scaled latent of images in [-1, 1] from the posterior mean: the same on every machine."""
    return model.get_first_stage_encoding(model.encode_first_stage(image), use_mean=True)


def extra_cond(model, cond: dict) -> dict:
    """BatchInputs.extra_cond from a conditioning builder's output and the model's unconditional extras."""
    # run_job gives both guidance branches the builder's c_concat, as uncond_extra does; only the class
    # label has an unconditional entry of its own (uc_adm).
    uncond = model.uncond_extra(cond)
    return {**cond, **({"uc_adm": uncond["c_adm"]} if "c_adm" in uncond else {})}


def repeat_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.expand(n, *x.shape[1:])


def require_model(model, cls: Optional[type], command: str, hint: str) -> None:
    """SDError unless `model` is of the class the command needs (cls None: a plain txt2img model)."""
    ok = isinstance(model, cls) if cls is not None else getattr(model, "build_conditioning", None) is None
    if not ok:
        raise SDError(f"{command} needs {hint}; this config builds {type(model).__name__}")


def steps_for_strength(steps: int, strength: float) -> int:
    """How many steps a run of `steps` takes at `strength` (the schedules' own trimming rule)."""
    from ldm.models.diffusion.schedules import trim_for_strength

    return len(trim_for_strength(torch.arange(steps, -1, -1, dtype=torch.float64), strength)) - 1


class ImageMode(Mode):
    """What the image modes share: the input image, the size the model works at and the saved size."""
    image: Image.Image

    @property
    def work_size(self) -> tuple[int, int]:
        """(W, H) of the model's pixel grid."""
        return self.image.size

    def image_size(self, job: Job) -> tuple[int, int]:
        return self.image.size

    def check(self, job: Job) -> None:
        imageio.check_watermark_size(*self.image_size(job))


# -- img2img and depth2img --------------------------------------------------------------------------

class Img2Img(ImageMode):
    """Text-guided image-to-image with a txt2img checkpoint (the reference's scripts/img2img.py)."""
    name = "img2img"

    def __init__(self, init_img: Path, strength: float):
        self.strength = float(strength)
        self.image = fit_to_multiple(imageio.load_image(init_img), "init image")
        self.z0: Optional[torch.Tensor] = None

    def check(self, job: Job) -> None:
        check_strength(self.strength)
        super().check(job)

    def check_model(self, model) -> None:
        require_model(model, None, "img2img", "a txt2img checkpoint (v2 base or v)")

    def prepare(self, model, job: Job, device: torch.device) -> None:
        self.check_model(model)
        self.z0 = encode_mean(model, imageio.pil_to_tensor(self.image).to(device))  # (1, 4, h, w)

    def steps_run(self, steps: int) -> int:
        return steps_for_strength(steps, self.strength)

    def batch(self, model, items: list[Item], generators, device) -> BatchInputs:
        if self.strength >= 1.0:
            return BatchInputs()
        return BatchInputs(start_latents=repeat_batch(self.z0, len(items)), strength=self.strength)

    def finish(self, images: torch.Tensor, items: list[Item]) -> torch.Tensor:
        """Strength 0 redoes nothing: the input itself, not its VAE round trip (which blurs it)."""
        if self.strength > 0.0:
            return images
        return repeat_batch(exact_tensor(self.image).to(images), images.shape[0])

    def reproduce(self, fields: dict) -> None:
        """--from-image: the recorded denoising strength replaces --strength."""
        if "Denoising strength" in fields:
            try:
                self.strength = float(fields["Denoising strength"])
            except ValueError:
                raise SDError(f"its Denoising strength '{fields['Denoising strength']}' is not a number") from None
            check_strength(self.strength)

    def settings(self) -> dict:
        return {"Denoising strength": self.strength}


class Depth2Img(Img2Img):
    """Depth-conditioned image-to-image: img2img whose UNet also sees the depth map (MiDaS or --depth-map)."""
    name = "depth2img"

    def __init__(self, init_img: Path, strength: float, depth_map: Optional[Path] = None, save_depth: bool = False):
        super().__init__(init_img, strength)
        self.depth_map = depth_map
        # A user's depth map: grayscale, brighter = nearer (MiDaS's inverse-depth convention).
        self.user_depth = None if depth_map is None else imageio.load_image(depth_map, mode="L")
        self.save_depth = save_depth
        self.c_concat: Optional[torch.Tensor] = None

    def check_model(self, model) -> None:
        from ldm.models.diffusion.image_modes import LatentDepth2ImageDiffusion

        require_model(model, LatentDepth2ImageDiffusion, "depth2img",
                      "a depth checkpoint (512-depth-ema.ckpt with configs/stable-diffusion/v2-midas-inference.yaml)")

    def prepare(self, model, job: Job, device: torch.device) -> None:
        super().prepare(model, job, device)
        image = imageio.pil_to_tensor(self.image).to(device)  # (1, 3, H, W)
        if self.user_depth is None:
            depth = model.depth_from_image(image)  # (1, 1, H', W') raw MiDaS (inverse) depth
        else:
            gray = np.asarray(self.user_depth, dtype=np.float32) / 255.0
            depth = torch.from_numpy(gray)[None, None].to(device)  # (1, 1, H', W')
        self.c_concat = model.build_conditioning(image, depth=depth)["c_concat"]  # (1, 1, h, w) in [-1, 1]
        if self.save_depth:
            self.write_depth(depth, job.outdir)

    def write_depth(self, depth: torch.Tensor, outdir: Path) -> Path:
        """OUTDIR/depth-NNNN.png: the depth used, at the image's size, scaled to 0 (far) .. 255 (near).

        Grayscale and without the watermark: it is a measurement of the user's image, not a generated
        picture, and the watermark would change its levels."""
        width, height = self.image.size
        d = F.interpolate(depth.float().cpu(), size=(height, width), mode="bicubic", align_corners=False)[0, 0]
        span = float(d.max() - d.min()) or 1.0
        gray = ((d - d.min()) / span * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
        path = imageio.save_numbered(Image.fromarray(gray, mode="L"), outdir, digits=imageio.GRID_DIGITS,
                                     prefix="depth-", watermark=False)
        note(f"depth map written to {path}")
        return path

    def batch(self, model, items: list[Item], generators, device) -> BatchInputs:
        inputs = super().batch(model, items, generators, device)
        inputs.extra_cond = extra_cond(model, {"c_concat": repeat_batch(self.c_concat, len(items))})
        return inputs

    def settings(self) -> dict:
        return {**super().settings(), "Depth": "file" if self.depth_map else "MiDaS"}


# -- inpainting ---------------------------------------------------------------------------------------

class LatentBlend:
    """An apply_model wrapper that makes any txt2img model inpaint (what AUTOMATIC1111 users do).

    At every model call the kept (unmasked) latent cells are replaced by the input image's latent
    noised to the current level, sqrt(a) z0 + sqrt(1 - a) n in the model's VP space, with one fixed
    noise n per image: the model always sees the true surroundings at the right noise level and
    repaints only the masked cells. (The sampler state of the kept cells is never shown to the model;
    the decoded kept pixels are replaced by the input's afterwards.)
    """

    def __init__(self, apply_model, model_sigmas: torch.Tensor, keep: torch.Tensor):
        self.apply_model = apply_model
        self.model_sigmas = model_sigmas  # (T,) float64
        self.keep = keep  # (1, 1, h, w) bool: latent cells none of whose pixels is repainted
        self.z0: Optional[torch.Tensor] = None  # (B, 4, h, w) set per batch
        self.noise: Optional[torch.Tensor] = None  # (B, 4, h, w)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        from ldm.models.diffusion.schedules import t_to_sigma

        sigma = t_to_sigma(t.detach().to("cpu", torch.float64), self.model_sigmas)  # (B',)
        sqrt_a = (1.0 / (1.0 + sigma ** 2)).sqrt()
        shape = (-1, 1, 1, 1)
        # guidance runs the batch twice ([uncond; cond]): repeat the per-image tensors to match
        reps = x_t.shape[0] // self.z0.shape[0]
        z0, noise = self.z0.repeat(reps, 1, 1, 1), self.noise.repeat(reps, 1, 1, 1)
        known = (sqrt_a.reshape(shape).to(x_t) * z0.to(x_t)
                 + (sigma * sqrt_a).reshape(shape).to(x_t) * noise.to(x_t))  # sqrt(1 - a) = sigma sqrt(a)
        return self.apply_model(torch.where(self.keep.to(x_t.device), known, x_t), t, cond)


class Inpaint(ImageMode):
    """Repaint the white part of a mask: the 9-channel inpainting UNet, or latent blending with any model."""
    name = "inpaint"

    def __init__(self, image: Path, mask: Path):
        self.original = shrink_to_work_size(imageio.load_image(image), "image")
        repaint = load_mask(mask, self.original.size)  # (H, W) bool
        if not repaint.any():
            note("the mask is all black: nothing will be repainted")
        self.image = Image.fromarray(pad_to_multiple(np.asarray(self.original)))
        self.repaint = torch.from_numpy(pad_to_multiple(repaint))[None, None].float()  # (1, 1, Hp, Wp)
        self.blend: Optional[LatentBlend] = None
        self.c_concat: Optional[torch.Tensor] = None
        self.z0: Optional[torch.Tensor] = None

    def image_size(self, job: Job) -> tuple[int, int]:
        return self.original.size

    def prepare(self, model, job: Job, device: torch.device) -> None:
        from ldm.models.diffusion.image_modes import LatentInpaintDiffusion
        from ldm.models.diffusion.schedules import sigmas_from_alphas_cumprod

        image = imageio.pil_to_tensor(self.image).to(device)  # (1, 3, Hp, Wp)
        mask = self.repaint.to(device)
        if isinstance(model, LatentInpaintDiffusion):
            self.c_concat = model.build_conditioning(image, mask)["c_concat"]  # (1, 5, h, w)
            return
        require_model(model, None, "inpaint", "an inpainting or a txt2img checkpoint")
        self.z0 = encode_mean(model, image)  # (1, 4, h, w)
        f = model.downsampling_factor
        keep = F.max_pool2d(mask, f) < 0.5  # a latent cell is kept only if none of its pixels is repainted
        self.blend = LatentBlend(model.apply_model, sigmas_from_alphas_cumprod(model.alphas_cumprod), keep)

    def batch(self, model, items: list[Item], generators, device) -> BatchInputs:
        n = len(items)
        if self.blend is None:
            return BatchInputs(extra_cond=extra_cond(model, {"c_concat": repeat_batch(self.c_concat, n)}))
        self.blend.z0 = repeat_batch(self.z0, n)
        self.blend.noise = torch.stack([torch.randn(self.z0.shape[1:], generator=g) for g in generators]).to(device)
        # the masked cells start from the input's latent under full noise (A1111's "original" fill)
        return BatchInputs(start_latents=self.blend.z0, strength=1.0)

    def apply_model(self, model):
        return super().apply_model(model) if self.blend is None else self.blend

    def finish(self, images: torch.Tensor, items: list[Item]) -> torch.Tensor:
        """Paste the kept pixels back (exact levels, see exact_tensor) and crop the padding."""
        width, height = self.original.size
        repaint = self.repaint[..., :height, :width].to(images.device)
        kept = exact_tensor(self.original).to(images)
        return torch.where(repaint > 0.5, images[..., :height, :width], kept)

    def settings(self) -> dict:
        return {"Inpaint": "inpainting model" if self.blend is None else "latent blend"}


# -- x4 upscaling -------------------------------------------------------------------------------------

class Upscale(ImageMode):
    """The x4 upscaler: the latent has the low-res image's size; the f = 4 VAE makes it 4x per side.

    Tiling (ldm.tiling): with tile=None the run is tiled when untiled_peak_bytes exceeds 80% of the
    available memory; tile=True/False forces it. tile_size and overlap count latent cells (= input
    pixels); the same tiles serve every UNet call and the VAE decoder.
    """
    name = "upscale"

    def __init__(self, image: Path, noise_level: int, tile: Optional[bool] = None, tile_size: int = 128,
                 overlap: Optional[int] = None):
        self.image = imageio.load_image(image)
        self.noise_level = int(noise_level)
        self.tile, self.tile_size = tile, int(tile_size)
        self.overlap = self.tile_size // 4 if overlap is None else int(overlap)
        self.low_res: Optional[torch.Tensor] = None
        self.tiled = False

    @property
    def work_size(self) -> tuple[int, int]:
        return self.image_size(None)

    def image_size(self, job) -> tuple[int, int]:
        width, height = self.image.size
        return 4 * width, 4 * height

    def check(self, job: Job) -> None:
        width, height = self.image_size(job)
        if max(width, height) > job.limits.max_side:
            raise SDError(f"upscaling {self.image.size[0]}x{self.image.size[1]} would give {width}x{height}, above "
                          f"--max-side {job.limits.max_side}: give a smaller image or raise --max-side")
        if not 0 <= self.noise_level <= 350:
            raise SDError(f"--noise-level must be between 0 and 350 (got {self.noise_level})")
        if self.tile_size < 8 or not 0 <= self.overlap < self.tile_size:
            raise SDError(f"--tile-size must be at least 8 and the overlap in [0, tile size) "
                          f"(got {self.tile_size} and {self.overlap})")
        super().check(job)

    def prepare(self, model, job: Job, device: torch.device) -> None:
        from ldm import tiling
        from ldm.models.diffusion.image_modes import LatentUpscaleDiffusion

        require_model(model, LatentUpscaleDiffusion, "upscale",
                      "the x4 upscaler (x4-upscaler-ema.ckpt with configs/stable-diffusion/x4-upscaling.yaml)")
        self.low_res = imageio.pil_to_tensor(self.image).to(device)  # (1, 3, h, w)
        width, height = self.image.size
        self.tiled = self.tile
        if self.tiled is None:
            need = tiling.untiled_peak_bytes(model, height, width, job.n_samples, guided=job.sampling.scale != 1.0)
            have = tiling.available_memory()
            self.tiled = need > 0.8 * have
            if self.tiled:
                note(f"an untiled run would need about {need / 2**30:.1f} GiB of {have / 2**30:.1f} GiB available: "
                     f"running in {self.tile_size}x{self.tile_size} tiles")

    def apply_model(self, model):
        from ldm import tiling

        if not self.tiled:
            return super().apply_model(model)
        return tiling.TiledApplyModel(model.apply_model, self.tile_size, self.overlap)

    def decode(self, model, latents: torch.Tensor) -> torch.Tensor:
        from ldm import tiling

        if not self.tiled:
            return super().decode(model, latents)
        return tiling.TiledDecoder(model.decode_first_stage, model.downsampling_factor, self.tile_size,
                                   self.overlap)(latents)

    def batch(self, model, items: list[Item], generators, device) -> BatchInputs:
        cond = model.build_conditioning(repeat_batch(self.low_res, len(items)), self.noise_level, generators=generators)
        return BatchInputs(extra_cond=extra_cond(model, cond))

    def settings(self) -> dict:
        return {"Noise level": self.noise_level, **({"Tiles": f"{self.tile_size}/{self.overlap}"} if self.tiled else {})}
