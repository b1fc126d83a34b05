"""The image-conditioned SD 2.x models: inpainting, depth-to-image and the x4 upscaler.

Each is the shared LatentDiffusion container plus the module its conditioning needs and one method,
`build_conditioning`, that turns the user's image input into the extra entries of the conditioning dict
(`c_concat`, concatenated to the noisy latent along channels, and for the upscaler `c_adm`, the UNet's
class label). The unconditional branch of classifier-free guidance gets the same extra entries as the
conditional one, as in the reference demos: only the text changes (`uncond_extra`).

The configs name these classes ldm.models.diffusion.ddpm.<Name>; ddpm resolves them from here.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ldm.errors import SDError
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import instantiate_from_config

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


class _ImageConditionedDiffusion(LatentDiffusion):
    """What the three image modes share: guidance keeps the image conditioning, and image checks."""

    def uncond_extra(self, cond_extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The extra conditioning of the unconditional branch: the same tensors (reference behaviour)."""
        return dict(cond_extra)

    def _check_image(self, image: torch.Tensor, what: str, channels: int = 3, multiple: int = 1) -> None:
        if image.ndim != 4 or image.shape[1] != channels:
            raise SDError(f"{what} has shape {tuple(image.shape)}; expected (B, {channels}, H, W)")
        if image.shape[2] % multiple or image.shape[3] % multiple:
            raise SDError(f"{what} size {image.shape[3]}x{image.shape[2]} must be a multiple of {multiple} per side")


