"""Reading a shapes image back from its pixels: background colour, foreground colour, shape class, position.

Used to measure prompt following of the demo model without any learned judge: every pixel gets its
nearest named colour; the background is the most common colour (away from the image edge), the foreground
the most common other colour; the shape is the template (each shape rendered and cropped to its bounding box)
with the highest IoU against the foreground mask cropped to its own bounding box; the position is the named
grid point nearest the centre of that bounding box (the shape's centre for every shape; a triangle's centroid
would sit r/3 low).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from ldm.data.shapes import COLORS, POSITIONS, SHAPES, ShapeScene, render_scene

_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], dtype=np.float32)  # (K, 3)
_TEMPLATE = 32  # side of the normalised masks


@dataclass(frozen=True)
class Reading:
    background: str
    color: str | None  # None when no pixel differs from the background
    shape: str | None
    fg_fraction: float  # share of the image the foreground mask covers
    position: str | None = None  # the named grid point nearest the foreground's centre


def nearest_colors(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index into the named colours."""
    pixels = image.reshape(-1, 1, 3).astype(np.float32)
    dist = ((pixels - _PALETTE[None]) ** 2).sum(-1)  # (H*W, K)
    return dist.argmin(-1).reshape(image.shape[:2])


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of a boolean mask's pixels, trimming 1% outliers on each side; None for < 16 pixels."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 16:
        return None
    y0, y1 = np.percentile(ys, [1, 99]).astype(int)
    x0, x1 = np.percentile(xs, [1, 99]).astype(int)
    return int(y0), int(y1), int(x0), int(x1)


def classify_position(mask: np.ndarray) -> str | None:
    """The named position (3x3 grid) nearest the centre of the mask's bounding box."""
    box = _bounding_box(mask)
    if box is None:
        return None
    y0, y1, x0, x1 = box
    fy, fx = (y0 + y1 + 1) / 2 / mask.shape[0], (x0 + x1 + 1) / 2 / mask.shape[1]
    return min(POSITIONS, key=lambda name: (POSITIONS[name][0] - fx) ** 2 + (POSITIONS[name][1] - fy) ** 2)


def _normalised_mask(mask: np.ndarray) -> np.ndarray | None:
    """Crop a boolean mask to its bounding box and resize it to _TEMPLATE x _TEMPLATE floats."""
    box = _bounding_box(mask)
    if box is None:
        return None
    y0, y1, x0, x1 = box
    crop = mask[y0:y1 + 1, x0:x1 + 1].astype(np.uint8) * 255
    resized = Image.fromarray(crop).resize((_TEMPLATE, _TEMPLATE), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


@lru_cache(maxsize=None)
def _templates() -> dict[str, np.ndarray]:
    out = {}
    for shape in SHAPES:
        image = np.asarray(render_scene(ShapeScene(shape, "white", "black", "center", "large")))
        out[shape] = _normalised_mask(image[..., 0] > 127)
    return out


def classify_shape(mask: np.ndarray) -> str | None:
    """The shape whose normalised template overlaps the normalised mask best (soft IoU)."""
    norm = _normalised_mask(mask)
    if norm is None:
        return None
    scores = {name: np.minimum(norm, t).sum() / np.maximum(norm, t).sum() for name, t in _templates().items()}
    return max(scores, key=scores.get)


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """What a shapes image shows, from its pixels alone."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    labels = nearest_colors(array)  # (H, W)
    # The background is the most common colour away from the image edge (decoders smear the outermost
    # pixels; every shape covers at most a quarter of the image).
    margin = labels.shape[0] // 16
    inner = labels[margin:labels.shape[0] - margin, margin:labels.shape[1] - margin]
    bg = int(np.bincount(inner.ravel(), minlength=len(_NAMES)).argmax())
    counts = np.bincount(labels.ravel(), minlength=len(_NAMES))
    counts[bg] = 0
    if counts.sum() == 0:
        return Reading(_NAMES[bg], None, None, 0.0)
    fg = int(counts.argmax())
    mask = labels == fg
    return Reading(_NAMES[bg], _NAMES[fg], classify_shape(mask), float(mask.mean()), classify_position(mask))
