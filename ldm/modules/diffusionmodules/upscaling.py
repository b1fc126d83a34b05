"""Noise augmentation of the x4 upscaler's low-resolution input.

The upscaler was trained on low-res images noised with their own DDPM schedule at a random level, the
level being given to the UNet as a class label; at inference the user picks the level. The module keeps
the reference's schedule buffers (checkpoint keys low_scale_model.*), without the posterior ones.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from ldm.errors import SDError
from ldm.modules.diffusionmodules.noise_schedule import make_beta_schedule, register_schedule

_SCHEDULE_PARAMS = ("beta_schedule", "timesteps", "linear_start", "linear_end", "cosine_s")


class ImageConcatWithNoiseAugmentation(nn.Module):
    """x -> (sqrt(a[l]) x + sqrt(1 - a[l]) noise, l): q_sample of an image at noise level l."""

    def __init__(self, noise_schedule_config: Optional[dict[str, Any]] = None, max_noise_level: int = 1000,
                 to_cuda: bool = False):
        super().__init__()
        # to_cuda is the reference's parameter (unused there as well); devices follow .to().
        schedule = dict(noise_schedule_config or {})
        unknown = sorted(set(schedule) - set(_SCHEDULE_PARAMS))
        if unknown:
            raise SDError(f"low_scale_config noise_schedule_config: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(_SCHEDULE_PARAMS)})")
        betas = make_beta_schedule(schedule.get("beta_schedule", "linear"), int(schedule.get("timesteps", 1000)),
                                   schedule.get("linear_start", 1e-4), schedule.get("linear_end", 2e-2),
                                   schedule.get("cosine_s", 8e-3))
        register_schedule(self, betas, posterior=False)
        self.num_timesteps = int(len(betas))
        self.max_noise_level = int(max_noise_level)

    def forward(self, x: torch.Tensor, noise_level: Union[int, torch.Tensor, None] = None,
                noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, h, w) -> (noised x (B, C, h, w), noise_level (B,) long).

        noise_level None draws one level per image in [0, max_noise_level) as training does; inference
        passes it (an int for the whole batch or a (B,) tensor). noise None draws it from `generator`
        (on the generator's device, CPU by default) so a seeded CPU generator gives the same result anywhere.
        """
        batch = x.shape[0]
        if noise_level is None:
            noise_level = torch.randint(0, self.max_noise_level, (batch,), generator=generator,
                                        device=generator.device if generator is not None else "cpu")
        noise_level = torch.as_tensor(noise_level).long().to(x.device).reshape(-1)
        if noise_level.numel() not in (1, batch):
            raise SDError(f"{noise_level.numel()} noise levels for {batch} images")
        noise_level = noise_level.expand(batch).clone()  # (B,)
        if int(noise_level.min()) < 0 or int(noise_level.max()) >= self.num_timesteps:
            raise SDError(f"noise level must be in 0..{self.num_timesteps - 1}, got {noise_level.tolist()}")
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32,
                                device=generator.device if generator is not None else "cpu")
        noise = noise.to(device=x.device, dtype=x.dtype)
        levels = noise_level.to(self.sqrt_alphas_cumprod.device)
        shape = (batch,) + (1,) * (x.ndim - 1)
        scale_x = self.sqrt_alphas_cumprod[levels].to(x).view(shape)  # (B, 1, 1, 1)
        scale_noise = self.sqrt_one_minus_alphas_cumprod[levels].to(x).view(shape)
        return scale_x * x + scale_noise * noise, noise_level
