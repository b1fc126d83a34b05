"""Latent diffusion models as inference containers.

A LatentDiffusion holds the noise schedule, the UNet (under `model.diffusion_model`, the checkpoint's
key prefix), the first stage (VAE) and the conditioning encoder, and offers the few operations samplers
and commands need: apply_model, get_learned_conditioning, encode/decode_first_stage. Sampling lives in
ldm.models.diffusion.samplers, training in its own module: none of it is here.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ldm.errors import SDError
from ldm.modules.diffusionmodules.noise_schedule import make_beta_schedule, register_schedule
from ldm.util import instantiate_from_config

# Config parameters of the reference classes that only training uses; inference accepts and ignores them.
TRAINING_ONLY_PARAMS = frozenset({
    "ckpt_path", "ignore_keys", "load_only_unet", "monitor", "use_ema", "first_stage_key", "cond_stage_key",
    "image_size", "channels", "log_every_t", "clip_denoised", "l_simple_weight", "original_elbo_weight",
    "v_posterior", "learn_logvar", "logvar_init", "loss_type", "use_positional_encodings", "make_it_fit",
    "reset_ema", "reset_num_ema_updates", "scheduler_config", "num_timesteps_cond", "cond_stage_trainable",
    "cond_stage_forward", "concat_mode", "finetune_keys", "keep_finetune_dims", "unet_trainable", "low_scale_key",
    "ucg_training", "noise_level_key", "embedding_dropout", "embedding_key", "depth_stage_key",
})

Cond = Mapping[str, Optional[torch.Tensor]]


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` so checkpoint keys read model.diffusion_model.*."""

    def __init__(self, unet_config: Any, conditioning_key: Optional[str]):
        super().__init__()
        known = (None, "crossattn", "concat", "hybrid", "adm", "hybrid-adm", "crossattn-adm")
        if conditioning_key not in known:
            raise SDError(f"unknown conditioning_key '{conditioning_key}' (one of {', '.join(map(str, known))})")
        self.diffusion_model = instantiate_from_config(unet_config)
        self.conditioning_key = conditioning_key

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        c_concat = cond.get("c_concat")
        x_in = x_t if c_concat is None else torch.cat([x_t, c_concat], dim=1)  # (B, 4 + k, h, w)
        control = cond.get("c_control")  # ControlNet residuals (ldm.control.apply.Controller)
        extra = {} if control is None else {"control": control}
        return self.diffusion_model(x_in, t, context=cond.get("c_crossattn"), y=cond.get("c_adm"), **extra)


class LatentDiffusion(nn.Module):
    """SD 2.x text-to-image model: schedule + UNet + VAE + text encoder."""

    def __init__(
        self,
        first_stage_config: Any,
        cond_stage_config: Any,
        unet_config: Any,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Any = None,
        parameterization: str = "eps",
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        conditioning_key: Optional[str] = None,
        **training_params: Any,
    ):
        super().__init__()
        unknown = sorted(set(training_params) - TRAINING_ONLY_PARAMS)
        if unknown:
            raise SDError(f"{type(self).__name__}: unknown config parameter(s) {', '.join(unknown)}")
        if parameterization not in ("eps", "v"):
            raise SDError(f"parameterization '{parameterization}' is not supported (eps or v)")
        if conditioning_key is None:
            conditioning_key = "crossattn"  # what the reference picks for a text-conditioned LDM
        self.parameterization = parameterization
        self.conditioning_key = conditioning_key
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.cond_stage_model = instantiate_from_config(cond_stage_config)

        betas = (given_betas if given_betas is not None
                 else make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s))
        register_schedule(self, np.asarray(betas, dtype=np.float64), posterior=True)
        self.num_timesteps = int(len(betas))
        if scale_by_std:
            # The reference stores a std-derived scale factor in the checkpoint in this mode.
            self.register_buffer("scale_factor", torch.tensor(scale_factor, device="cpu"))
        else:
            self.scale_factor = float(scale_factor)

    # -- the denoiser's view ---------------------------------------------------------------------
    # A run's ControlNets (ldm.control.apply.controlled sets it for the run): consulted at every model call,
    # innermost, so that whatever a task does to x_t first (latent blending) is what the ControlNet sees.
    control = None

    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """UNet output (eps or v, per `parameterization`) for VP-space latents x_t at timesteps t."""
        if self.control is not None:
            cond = self.control(x_t, t, cond)
        return self.model(x_t, t, cond)

    # -- conditioning ----------------------------------------------------------------------------
    @torch.no_grad()
    def get_learned_conditioning(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, 77, context_dim) for a list of prompts."""
        return self.cond_stage_model.encode(list(prompts))

    # -- first stage -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_first_stage(self, image: torch.Tensor):
        """Posterior over latents for images (B, 3, H, W) in [-1, 1]."""
        return self.first_stage_model.encode(image)

    def get_first_stage_encoding(self, posterior, generator: Optional[torch.Generator] = None,
                                 use_mean: bool = False) -> torch.Tensor:
        """z = scale_factor * (posterior sample or mean), (B, 4, H/f, W/f)."""
        if isinstance(posterior, torch.Tensor):
            z = posterior
        elif use_mean:
            z = posterior.mode()
        else:
            z = posterior.sample(generator=generator)
        return self.scale_factor * z

    @torch.no_grad()
    def encode_mean(self, image: torch.Tensor) -> torch.Tensor:
        """Deterministic latent of images (B, 3, H, W) in [-1, 1]: scale_factor * posterior mean, (B, 4, H/f, W/f).
        The mean (not a sample) so the same seed and image give the same result on any machine."""
        return self.get_first_stage_encoding(self.encode_first_stage(image), use_mean=True)

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in about [-1, 1] from scaled latents."""
        return self.first_stage_model.decode(z / self.scale_factor)

    # -- facts the samplers and CLI ask about ----------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.model.diffusion_model.out_channels)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (self.first_stage_model.encoder.num_resolutions - 1)

    def make_cond(self, c_crossattn: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
        """The conditioning dict of a plain text-to-image model."""
        return {"c_crossattn": c_crossattn, "c_concat": None, "c_adm": None}


# The image-conditioned siblings keep the reference's dotted names (configs say
# ldm.models.diffusion.ddpm.LatentInpaintDiffusion etc.) but live with their conditioning builders.
_IMAGE_MODES = ("LatentInpaintDiffusion", "LatentDepth2ImageDiffusion", "LatentUpscaleDiffusion",
               "ImageEmbeddingConditionedLatentDiffusion")


def __getattr__(name: str):
    if name in _IMAGE_MODES:
        from ldm.models.diffusion import conditioned

        return getattr(conditioned, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
