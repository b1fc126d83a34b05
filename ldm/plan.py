"""Planning a request's run: its batches.

A run is planned before any sampling: a list of batches of items (global image index k, prompt,
negative prompt, seed, sampling settings, size). Image k always starts from noise drawn by a CPU
generator seeded with its own seed, so it can be reproduced alone whatever the batch size or device.
The plan fixes each batch's composition from the request alone (never from the number of processes), and
processes take whole batches: every image is computed in the same batch, at the same position, as in a
one-process run, which is what makes multi-process runs byte-identical to single ones (batched
convolutions round differently from single ones, ~3e-5 in the latents, enough to flip uint8 pixels).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional

from ldm.errors import SDError
from ldm.limits import SEED_MAX
from ldm.request import Item, PromptLine, Request, SamplingSettings

__all__ = ["Batch", "Item", "make_plan"]


@dataclass
class Batch:
    """Items sampled together: they share sampling settings and size. `index` is b, the batch's place in
    the plan; with `keep` set only the image at that position is saved (--from-image rebuilds the batch
    an image was made in, to reproduce its float rounding)."""
    index: int
    items: list[Item]
    sampling: SamplingSettings
    size: tuple  # (width, height); None sides: the model's native size, not yet known
    keep: Optional[int] = None

    def kept(self) -> list[int]:
        """Positions whose images are saved."""
        return [self.keep] if self.keep is not None else list(range(len(self.items)))


def _plan(lines: tuple[PromptLine, ...], *, batch_size: int, n_iter: int, seed: int, fixed_seed: bool,
          negative_prompt: str, sampling: SamplingSettings, size: tuple) -> list[Batch]:
    """The reference's batching, extended to prompt lines with their own settings.

    Each line (`repeat` copies of it in a row) is an item; items are grouped batch_size to a batch, a new
    batch also starting where the settings or size change. The whole set runs n_iter times. Image k gets
    seed + k, or, for a line with its own seed s, s + (how many images of that line came before); a fixed
    seed drops the offsets. A plain prompt is one line repeated batch_size times.
    """
    order = [i for i, line in enumerate(lines) for _ in range(line.repeat)]
    plan: list[Batch] = []
    copies = [0] * len(lines)  # images made so far from each line
    k = 0
    for _ in range(n_iter):
        run: list[Item] = []
        for i in order:
            line = lines[i]
            base_seed = seed if line.seed is None else line.seed
            offset = k if line.seed is None else copies[i]
            run.append(Item(k, line.prompt, negative_prompt if line.negative_prompt is None else line.negative_prompt,
                            base_seed if fixed_seed else base_seed + offset,
                            dataclasses.replace(sampling, **line.overrides()), line.size or size))
            copies[i] += 1
            k += 1
        start = 0
        for end in range(1, len(run) + 1):  # cut where the batch is full or the settings change
            if end == len(run) or end - start == batch_size or _batch_key(run[end]) != _batch_key(run[start]):
                plan.append(Batch(len(plan), run[start:end], run[start].sampling, run[start].size))
                start = end
    return plan


def _batch_key(item: Item) -> tuple:
    return dataclasses.astuple(item.sampling), item.size


def make_plan(request: Request, names: Mapping[str, str] = {}) -> list[Batch]:
    """The request's batches, fixed before any sampling (call request.check() first); SDError when the plan
    goes past the max_images limit or a seed past 2**64 - 1 (fields named as `names` maps them)."""
    def name(key: str) -> str:
        return names.get(key, key)

    size = (request.width, request.height)
    if request.reproduce is not None:  # the image's batch, refilled with copies of the image
        batch_size, position = request.reproduce
        if not 1 <= batch_size <= request.limits.max_batch or not 0 <= position < batch_size:
            raise SDError(f"the image was made at position {position} of a batch of {batch_size}, outside 1 to "
                          f"{name('max_batch')} {request.limits.max_batch}")
        items = [Item(0, request.prompt, request.negative_prompt, request.seed, request.sampling, size)] * batch_size
        return [Batch(0, items, request.sampling, size, keep=position)]
    lines = request.prompt_lines()
    images = sum(line.repeat for line in lines) * request.n_iter
    if images > request.limits.max_images:
        raise SDError(f"this run would make {images} images, above {name('max_images')} {request.limits.max_images}")
    plan = _plan(lines, batch_size=request.batch_size, n_iter=request.n_iter, seed=request.seed,
                 fixed_seed=request.fixed_seed, negative_prompt=request.negative_prompt, sampling=request.sampling,
                 size=size)
    for batch in plan:
        for item in batch.items:
            if item.seed > SEED_MAX:
                raise SDError(f"image {item.index} would get seed {item.seed}, past 2**64 - 1: use a smaller "
                              f"{name('seed')}")
    return plan
