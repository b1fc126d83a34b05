"""Prompt following of a shapes model, measured from pixels alone (see ldm.data.measure).

Prompts come from the held-out split of ldm.data.shapes: colour/shape/background triples the model was
trained on, in sentence templates and position phrases it never saw. Generation uses the project's own
sampling path (ldm.sampling: DiscreteDenoiser -> CFGDenoiser -> samplers.run) with the design's seeding
rule (image k starts from randn((C, h, w), Generator().manual_seed(seed + k))).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from ldm.data.measure import Reading, read_image
from ldm.data.shapes import HELDOUT_POSITION_PHRASES, TRAIN_POSITION_PHRASES, ShapeScene, ShapesDataset, caption_for


def heldout_prompts(n: int = 40, seed: int = 1234, wording: str = "heldout") -> list[tuple[ShapeScene, str]]:
    """n (scene, prompt) pairs spread over random combinations (jitter from the held-out seed stream), in
    the held-out wording, or for comparison in the training wording."""
    dataset = ShapesDataset(length=n, seed=seed, split="heldout", shuffle=True)
    return [(dataset.scene(i), caption_for(dataset.scene(i), random.Random(f"{seed}:{i}"), wording))
            for i in range(n)]


def names_position(scene: ShapeScene, prompt: str) -> bool:
    """Whether the prompt says where the shape is (captions leave the position out one time in five)."""
    phrases = HELDOUT_POSITION_PHRASES[scene.position] + TRAIN_POSITION_PHRASES[scene.position]
    return any(prompt.endswith(phrase) for phrase in phrases)


@torch.no_grad()
def generate(model, prompts: list[str], *, steps: int = 20, scale: float = 5.0, seed: int = 0,
             sampler: str = "ddim", size: int = 256, start_latents: torch.Tensor | None = None,
             strength: float = 1.0, apply_model=None, latents_only: bool = False):
    """Images (B, size, size, 3) uint8 for the prompts, sampled in one batch (or the VP latents), through
    the pipeline's own sampling path (ldm.sampling); `apply_model` wraps the model's call as a task's does."""
    from ldm.request import SamplingSettings
    from ldm.sampling import sample_latents, start_noise

    f = model.downsampling_factor
    noise, generators = start_noise([seed + k for k in range(len(prompts))],
                                    (model.latent_channels, size // f, size // f))
    c = model.get_learned_conditioning(prompts)
    uc = model.get_learned_conditioning([""] * len(prompts))
    z = sample_latents(model, noise, generators, c, uc, SamplingSettings(steps=steps, sampler=sampler, scale=scale),
                       start_latents=start_latents, strength=strength, apply_model=apply_model)
    return z if latents_only else decode(model, z)


@torch.no_grad()
def decode(model, z: torch.Tensor, bf16: bool = True) -> np.ndarray:
    """Latents -> (B, H, W, 3) uint8. On CPUs with native bf16, bf16 autocast halves the decoder's time (it
    dominates: the full-resolution convolutions) and nearest-colour readings do not move; elsewhere bf16
    is emulated, about 160x slower, so the decode stays float32."""
    from ldm.runtime.policy import cpu_has_fast_bf16

    with torch.autocast("cpu", torch.bfloat16, enabled=bf16 and cpu_has_fast_bf16()):
        images = model.decode_first_stage(z.to(torch.float32)).float()  # (B, 3, H, W) about [-1, 1]
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@dataclass
class Evaluation:
    n: int
    colors: float  # share of samples whose foreground AND background colour match the prompt
    shapes: float  # share whose shape class matches
    backgrounds: float  # share whose background colour alone matches
    foregrounds: float  # share whose foreground colour alone matches
    positions: float  # share of the prompts that name a position whose shape stands there
    positioned: int  # how many prompts name a position
    readings: list[Reading]
    scenes: list[ShapeScene]
    prompts: list[str]
    images: np.ndarray  # (n, H, W, 3) uint8


def evaluate(model, n: int = 40, *, steps: int = 20, scale: float = 5.0, seed: int = 0,
             prompt_seed: int = 1234, sampler: str = "ddim", wording: str = "heldout") -> Evaluation:
    pairs = heldout_prompts(n, prompt_seed, wording)
    scenes, prompts = [s for s, _ in pairs], [p for _, p in pairs]
    images = generate(model, prompts, steps=steps, scale=scale, seed=seed, sampler=sampler)
    readings = [read_image(image) for image in images]
    colors = np.mean([r.color == s.color and r.background == s.background for r, s in zip(readings, scenes)])
    shapes = np.mean([r.shape == s.shape for r, s in zip(readings, scenes)])
    backgrounds = np.mean([r.background == s.background for r, s in zip(readings, scenes)])
    foregrounds = np.mean([r.color == s.color for r, s in zip(readings, scenes)])
    placed = [r.position == s.position for r, s, p in zip(readings, scenes, prompts) if names_position(s, p)]
    return Evaluation(n, float(colors), float(shapes), float(backgrounds), float(foregrounds),
                      float(np.mean(placed)) if placed else float("nan"), len(placed), readings, scenes,
                      prompts, images)


def contact_sheet(images: np.ndarray, columns: int = 8, thumb: int = 96):
    """A PIL grid of thumbnails, for docs."""
    from PIL import Image

    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * thumb, rows * thumb), (255, 255, 255))
    for k, image in enumerate(images):
        sheet.paste(Image.fromarray(image).resize((thumb, thumb), Image.BILINEAR),
                    ((k % columns) * thumb, (k // columns) * thumb))
    return sheet