class LatentInpaintDiffusion(_ImageConditionedDiffusion):
    """Inpainting: the UNet sees [noisy latent 4, mask 1, masked-image latent 4] = 9 channels."""

    def __init__(self, *args: Any, concat_keys: Sequence[str] = ("mask", "masked_image"),
                 masked_image_key: str = "masked_image", c_concat_log_start: Optional[int] = None,
                 c_concat_log_end: Optional[int] = None, **kwargs: Any):
        # c_concat_log_* only select channels for training-time image logs.
        super().__init__(*args, **kwargs)
        concat_keys = tuple(concat_keys)
        if sorted(concat_keys) != sorted(("mask", masked_image_key)):
            raise SDError(f"LatentInpaintDiffusion: concat_keys {list(concat_keys)} must be 'mask' and "
                          f"masked_image_key '{masked_image_key}'")
        self.concat_keys = concat_keys
        self.masked_image_key = masked_image_key

    @torch.no_grad()
    def build_conditioning(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """image (B, 3, H, W) in [-1, 1], mask (B, 1, H, W) with 1 = repaint -> {"c_concat": (B, 5, h, w)}."""
        f = self.downsampling_factor
        self._check_image(image, "inpainting image", 3, f)
        self._check_image(mask, "inpainting mask", 1, f)
        if mask.shape[0] != image.shape[0] or mask.shape[2:] != image.shape[2:]:
            raise SDError(f"inpainting mask {tuple(mask.shape)} does not match image {tuple(image.shape)}")
        mask = (mask >= 0.5).to(image.dtype)  # binary, as the reference demo makes it
        masked_image = image * (mask < 0.5)  # the part to keep; the area to repaint is 0 (mid grey)
        latent = self.encode_mean(masked_image)  # (B, 4, h, w)
        parts = {self.masked_image_key: latent,
                 "mask": F.interpolate(mask, size=latent.shape[-2:])}  # nearest, (B, 1, h, w)
        return {"c_concat": torch.cat([parts[k] for k in self.concat_keys], dim=1)}  # (B, 5, h, w)


class LatentDepth2ImageDiffusion(_ImageConditionedDiffusion):
    """Depth-to-image: the UNet sees [latent 4, depth in [-1, 1] 1] = 5 channels; depth from MiDaS."""

    def __init__(self, depth_stage_config: Any, *args: Any, concat_keys: Sequence[str] = ("midas_in",),
                 depth_stage_key: Optional[str] = None, c_concat_log_start: Optional[int] = None,
                 c_concat_log_end: Optional[int] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.depth_model = instantiate_from_config(depth_stage_config)
        self.depth_stage_key = depth_stage_key or tuple(concat_keys)[0]

    @torch.no_grad()
    def depth_from_image(self, image: torch.Tensor, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Raw MiDaS depth (inverse depth, larger = nearer) of images (B, 3, H, W) in [-1, 1], (B, 1, H', W');
        resized bicubic to `size` (h, w) when given."""
        from ldm.modules.midas.api import prepare_midas_input  # MiDaS is only needed by this mode

        self._check_image(image, "depth2img image")
        depth = self.depth_model(prepare_midas_input(image))
        return depth if size is None else _resize_depth(depth, size)

    @torch.no_grad()
    def build_conditioning(self, image: torch.Tensor,
                           depth: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """image (B, 3, H, W) in [-1, 1] (and optionally its precomputed raw depth (B, 1, H', W'))
        -> {"c_concat": depth at latent size scaled per image to [-1, 1], (B, 1, H/f, W/f)}."""
        f = self.downsampling_factor
        self._check_image(image, "depth2img image", 3, f)
        size = (image.shape[2] // f, image.shape[3] // f)
        depth = self.depth_from_image(image, size) if depth is None else _resize_depth(depth, size)
        lo = torch.amin(depth, dim=(1, 2, 3), keepdim=True)
        hi = torch.amax(depth, dim=(1, 2, 3), keepdim=True)
        # A flat depth map (hi == lo) would divide 0 by 0; it maps to -1 instead of NaN.
        span = torch.clamp(hi - lo, min=torch.finfo(depth.dtype).tiny)
        return {"c_concat": 2.0 * (depth - lo) / span - 1.0}  # (B, 1, h, w)


def _resize_depth(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H', W') or (B, H', W') depth -> (B, 1, h, w), bicubic as the reference."""
    if depth.ndim == 3:
        depth = depth[:, None]
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise SDError(f"depth map has shape {tuple(depth.shape)}; expected (B, 1, H, W)")
    return F.interpolate(depth, size=tuple(size), mode="bicubic", align_corners=False)


class LatentUpscaleDiffusion(_ImageConditionedDiffusion):
    """x4 upscaler: the UNet sees [latent 4, noised low-res image 3] = 7 channels and the noise level as
    class label. The latent has the low-res image's size; the f=4 VAE decodes it to 4x per side."""

    def __init__(self, *args: Any, low_scale_config: Any, low_scale_key: str = "LR",
                 noise_level_key: Optional[str] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.low_scale_model = instantiate_from_config(low_scale_config).eval()
        self.low_scale_key = low_scale_key
        self.noise_level_key = noise_level_key

    @torch.no_grad()
    def build_conditioning(self, low_res: torch.Tensor, noise_level: int = 20, generators: Generators = None,
                           noise: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """low_res (B, 3, h, w) in [-1, 1] -> {"c_concat": noised low_res (B, 3, h, w), "c_adm": (B,) long}.

        The augmentation noise of image k comes from generators[k] (the caller seeds them with seed + k),
        or from one generator for the batch, or is given as `noise`.
        """
        self._check_image(low_res, "upscaler input image")
        top = self.low_scale_model.max_noise_level
        if not 0 <= int(noise_level) <= top:
            raise SDError(f"noise_level must be in 0..{top} (the range the upscaler was trained on), got {noise_level}")
        if noise is None and generators is not None and not isinstance(generators, torch.Generator):
            if len(generators) != low_res.shape[0]:
                raise SDError(f"{len(generators)} generators for {low_res.shape[0]} images")
            noise = torch.stack([torch.randn(low_res.shape[1:], generator=g, device=g.device) for g in generators])
        x_aug, level = self.low_scale_model(low_res, int(noise_level), noise=noise,
                                            generator=generators if isinstance(generators, torch.Generator) else None)
        return {"c_concat": x_aug, "c_adm": level}  # (B, 3, h, w), (B,)
