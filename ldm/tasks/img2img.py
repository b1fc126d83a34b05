"""img2img and depth2img: redraw an input image from a noise level set by the strength (depth2img
also conditions on the image's depth)."""
from __future__ import annotations

from typing import Callable, Optional, TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.files import imageio
from ldm.errors import SDError
from ldm.tasks.base import (BatchInputs, ImageInput, ImageTask, check_strength, exact_tensor, extra_cond, fit_to_multiple,
                            is_unclip, repeat_batch, require_model, steps_for_strength)

if TYPE_CHECKING:
    from ldm.loading.detect import ModelChoice
    from ldm.request import Item, Request


class Img2Img(ImageTask):
    """Text-guided image-to-image with a txt2img checkpoint (the reference's scripts/img2img.py), or with a Stable
    unCLIP one, where the input's CLIP image embedding also conditions (AUTOMATIC1111's unCLIP img2img)."""
    name = "img2img"
    encodes_input = True

    def __init__(self, init_img: ImageInput, strength: float):
        self.strength = float(strength)
        self.image = fit_to_multiple(imageio.load_image(init_img, what="the init image"), "init image")
        self.z0: Optional[torch.Tensor] = None
        self.embedding: Optional[torch.Tensor] = None  # unCLIP models: the input's CLIP image embedding (1, D)

    def check(self, request: "Request", name: Callable[[str], str] = lambda key: key) -> None:
        check_strength(self.strength, name)
        super().check(request, name)

    def check_model(self, model) -> None:
        if not is_unclip(model):
            require_model(model, None, "img2img", "a txt2img checkpoint (v2 base or v) or a Stable unCLIP one")

    def prepare(self, model, request: "Request", device: torch.device, choice: "ModelChoice") -> None:
        self.check_model(model)
        image = imageio.pil_to_tensor(self.image).to(device)  # (1, 3, H, W)
        self.z0 = self.encode(model, image)  # (1, 4, h, w)
        self.embedding = None
        if is_unclip(model):  # as AUTOMATIC1111: the input's own CLIP embedding (level 0) conditions too
            from ldm.tasks.unclip import clip_stats_file

            clip_stats_file(model, choice.ckpt, None)
            self.embedding = model.embed_images(image)  # (1, D)

    def steps_run(self, sampling) -> int:
        return steps_for_strength(sampling, self.strength)

    def batch(self, model, items: list[Item], generators, device) -> BatchInputs:
        inputs = BatchInputs() if self.strength >= 1.0 else BatchInputs(start_latents=repeat_batch(self.z0, len(items)),
                                                                         strength=self.strength)
        if self.embedding is not None:
            cond = model.build_conditioning(repeat_batch(self.embedding, len(items)), 0, generators=generators)
            inputs.extra_cond = extra_cond(model, cond)
        return inputs

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
        return {"Denoising strength": self.strength, **({"Noise level": 0} if self.embedding is not None else {})}

class Depth2Img(Img2Img):
    """Depth-conditioned image-to-image: img2img whose UNet also sees the depth map (MiDaS or --depth-map)."""
    name = "depth2img"
    save_depth = False  # `sd depth2img --save-depth`: the batch runner then writes self.depth beside the samples

    def __init__(self, init_img: ImageInput, strength: float, depth_map: Optional[ImageInput] = None):
        super().__init__(init_img, strength)
        # A user's depth map: grayscale, brighter = nearer (MiDaS's inverse-depth convention).
        self.user_depth = None if depth_map is None else imageio.load_image(depth_map, mode="L", what="the depth map")
        self.c_concat: Optional[torch.Tensor] = None
        self.depth: Optional[Image.Image] = None  # the depth used, once prepared (depth_picture)

    def check_model(self, model) -> None:
        from ldm.models.diffusion.conditioned import LatentDepth2ImageDiffusion

        require_model(model, LatentDepth2ImageDiffusion, "depth2img",
                      "a depth checkpoint (512-depth-ema.ckpt with configs/stable-diffusion/v2-midas-inference.yaml)")

    def prepare(self, model, request: "Request", device: torch.device, choice: "ModelChoice") -> None:
        super().prepare(model, request, device, choice)
        image = imageio.pil_to_tensor(self.image).to(device)  # (1, 3, H, W)
        if self.user_depth is None:
            depth = model.depth_from_image(image)  # (1, 1, H', W') raw MiDaS (inverse) depth
        else:
            gray = np.asarray(self.user_depth, dtype=np.float32) / 255.0
            depth = torch.from_numpy(gray)[None, None].to(device)  # (1, 1, H', W')
        self.c_concat = model.build_conditioning(image, depth=depth)["c_concat"]  # (1, 1, h, w) in [-1, 1]
        self.depth = depth_picture(depth, self.image.size)

    def batch(self, model, items: list[Item], generators, device) -> BatchInputs:
        inputs = super().batch(model, items, generators, device)
        inputs.extra_cond = extra_cond(model, {"c_concat": repeat_batch(self.c_concat, len(items))})
        return inputs

    def settings(self) -> dict:
        return {**super().settings(), "Depth": "file" if self.user_depth is not None else "MiDaS"}


def depth_picture(depth: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """The depth (1, 1, H', W') as a grayscale picture of `size` (W, H), scaled to 0 (far) .. 255 (near).

    Saved without the watermark: it is a measurement of the user's image, not a generated picture, and
    the watermark would change its levels."""
    width, height = size
    d = F.interpolate(depth.float().cpu(), size=(height, width), mode="bicubic", align_corners=False)[0, 0]
    span = float(d.max() - d.min()) or 1.0
    gray = ((d - d.min()) / span * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(gray, mode="L")
