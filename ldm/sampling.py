"""The sampling wiring every generating path shares (the pipeline, the demo evaluation, training's checks):
seeded start noise and the denoiser -> guidance -> sampler chain for one batch (prompt embeddings:
ldm.text.encoder)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ldm.request import SamplingSettings


def start_noise(seeds: list[int], shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(B, C, h, w) start noise, image k from a CPU generator seeded with its own seed (the design's rule).

    The generators are returned too: ancestral and SDE samplers continue each image's own stream.
    """
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return noise, generators


def sample_latents(model, noise: torch.Tensor, generators: list[torch.Generator], c: torch.Tensor,
                   uc: Optional[torch.Tensor], settings: SamplingSettings, on_step: Optional[Callable[[dict], None]] = None,
                   start_latents: Optional[torch.Tensor] = None, strength: float = 1.0,
                   extra_cond: Optional[dict] = None, apply_model: Optional[Callable] = None) -> torch.Tensor:
    """Run the chosen sampler on one batch; a task's image conditioning enters through `extra_cond`, its
    wrapped model call through `apply_model`. `on_step(info)` is called after every step with the
    sampler's {"i", "x", "sigma", "sigma_next", "denoised"} (denoised: the current x0 latents)."""
    from ldm.models.diffusion import samplers
    from ldm.models.diffusion.denoiser import CFGDenoiser, DiscreteDenoiser

    if settings.sampler is None:
        from ldm.errors import SDError

        raise SDError("the sampling settings name no sampler: resolve the request first (Request.resolved)")
    extra = extra_cond or {}
    cond = {"c_crossattn": c, "c_concat": extra.get("c_concat"), "c_adm": extra.get("c_adm")}
    denoiser = DiscreteDenoiser(model, apply_model)
    if uc is not None:
        uncond = {"c_crossattn": uc, "c_concat": extra.get("c_concat"), "c_adm": extra.get("uc_adm", extra.get("c_adm"))}
        denoiser = CFGDenoiser(denoiser, settings.scale)
        cond = {"cond": cond, "uncond": uncond}
    return samplers.run(
        denoiser, noise, cond, settings.sampler, steps=settings.steps, schedule=settings.schedule,
        eta=settings.eta, generators=generators, callback=on_step,
        start_latents=start_latents, strength=strength,
    )
