"""The image-conditioned SD 2.x models: inpainting, depth-to-image, the x4 upscaler and Stable unCLIP.

Each is the shared LatentDiffusion container plus the module its conditioning needs and one method,
`build_conditioning`, that turns the user's image input into the extra entries of the conditioning dict
(`c_concat`, concatenated to the noisy latent along channels, and for the upscaler `c_adm`, the UNet's
class label). The unconditional branch of classifier-free guidance gets the same extra entries as the
conditional one, as in the reference demos: only the text changes (`uncond_extra`).

The configs name these classes ldm.models.diffusion.ddpm.<Name>; ddpm resolves them from here.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ldm.errors import SDError
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import instantiate_from_config

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def _per_image_noise(x: torch.Tensor, generators: Generators,
                     noise: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], Optional[torch.Generator]]:
    """(noise, generator) for a noise augmentation of x (B, ...): image k's noise from generators[k] (seeded
    seed + k by the caller), or one generator's draw for the batch, or the `noise` given."""
    if noise is None and generators is not None and not isinstance(generators, torch.Generator):
        if len(generators) != x.shape[0]:
            raise SDError(f"{len(generators)} generators for {x.shape[0]} images")
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device) for g in generators])
    return noise, generators if isinstance(generators, torch.Generator) else None


MAX_MIX_WEIGHT = 1000.0  # only ratios matter; a bound keeps their sum finite


def check_mix_weights(weights: Sequence[float], pictures: int) -> None:
    """SDError unless there is one finite weight per picture and the weights do not sum to 0 (the mix divides
    by their sum): unCLIP's mixing rule, checked by the variations task before the model loads and by mix()."""
    weights = [float(w) for w in weights]
    if len(weights) != pictures:
        raise SDError(f"{len(weights)} weights for {pictures} pictures: give one weight per picture (--weight), in "
                      "the same order, or none for equal weights")
    if not all(math.isfinite(w) and abs(w) <= MAX_MIX_WEIGHT for w in weights) or abs(math.fsum(weights)) < 1e-6:
        raise SDError(f"the image weights {weights} must be finite numbers up to {MAX_MIX_WEIGHT:g} in size and must "
                      "not sum to 0 (the mix divides by their sum)")


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
        noise, generator = _per_image_noise(low_res, generators, noise)
        x_aug, level = self.low_scale_model(low_res, int(noise_level), noise=noise, generator=generator)
        return {"c_concat": x_aug, "c_adm": level}  # (B, 3, h, w), (B,)


class ImageEmbeddingConditionedLatentDiffusion(_ImageConditionedDiffusion):
    """Stable unCLIP: SD 2.1-768 whose UNet class label is a CLIP image embedding (B, D), noised to a chosen
    level, beside that level's sinusoidal embedding: c_adm (B, 2D), 2048 wide for H, 1536 for L. The text
    prompt still conditions through cross-attention. Guidance's unconditional branch gets an all-zeros
    c_adm (the reference demo's), so the scale pushes towards the image as well as the text."""

    def __init__(self, embedder_config: Any, *args: Any, embedding_key: str = "jpg", embedding_dropout: float = 0.5,
                 freeze_embedder: bool = True, noise_aug_config: Any = None, **kwargs: Any):
        # embedding_key / embedding_dropout / freeze_embedder only matter in training (the embedder is frozen here).
        super().__init__(*args, **kwargs)
        self.embedder = instantiate_from_config(embedder_config).eval()
        self.noise_augmentor = instantiate_from_config(noise_aug_config).eval() if noise_aug_config is not None else None

    @property
    def max_noise_level(self) -> int:
        return self.noise_augmentor.max_noise_level - 1 if self.noise_augmentor is not None else 0

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> CLIP image embeddings (N, D), float32."""
        self._check_image(images, "unCLIP input image")
        return self.embedder(images)

    @staticmethod
    def mix(embeddings: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
        """The weighted mean sum(w_i e_i) / sum(w_i) of embeddings (N, D) -> (1, D). Unlike the reference demo,
        the weights count whether or not noise is added afterwards."""
        check_mix_weights(weights, embeddings.shape[0])
        w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
        mixed = (w[:, None] * embeddings.double()).sum(0, keepdim=True) / w.sum()
        return mixed.to(embeddings.dtype)  # (1, D)

    def check_noise_level(self, noise_level: int) -> None:
        top = self.max_noise_level
        if not 0 <= int(noise_level) <= top:
            raise SDError(f"--noise-level must be in 0..{top} (got {noise_level})")
        aug = self.noise_augmentor
        if int(noise_level) > 0 and aug.clip_stats_path is not None and aug.stats_source is None:
            raise SDError(f"noise level {noise_level} needs the CLIP image statistics of unCLIP-L ({aug.clip_stats_path}, "
                          "not in any checkpoint): download ViT-L-14_stats.th with the Karlo v1 alpha weights and "
                          "pass --clip-stats FILE, or use noise level 0")

    @torch.no_grad()
    def build_conditioning(self, embedding: torch.Tensor, noise_level: int = 0, generators: Generators = None,
                           noise: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Image embeddings (B, D) -> {"c_adm": [embedding noised to `noise_level`, level embedding] (B, 2D)}.
        The noise of image k comes from generators[k] (seed + k), or is given as `noise`."""
        if embedding.ndim != 2:
            raise SDError(f"unCLIP image embedding has shape {tuple(embedding.shape)}; expected (B, D)")
        if self.noise_augmentor is None:
            return {"c_adm": embedding}
        self.check_noise_level(noise_level)
        noise, generator = _per_image_noise(embedding, generators, noise)
        z, level = self.noise_augmentor(embedding, int(noise_level), noise=noise, generator=generator)
        return {"c_adm": torch.cat([z, level], dim=1)}  # (B, 2D)

    def uncond_extra(self, cond_extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**cond_extra, "c_adm": torch.zeros_like(cond_extra["c_adm"])}
