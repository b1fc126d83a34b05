"""AUTOMATIC1111's inpainting options as picture work around the pipeline's inpaint.

- mask_blur and inpainting_mask_invert shape the mask before sd's rule (repaint where it is >= 128);
- inpainting_fill 0 ("fill") paints the masked part with the colours around it before encoding, 1
  ("original") keeps the picture as it is;
- inpaint_full_res ("only masked") repaints a crop around the mask at the request's size and pastes the
  masked part back, so the rest of the picture keeps its pixels and its size.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps

FILL_RADII = (64, 16, 4, 1)  # coarse to fine: each pass fills what the coarser one left blurry


def shape_mask(mask: Image.Image, size: tuple[int, int], blur: int, invert: bool) -> Image.Image:
    """The request's mask as an "L" picture of `size`: white = repaint, blurred by `blur` pixels."""
    from ldm.tasks.inpaint import mask_to_binary

    binary = Image.fromarray(mask_to_binary(mask).astype(np.uint8) * 255)
    if binary.size != size:
        binary = binary.resize(size, Image.BILINEAR)
    if invert:
        binary = ImageOps.invert(binary)
    return binary.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else binary


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """`image` with its masked part (mask >= 128) replaced by a smooth continuation of the kept colours:
    a normalised blur (blur of kept colours / blur of the kept weight), from coarse to fine."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    repaint = np.asarray(mask.convert("L")) >= 128  # (H, W)
    keep = (~repaint).astype(np.float64)
    if keep.sum() == 0:
        return image.convert("RGB")
    filled = rgb.copy()
    for radius in FILL_RADII:
        weight = _blur(keep, radius)
        colour = np.stack([_blur(rgb[..., c] * keep, radius) for c in range(3)], -1)
        estimate = colour / np.maximum(weight, 1e-6)[..., None]
        known = weight > 1e-3
        filled[repaint & known] = estimate[repaint & known]
    return Image.fromarray(filled.clip(0, 255).round().astype(np.uint8))


def _blur(values: np.ndarray, radius: int) -> np.ndarray:
    """A Gaussian blur (sigma = radius) of a float (H, W) array with zeros outside it: separable, in torch.
    Zeros outside are right for the normalised blur, which divides by the blurred weight alike."""
    import torch
    import torch.nn.functional as F

    half = min(3 * radius, max(values.shape))
    taps = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float64) / radius) ** 2)
    taps = (taps / taps.sum()).float()
    x = torch.from_numpy(values.astype(np.float32))[None, None]  # (1, 1, H, W)
    x = F.conv2d(x, taps.view(1, 1, 1, -1), padding=(0, half))
    x = F.conv2d(x, taps.view(1, 1, -1, 1), padding=(half, 0))
    return x[0, 0].double().numpy()


def crop_box(mask: Image.Image, padding: int, aspect: float) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) around the mask's white part, `padding` pixels wider each way and
    then grown to `aspect` (width / height), within the picture; the whole picture when nothing is white."""
    width, height = mask.size
    box = mask.point(lambda v: 255 if v >= 128 else 0).getbbox()
    if box is None:
        return 0, 0, width, height
    left, top = max(box[0] - padding, 0), max(box[1] - padding, 0)
    right, bottom = min(box[2] + padding, width), min(box[3] + padding, height)
    w, h = right - left, bottom - top
    if w / h < aspect:  # too narrow: widen around the centre
        w = min(width, round(h * aspect))
    else:
        h = min(height, round(w / aspect))
    cx, cy = (left + right) / 2, (top + bottom) / 2
    left = int(min(max(cx - w / 2, 0), width - w))
    top = int(min(max(cy - h / 2, 0), height - h))
    return left, top, left + w, top + h


def paste_back(original: Image.Image, patch: Image.Image, box: tuple[int, int, int, int],
               mask: Image.Image) -> Image.Image:
    """`original` with `patch` (resized to the box) pasted where the mask is white; other pixels unchanged."""
    left, top, right, bottom = box
    patch = patch.convert("RGB").resize((right - left, bottom - top), Image.LANCZOS)
    repaint = mask.crop(box).point(lambda v: 255 if v >= 128 else 0)
    out = original.convert("RGB").copy()
    out.paste(patch, (left, top), repaint)
    return out
