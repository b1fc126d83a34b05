"""The x4 upscaler: the latent has the low-res image's size; the f = 4 VAE makes it 4x per side."""
from __future__ import annotations

from typing import Callable, Optional, TYPE_CHECKING

import torch

from ldm.files import imageio
from ldm.errors import SDError, note
from ldm.tasks.base import BatchInputs, ImageInput, ImageTask, extra_cond, repeat_batch, require_model

if TYPE_CHECKING:
    from ldm.loading.detect import ModelChoice
    from ldm.request import Item, Request


class Upscale(ImageTask):
    """The x4 upscaler: the latent has the low-res image's size; the f = 4 VAE makes it 4x per side.

    Tiling (ldm.tasks.tiling): with tile=None the run is tiled when untiled_peak_bytes exceeds 80% of the
    available memory; tile=True/False forces it. tile_size and overlap count latent cells (= input
    pixels); the same tiles serve every UNet call and the VAE decoder.
    """
    name = "upscale"

    def __init__(self, image: ImageInput, noise_level: int, tile: Optional[bool] = None, tile_size: int = 128,
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

    def image_size(self, request: "Request") -> tuple[int, int]:
        width, height = self.image.size
        return 4 * width, 4 * height

    def check(self, request: "Request", name: Callable[[str], str] = lambda key: key) -> None:
        width, height = self.image_size(request)
        if max(width, height) > request.limits.max_side:
            raise SDError(f"upscaling {self.image.size[0]}x{self.image.size[1]} would give {width}x{height}, above "
                          f"{name('max_side')} {request.limits.max_side}: give a smaller image or raise it")
        if not 0 <= self.noise_level <= 350:
            raise SDError(f"{name('noise_level')} must be between 0 and 350 (got {self.noise_level})")
        if self.tile_size < 8 or not 0 <= self.overlap < self.tile_size:
            raise SDError(f"--tile-size must be at least 8 and the overlap in [0, tile size) "
                          f"(got {self.tile_size} and {self.overlap})")
        super().check(request, name)

    def prepare(self, model, request: "Request", device: torch.device, choice: "ModelChoice") -> None:
        from ldm.tasks import tiling
        from ldm.models.diffusion.conditioned import LatentUpscaleDiffusion

        require_model(model, LatentUpscaleDiffusion, "upscale",
                      "the x4 upscaler (x4-upscaler-ema.ckpt with configs/stable-diffusion/x4-upscaling.yaml)")
        self.low_res = imageio.pil_to_tensor(self.image).to(device)  # (1, 3, h, w)
        width, height = self.image.size
        self.tiled = self.tile
        if self.tiled is None:
            need = tiling.untiled_peak_bytes(model, height, width, request.batch_size, guided=request.sampling.scale != 1.0)
            have = tiling.available_memory()
            self.tiled = need > 0.8 * have
            if self.tiled:
                note(f"an untiled run would need about {need / 2**30:.1f} GiB of {have / 2**30:.1f} GiB available: "
                     f"running in {self.tile_size}x{self.tile_size} tiles")

    def apply_model(self, model):
        from ldm.tasks import tiling

        if not self.tiled:
            return super().apply_model(model)
        return tiling.TiledApplyModel(model.apply_model, self.tile_size, self.overlap)

    def decode(self, model, latents: torch.Tensor) -> torch.Tensor:
        from ldm.tasks import tiling

        if not self.tiled:
            return super().decode(model, latents)
        return tiling.TiledDecoder(model.decode_first_stage, model.downsampling_factor, self.tile_size,
                                   self.overlap)(latents)

    def batch(self, model, items: list[Item], generators, device) -> BatchInputs:
        cond = model.build_conditioning(repeat_batch(self.low_res, len(items)), self.noise_level, generators=generators)
        return BatchInputs(extra_cond=extra_cond(model, cond))

    def settings(self) -> dict:
        return {"Noise level": self.noise_level, **({"Tiles": f"{self.tile_size}/{self.overlap}"} if self.tiled else {})}
