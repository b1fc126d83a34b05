"""Inpainting: repaint the white part of a mask, with the 9-channel inpainting UNet or by latent
blending with any txt2img model; the unmasked pixels are kept exactly."""
from __future__ import annotations

import math
from typing import Callable, Optional, TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.files import imageio
from ldm.errors import SDError, note
from ldm.tasks.base import (BatchInputs, ImageInput, ImageTask, check_strength, exact_tensor, extra_cond, pad_to_multiple,
                            repeat_batch, require_model, shrink_to_work_size, steps_for_strength)

if TYPE_CHECKING:
    from ldm.loading.detect import ModelChoice
    from ldm.request import Item, Request

MASK_ASPECT_TOLERANCE = 0.01  # a mask whose aspect ratio differs more from the image's is refused

def mask_to_binary(mask: Image.Image) -> np.ndarray:
    """The repaint mask (H, W) bool of a mask image: True = repaint.

    The rule: transparent pixels count as black (keep), then a pixel is repainted when its brightest
    channel is at least 128. So white on black, strokes of any bright colour, and strokes painted on a
    transparent layer all mean "repaint here"; black, dark and transparent pixels are kept.
    """
    rgba = np.asarray(mask.convert("RGBA"), dtype=np.float32)  # (H, W, 4)
    over_black = rgba[..., :3] * (rgba[..., 3:] / 255.0)
    return over_black.max(axis=-1) >= 127.5


def _named(source: ImageInput, what: str) -> str:
    return what if isinstance(source, Image.Image) else f"{what} {source}"


def load_mask(path: ImageInput, size: tuple[int, int]) -> np.ndarray:
    """Load a mask image for an image of `size` (W, H): binary (H, W), resized if its size differs."""
    mask = imageio.load_image(path, mode="RGBA", what="the mask")
    if mask.size != size:
        (mw, mh), (w, h) = mask.size, size
        if abs(math.log((mw / mh) / (w / h))) > MASK_ASPECT_TOLERANCE:
            raise SDError(f"{_named(path, 'the mask')} is {mw}x{mh} but the image is {w}x{h}: the aspect ratios differ; "
                          "give a mask of the image's shape")
        note(f"mask {mw}x{mh} resized to the image's {w}x{h}")
        binary = Image.fromarray(mask_to_binary(mask).astype(np.uint8) * 255).resize(size, Image.BILINEAR)
        return np.asarray(binary) >= 128
    return mask_to_binary(mask)


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


class Inpaint(ImageTask):
    """Repaint the white part of a mask: the 9-channel inpainting UNet, or latent blending with any model."""
    name = "inpaint"
    encodes_input = True

    def __init__(self, image: ImageInput, mask: ImageInput, strength: float = 1.0):
        # strength < 1 starts the masked cells from the input noised to that level (AUTOMATIC1111's
        # "original" fill at its denoising strength); 1, the commands' value, from full noise.
        self.strength = float(strength)
        self.original = shrink_to_work_size(imageio.load_image(image), "image")
        repaint = load_mask(mask, self.original.size)  # (H, W) bool
        if not repaint.any():
            note("the mask is all black: nothing will be repainted")
        self.image = Image.fromarray(pad_to_multiple(np.asarray(self.original)))
        self.repaint = torch.from_numpy(pad_to_multiple(repaint))[None, None].float()  # (1, 1, Hp, Wp)
        self.blend: Optional[LatentBlend] = None
        self.c_concat: Optional[torch.Tensor] = None
        self.z0: Optional[torch.Tensor] = None

    def image_size(self, request: "Request") -> tuple[int, int]:
        return self.original.size

    def check(self, request: "Request", name: Callable[[str], str] = lambda key: key) -> None:
        check_strength(self.strength, name)
        super().check(request, name)

    def steps_run(self, sampling) -> int:
        return steps_for_strength(sampling, self.strength)

    def prepare(self, model, request: "Request", device: torch.device, choice: "ModelChoice") -> None:
        from ldm.models.diffusion.conditioned import LatentInpaintDiffusion
        from ldm.models.diffusion.schedules import sigmas_from_alphas_cumprod

        image = imageio.pil_to_tensor(self.image).to(device)  # (1, 3, Hp, Wp)
        mask = self.repaint.to(device)
        if isinstance(model, LatentInpaintDiffusion):
            self.c_concat = model.build_conditioning(image, mask)["c_concat"]  # (1, 5, h, w)
            if self.strength < 1.0:
                self.z0 = self.encode(model, image)  # (1, 4, h, w)
            return
        require_model(model, None, "inpaint", "an inpainting or a txt2img checkpoint")
        self.z0 = self.encode(model, image)  # (1, 4, h, w)
        f = model.downsampling_factor
        keep = F.max_pool2d(mask, f) < 0.5  # a latent cell is kept only if none of its pixels is repainted
        self.blend = LatentBlend(model.apply_model, sigmas_from_alphas_cumprod(model.alphas_cumprod), keep)

    def batch(self, model, items: list[Item], generators, device) -> BatchInputs:
        n = len(items)
        if self.blend is None:
            inputs = BatchInputs(extra_cond=extra_cond(model, {"c_concat": repeat_batch(self.c_concat, n)}))
            if self.strength < 1.0:
                inputs.start_latents, inputs.strength = repeat_batch(self.z0, n), self.strength
            return inputs
        self.blend.z0 = repeat_batch(self.z0, n)
        self.blend.noise = torch.stack([torch.randn(self.z0.shape[1:], generator=g) for g in generators]).to(device)
        # the masked cells start from the input's latent under noise (A1111's "original" fill)
        return BatchInputs(start_latents=self.blend.z0, strength=self.strength)

    def apply_model(self, model):
        return super().apply_model(model) if self.blend is None else self.blend

    def finish(self, images: torch.Tensor, items: list[Item]) -> torch.Tensor:
        """Paste the kept pixels back (exact levels, see exact_tensor) and crop the padding."""
        width, height = self.original.size
        repaint = self.repaint[..., :height, :width].to(images.device)
        kept = exact_tensor(self.original).to(images)
        return torch.where(repaint > 0.5, images[..., :height, :width], kept)

    def settings(self) -> dict:
        strength = {"Denoising strength": self.strength} if self.strength < 1.0 else {}
        return {"Inpaint": "inpainting model" if self.blend is None else "latent blend", **strength}
