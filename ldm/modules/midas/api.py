"""MiDaS depth for the depth-conditioned SD 2 model (512-depth-ema.ckpt).

`MiDaSInference` is the reference's `depth_model`: it holds MiDaS v3 DPT-Hybrid as `model`, so its
keys are the checkpoint's `depth_model.model.*`. Its weights come from that checkpoint; nothing is
downloaded. `prepare_midas_input` is the resize the reference demo applies before it (AddMiDaS).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import SDError
from ldm.modules.midas.dpt import MULTIPLE, dpt_hybrid

# The reference demo's MiDaS transform for dpt_hybrid (load_midas_transform): Resize(384, 384,
# keep_aspect_ratio=True, ensure_multiple_of=32, resize_method="minimal", INTER_CUBIC), then
# NormalizeImage(mean 0.5, std 0.5), which maps the [0, 1] image back to [-1, 1].
NET_SIZE = 384


def midas_input_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) the reference feeds MiDaS for a height x width image (MiDaS's "minimal" resize to 384).

    Aspect is kept by scaling both sides with whichever of 384/height, 384/width is closer to 1 (ties go
    to the height), i.e. the side nearer 384 px becomes 384; each side is then rounded to the nearest
    multiple of 32 (halves to even, as numpy's round). 512x512 -> 384x384, 512x768 -> 384x576.
    """
    scale_h, scale_w = NET_SIZE / height, NET_SIZE / width
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
    size = tuple(round(scale * side / MULTIPLE) * MULTIPLE for side in (height, width))
    if min(size) == 0:
        raise SDError(f"a {height}x{width} image is too elongated for MiDaS; crop it to an aspect ratio under 24:1")
    return size


def prepare_midas_input(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) image in [-1, 1] -> (B, 3, h, w) MiDaS input in [-1, 1], (h, w) = midas_input_size(H, W).

    The reference resizes the [0, 1] image with cv2's INTER_CUBIC and normalises it to [-1, 1]; both
    steps are affine per pixel, so resizing the [-1, 1] image directly is the same. torch's bicubic
    (a = -0.75, half-pixel centres, clamped borders, no antialiasing) is cv2's. Values are not clamped
    (the reference does not clamp the cubic overshoot either).
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise SDError(f"MiDaS expects images of shape (B, 3, H, W), got {tuple(image.shape)}")
    size = midas_input_size(image.shape[2], image.shape[3])
    if size == tuple(image.shape[2:]):
        return image
    return F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False).to(image.dtype)


class MiDaSInference(nn.Module):
    """Frozen MiDaS depth estimator: forward((B, 3, H, W) in [-1, 1]) -> (B, 1, H, W) relative inverse depth.

    H and W must be multiples of 32 (prepare_midas_input gives that). Larger values mean nearer. Only
    model_type "dpt_hybrid" exists in SD 2 checkpoints. tiny=True is for tests only (used by
    tests/configs/tiny-v2-midas.yaml): the same classes at a size that runs in milliseconds.
    """

    SUPPORTED = ("dpt_hybrid",)

    def __init__(self, model_type: str = "dpt_hybrid", tiny: bool = False):
        super().__init__()
        if model_type not in self.SUPPORTED:
            raise SDError(f"MiDaS model_type '{model_type}' is not supported; use 'dpt_hybrid' (the SD 2 depth model's)")
        self.model = dpt_hybrid(tiny=tiny)
        self.model.eval()

    def train(self, mode: bool = True) -> "MiDaSInference":
        # Frozen, as the reference (disabled_train): the depth model never leaves eval mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % MULTIPLE or x.shape[3] % MULTIPLE:
            raise SDError(
                f"MiDaS needs (B, 3, H, W) with H and W multiples of {MULTIPLE}, got {tuple(x.shape)}; "
                "resize with prepare_midas_input"
            )
        dtype = self.model.scratch.layer1_rn.weight.dtype
        prediction = self.model(x.to(dtype))  # (B, H, W)
        # The reference then resizes the prediction (bicubic) to x's size: DPT's output already has that
        # size, and a same-size bicubic resize is exactly the identity, so it is left out.
        return prediction.unsqueeze(1)  # (B, 1, H, W)
