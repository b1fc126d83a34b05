"""Planning and running generation jobs: the shared engine behind every generating command.

A run is planned before any sampling: a list of items (global image index k, prompt, negative prompt,
seed + k), grouped into batches. Image k always starts from noise drawn by a CPU generator seeded with
seed + k, so it can be reproduced alone whatever the batch size or device.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ldm.errors import SDError


@dataclass(frozen=True)
class Item:
    index: int  # global image index k within the run
    prompt: str
    negative_prompt: str
    seed: int  # the seed of this image's generators (seed + k, or seed with --fixed_code)


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise SDError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SDError(f"prompt file {path} is not UTF-8 text") from exc
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise SDError(f"prompt file {path} has no prompts (one prompt a line)")
    return prompts


def plan_batches(prompts: list[str], *, n_samples: int, n_iter: int, repeat: int, from_file: bool,
                 seed: int, fixed_code: bool, negative_prompt: str) -> list[list[Item]]:
    """The reference's batching, as a plan of items.

    Without a prompt file a batch is n_samples copies of the prompt; with one, the prompts (each
    repeated `repeat` times) are grouped n_samples to a batch. The whole set runs n_iter times.
    """
    if from_file:
        expanded = [p for p in prompts for _ in range(repeat)]
        batches = [expanded[i:i + n_samples] for i in range(0, len(expanded), n_samples)]
    else:
        batches = [[prompts[0]] * n_samples]
    plan: list[list[Item]] = []
    k = 0
    for _ in range(n_iter):
        for batch in batches:
            items = []
            for prompt in batch:
                items.append(Item(k, prompt, negative_prompt, seed if fixed_code else seed + k))
                k += 1
            plan.append(items)
    return plan


def start_noise(items: list[Item], shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(B, C, h, w) start noise, image k from a CPU generator seeded with its seed.

    The generators are returned too: ancestral and SDE samplers continue each image's own stream.
    """
    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in items]
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return noise, generators


@dataclass
class SamplingSettings:
    steps: int = 50
    sampler: str = "ddim"
    schedule: Optional[str] = None  # None: the sampler's own default
    eta: float = 0.0
    scale: float = 9.0


def precision_context(device: torch.device, precision: str):
    """The reference's --precision: 'autocast' runs under torch.autocast (bf16 on CPU, fp16 on CUDA)."""
    if precision == "autocast":
        dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


class PromptEncoder:
    """Encodes each distinct prompt once per run (prompt files often repeat prompts)."""

    def __init__(self, model):
        self.model = model
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        todo = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if todo:
            embeddings = self.model.get_learned_conditioning(todo)
            for prompt, emb in zip(todo, embeddings):
                self.cache[prompt] = emb
        return torch.stack([self.cache[p] for p in prompts])


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SDError("--device cuda was asked for, but no CUDA device is available (use --device cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise SDError(f"unknown --device '{device}' (cpu, cuda or auto)")
    return torch.device(device)


def chunks(seq: list, size: int) -> Iterator[list]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def check_size(H: int, W: int, f: int) -> None:
    for name, value in (("H", H), ("W", W)):
        if value <= 0 or value % 8:
            raise SDError(f"--{name} {value} is not a positive multiple of 8")
        if value < 256:
            raise SDError(f"--{name} {value} is below 256: every image carries the invisible watermark, "
                          "which needs at least 256x256 pixels")
        if value % f:
            raise SDError(f"--{name} {value} is not a multiple of the first stage's factor --f {f}")
