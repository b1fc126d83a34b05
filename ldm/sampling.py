"""The sampling wiring every generating path shares (the pipeline, the demo evaluation, training's checks):
seeded start noise, prompt embeddings, and the denoiser -> guidance -> sampler chain for one batch."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch

from ldm.plan import SamplingSettings


def start_noise(seeds: list[int], shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(B, C, h, w) start noise, image k from a CPU generator seeded with its own seed (the design's rule).

    The generators are returned too: ancestral and SDE samplers continue each image's own stream.
    """
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return noise, generators


class PromptEncoder:
    """Encodes each distinct prompt once (prompt files often repeat prompts).

    The cache keeps the `capacity` most recently used embeddings (a (77, 1024) float32 embedding is
    about 0.3 MB), so a file of many thousand distinct prompts does not grow memory without bound.
    """

    def __init__(self, model, capacity: int = 256):
        self.model = model
        self.capacity = capacity
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        todo = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if todo:
            embeddings = self.model.get_learned_conditioning(todo)
            for prompt, emb in zip(todo, embeddings):
                self.cache[prompt] = emb
        out = torch.stack([self.cache[p] for p in prompts])
        for p in dict.fromkeys(prompts):
            self.cache.move_to_end(p)
        while len(self.cache) > max(self.capacity, len(set(prompts))):
            self.cache.popitem(last=False)
        return out


def sample_latents(model, noise: torch.Tensor, generators: list[torch.Generator], c: torch.Tensor,
                   uc: Optional[torch.Tensor], settings: SamplingSettings, on_step: Optional[Callable[[dict], None]] = None,
                   start_latents: Optional[torch.Tensor] = None, strength: float = 1.0,
                   extra_cond: Optional[dict] = None, apply_model: Optional[Callable] = None) -> torch.Tensor:
    """Run the chosen sampler on one batch; a task's image conditioning enters through `extra_cond`, its
    wrapped model call through `apply_model`. `on_step(info)` is called after every step with the
    sampler's {"i", "x", "sigma", "sigma_next", "denoised"} (denoised: the current x0 latents)."""
    from ldm.models.diffusion import samplers
    from ldm.models.diffusion.denoiser import CFGDenoiser, DiscreteDenoiser

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
