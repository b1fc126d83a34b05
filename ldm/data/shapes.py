"""Shapes: a procedural caption-image dataset for the demo model.

One scene is a single flat-coloured shape (circle, square, triangle, diamond) of a named colour, at one of
nine named positions and two sizes, on a flat background of another named colour. Its caption names those
choices, e.g. "a red circle on a blue background, top left". Everything is a pure function of a seed, so
the dataset is deterministic and needs no files.

The split between training and evaluation is by *wording*, not by content: every colour/shape/background
combination occurs in training, but the evaluation captions use sentence templates and position phrases
that training never shows (new orders of the training vocabulary) (``split="heldout"``), and their shapes sit at jittered offsets drawn from a
different seed stream. So prompt following is measured on phrasings the model has not memorised.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm.errors import SDError

# Named colours, chosen far apart in RGB so that a pixel's nearest name is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 40),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = tuple(COLORS)  # any colour can be a background (never the shape's own colour)
SHAPES = ("circle", "square", "triangle", "diamond")
# Shape half-extent as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.13, "large": 0.25}
# Named positions -> shape centre as fractions of the image side (a 3x3 grid).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25), "top": (0.5, 0.25), "top right": (0.75, 0.25),
    "left": (0.25, 0.5), "center": (0.5, 0.5), "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75), "bottom": (0.5, 0.75), "bottom right": (0.75, 0.75),
}
# Maximum random offset of the centre, as a fraction of the side (keeps shapes inside the image).
JITTER = 0.03

# Caption wording. Training and held-out templates/position phrases are disjoint as sentences but share
# one vocabulary: the text tower is trained from scratch on these captions, so a word it never saw would
# keep its random embedding. "New phrasings" are therefore new orders and combinations of known words
# (the colour word always stands next to what it colours: "red circle", "blue background").
TRAIN_TEMPLATES = (
    "a {size}{color} {shape} on a {bg} background{pos}",
    "a {size}{color} {shape} on {bg}{pos}",
    "{color} {shape} on a {bg} background{pos}",
    "a {bg} background with a {size}{color} {shape}{pos}",
    "an image of a {size}{color} {shape} on a {bg} background{pos}",
    "a picture of a {size}{color} {shape} against a {bg} backdrop{pos}",
    "{bg} backdrop, {size}{color} {shape}{pos}",
)
HELDOUT_TEMPLATES = (
    "on a {bg} background, a {size}{color} {shape}{pos}",
    "a picture of a {bg} backdrop with a {size}{color} {shape}{pos}",
    "an image of a {size}{color} {shape} against {bg}{pos}",
)
TRAIN_POSITION_PHRASES = {name: (f", {name}", f" at the {name}", f" in the {name}") for name in POSITIONS}
HELDOUT_POSITION_PHRASES = {name: (f" at the {name} of the image", f", {name} of the picture")
                            for name in POSITIONS}
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class ShapeScene:
    """What one image shows; the caption and the pixels are both functions of it."""
    shape: str
    color: str
    background: str
    position: str
    size: str
    dx: float = 0.0  # centre offset (fraction of the side), within +-JITTER
    dy: float = 0.0
    angle: float = 0.0  # rotation in degrees; the demo data keeps shapes upright (0)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape with half-extent r (None for the circle)."""
    if shape == "circle":
        return None
    if shape == "square":
        corners = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif shape == "triangle":  # apex up, base at the bottom of the bounding box
        corners = [(0.0, -r), (r, r), (-r, r)]
    elif shape == "diamond":
        corners = [(0.0, -r), (r, 0.0), (0.0, r), (-r, 0.0)]
    else:
        raise SDError(f"unknown shape '{shape}' (one of {', '.join(SHAPES)})")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


def render_scene(scene: ShapeScene, size: int = 256) -> Image.Image:
    """The scene as an RGB PIL image of size x size pixels."""
    image = Image.new("RGB", (size, size), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[scene.position]
    cx, cy = (fx + scene.dx) * size, (fy + scene.dy) * size
    r = SIZES[scene.size] * size
    points = _polygon(scene.shape, cx, cy, r, scene.angle)
    if points is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[scene.color])
    else:
        draw.polygon(points, fill=COLORS[scene.color])
    return image


