"""Previews that cost next to nothing: AUTOMATIC1111's "Approx cheap", a fixed linear map from the four SD 1/2
latent channels to RGB (no weights, no network; modules/sd_vae_approx.py's coefficients), shown at the
picture's size. A 512 preview is a 4 x 3 matrix product on 64 x 64 latents and one resize."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# latent channel -> (R, G, B) contribution, for SD 1/2 latents as the sampler holds them (times 0.18215)
CHEAP_COEFFICIENTS = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])


def cheap(z: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Latents (B, C, h, w) -> pictures (B, 3, factor h, factor w) in [-1, 1]. Latents of other than 4
    channels (models with their own first stage) are shown as the grey of their mean."""
    if z.shape[1] == CHEAP_COEFFICIENTS.shape[0]:
        rgb = torch.einsum("bchw,cr->brhw", z, CHEAP_COEFFICIENTS.to(z))
    else:
        rgb = z.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    return F.interpolate(rgb, scale_factor=factor, mode="bilinear", align_corners=False).clamp(-1, 1)


def fits_sd_latents(model, demo: bool) -> bool:
    """True when the model's latents are SD 1/2's (4 channels, factor 8, SD's VAE): what TAESD decodes."""
    return not demo and model.latent_channels == 4 and model.downsampling_factor == 8