def caption_for(scene: ShapeScene, rng: random.Random, split: str = "train") -> str:
    """A caption for the scene in one of the split's wordings. The size word and the position are each
    sometimes left out, so the model also learns to follow prompts that do not give them."""
    if split not in SPLITS:
        raise SDError(f"unknown split '{split}' (one of {', '.join(SPLITS)})")
    templates = TRAIN_TEMPLATES if split == "train" else HELDOUT_TEMPLATES
    phrases = TRAIN_POSITION_PHRASES if split == "train" else HELDOUT_POSITION_PHRASES
    size_word = f"{scene.size} " if rng.random() < 0.7 else ""
    pos = rng.choice(phrases[scene.position]) if rng.random() < 0.8 else ""
    text = rng.choice(templates).format(size=size_word, color=scene.color, shape=scene.shape,
                                        bg=scene.background, pos=pos)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "an orange circle"


def all_combinations() -> list[tuple[str, str, str, str, str]]:
    """Every (shape, colour, background, position, size) with colour != background, in a fixed order."""
    return [(shape, color, bg, pos, size)
            for shape in SHAPES for color in COLORS for bg in BACKGROUNDS if bg != color
            for pos in POSITIONS for size in SIZES]


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ShapesDataset(torch.utils.data.Dataset):
    """Deterministic map-style dataset of (image, caption) pairs.

    Item i covers combination order[i % len(combinations)] (so one pass over `len(all_combinations())`
    items shows every combination once) with a jitter and a caption wording drawn from `seed` and i. The
    order is the fixed listing, or with `shuffle` a permutation drawn from `seed`, so that a dataset
    shorter than one pass is a random subset of the combinations rather than the first few shapes.
    Items are dicts {"image": (3, size, size) in [-1, 1], "caption": str, "scene": ShapeScene}.
    """

    def __init__(self, length: int | None = None, size: int = 256, seed: int = 0, split: str = "train",
                 crop: int | None = None, shuffle: bool = False, crop_mode: str = "shape"):
        if split not in SPLITS:
            raise SDError(f"unknown split '{split}' (one of {', '.join(SPLITS)})")
        if crop_mode not in ("shape", "random"):
            raise SDError(f"crop_mode must be 'shape' or 'random', not '{crop_mode}'")
        if crop is not None and not 0 < crop <= size:
            raise SDError(f"crop {crop} must be between 1 and the image size {size}")
        self.combinations = all_combinations()
        if shuffle:
            random.Random(f"{seed}:{split}:order").shuffle(self.combinations)
        self.length = len(self.combinations) if length is None else int(length)
        self.size, self.seed, self.split, self.crop, self.crop_mode = size, seed, split, crop, crop_mode

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> ShapeScene:
        rng = random.Random(f"{self.seed}:{self.split}:{index}:scene")
        shape, color, bg, pos, size = self.combinations[index % len(self.combinations)]
        return ShapeScene(shape, color, bg, pos, size,
                          dx=rng.uniform(-JITTER, JITTER), dy=rng.uniform(-JITTER, JITTER))

    def caption(self, index: int) -> str:
        return caption_for(self.scene(index), random.Random(f"{self.seed}:{self.split}:{index}:caption"), self.split)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        scene = self.scene(index)
        image = image_to_tensor(render_scene(scene, self.size))  # (3, size, size)
        if self.crop is not None and self.crop < self.size:
            rows, cols = self._crop_window(index, scene)
            image = image[:, rows, cols]
        return {"image": image, "caption": self.caption(index), "scene": scene}

    def _crop_window(self, index: int, scene: ShapeScene) -> tuple[slice, slice]:
        """A crop that contains the shape's centre, away from the crop's edge by a quarter of its side.

        Crops must show the shape: on a flat crop every channel of the autoencoder is spatially constant
        and GroupNorm maps it to the same value whatever the colour, so such crops teach nothing but the
        average colour (and the full images the model later encodes always hold a shape)."""
        rng = random.Random(f"{self.seed}:{self.split}:{index}:crop")
        hi = self.size - self.crop
        if self.crop_mode == "random":  # anywhere (how the first autoencoder runs were cropped)
            top, left = rng.randrange(hi + 1), rng.randrange(hi + 1)
            return slice(top, top + self.crop), slice(left, left + self.crop)
        fx, fy = POSITIONS[scene.position]
        cx, cy = (fx + scene.dx) * self.size, (fy + scene.dy) * self.size
        quarter = self.crop / 4

        def start(center: float) -> int:
            return min(max(int(center - self.crop / 2 + rng.uniform(-quarter, quarter)), 0), hi)

        top, left = start(cy), start(cx)
        return slice(top, top + self.crop), slice(left, left + self.crop)

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))
