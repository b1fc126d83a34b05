"""ControlNet preprocessors: a picture in, the hint a ControlNet was trained on out (H, W, 3) uint8.

Those here need no weights of their own, except depth, which uses sd's own MiDaS (the depth2img
checkpoint's depth_model). Names, defaults and meaning follow the sd-webui-controlnet extension, so that
its API calls and infotexts mean the same here: "canny" (OpenCV's Canny, thresholds a and b), "invert"
(white background, black lines -> the white-on-black a scribble or line-art ControlNet reads),
"threshold" (binary at a), "scribble_xdog" (edges of a difference of Gaussians, threshold a),
"lineart_standard" (dark lines on a light picture, by how far each pixel is below its blurred
surroundings), "depth_midas" (MiDaS inverse depth, scaled to 0-255). Every module first scales the
picture so that its shorter side is processor_res (512 unless asked).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ldm.errors import SDError


@dataclass(frozen=True)
class Module:
    default_res: int
    threshold_a: Optional[tuple[str, float, float, float]] = None  # (label, default, min, max)
    threshold_b: Optional[tuple[str, float, float, float]] = None
    needs: Optional[str] = None  # weights it needs beyond the picture


MODULES: dict[str, Module] = {
    "none": Module(512),
    "canny": Module(512, ("Low Threshold", 100, 1, 255), ("High Threshold", 200, 1, 255)),
    "invert": Module(512),
    "threshold": Module(512, ("Binarization Threshold", 127, 0, 255)),
    "scribble_xdog": Module(512, ("XDoG Threshold", 32, 1, 64)),
    "lineart_standard": Module(512),
    "depth_midas": Module(512, needs="MiDaS (sd serve / sd txt2img --control-midas: the depth2img checkpoint)"),
}
ALIASES = {"depth": "depth_midas", "invert (from white bg & black line)": "invert",
           "lineart_standard (from white bg & black line)": "lineart_standard"}


def canonical(module: str) -> str:
    return ALIASES.get(module, module)


def check_module(module, what: str = "module") -> None:
    if not isinstance(module, str) or canonical(module) not in MODULES:
        raise SDError(f"{what}: {module!r} is not a preprocessor sd has (one of {', '.join(MODULES)})")


def defaults_of(module: str, res: Optional[int], a: Optional[float], b: Optional[float]) -> tuple[int, float, float]:
    """(processor_res, threshold_a, threshold_b) with the module's defaults where None or negative (the
    extension's -1 means "the default")."""
    spec = MODULES[canonical(module)]
    res = spec.default_res if res is None or res < 0 else res
    a = (spec.threshold_a[1] if spec.threshold_a else -1) if a is None or a < 0 else a
    b = (spec.threshold_b[1] if spec.threshold_b else -1) if b is None or b < 0 else b
    return int(res), float(a), float(b)


def resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`image` at size (width, height): area averaging when it shrinks, cubic when it grows."""
    import cv2

    h, w = image.shape[:2]
    shrinks = size[0] * size[1] < w * h
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinks else cv2.INTER_CUBIC)


def scaled(image: np.ndarray, k: float) -> np.ndarray:
    """`image` scaled by k on both sides (at least one pixel)."""
    h, w = image.shape[:2]
    return image if k == 1 else resized(image, (max(1, round(w * k)), max(1, round(h * k))))


def _to_res(image: np.ndarray, res: int) -> np.ndarray:
    return scaled(image, res / min(image.shape[:2]))


def _gray3(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(values, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    import cv2

    return _gray3(cv2.Canny(image, low, high))


def threshold(image: np.ndarray, level: float) -> np.ndarray:
    return _gray3((image.astype(np.float32).mean(axis=2) > level) * 255.0)


def scribble_xdog(image: np.ndarray, level: float) -> np.ndarray:
    """Lines where the picture is darker than its wide surroundings by more than the narrow blur explains:
    (wide blur - narrow blur), the channels' minimum, over `level`."""
    import cv2

    x = image.astype(np.float32)
    narrow, wide = cv2.GaussianBlur(x, (0, 0), 0.5), cv2.GaussianBlur(x, (0, 0), 5.0)
    edge = np.clip(np.min(wide - narrow, axis=2), 0, 255)
    return _gray3((2 * edge > level) * 255.0)


def lineart_standard(image: np.ndarray) -> np.ndarray:
    """How far each pixel falls below its blurred surroundings (dark lines on a light page), scaled by the
    typical line strength so that lines come out bright on black."""
    import cv2

    x = image.astype(np.float32)
    below = np.clip(np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2), 0, 255)
    strong = below[below > 8]
    scale = max(16.0, float(np.median(strong))) if strong.size else 16.0
    return _gray3(below / scale * 127.0)


def load_midas(path, device="cpu"):
    """MiDaS from a depth2img checkpoint (its depth_model.* keys) or a file of MiDaSInference's own keys,
    strictly (the full DPT-Hybrid layout; the tiny test layout where the keys are that one's)."""
    import torch

    from ldm.loading.checkpoint import assign_weights, build_on_meta, read_state_dict

    state = read_state_dict(path)
    if any(key.startswith("depth_model.") for key in state):
        state = {key[len("depth_model."):]: value for key, value in state.items() if key.startswith("depth_model.")}
    target = {"target": "ldm.modules.midas.api.MiDaSInference", "params": {"model_type": "dpt_hybrid"}}
    from omegaconf import OmegaConf

    tiny = "model.pretrained.model.blocks.11.attn.qkv.weight" not in state
    target["params"]["tiny"] = tiny
    try:
        midas = assign_weights(build_on_meta(OmegaConf.create(target)), state, str(path), "MiDaS (dpt_hybrid)")
    except SDError as exc:
        raise SDError(f"{path} is not MiDaS for the depth preprocessor: {exc}") from None
    return midas.to(device=device, dtype=torch.float32)


def depth_map(image: np.ndarray, midas: Callable) -> np.ndarray:
    """MiDaS inverse depth of the picture (nearer is brighter), min-max scaled to 0-255, at its size."""
    import torch
    import torch.nn.functional as F

    from ldm.modules.midas.api import prepare_midas_input

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        depth = midas(prepare_midas_input(x)).float()
    depth = F.interpolate(depth, size=image.shape[:2], mode="bicubic", align_corners=False)[0, 0]
    lo, hi = float(depth.min()), float(depth.max())
    scaled = (depth - lo) / max(hi - lo, 1e-8) * 255.0
    return _gray3(scaled.round().numpy())


def detect(module: str, image: np.ndarray, res: Optional[int] = None, a: Optional[float] = None,
           b: Optional[float] = None, midas: Optional[Callable] = None) -> np.ndarray:
    """The hint `module` makes of `image` (H, W, 3) uint8, at processor_res on the shorter side."""
    check_module(module)
    module = canonical(module)
    res, a, b = defaults_of(module, res, a, b)
    if module == "none":
        return image
    picture = _to_res(image, res)
    if module == "canny":
        return canny(picture, a, b)
    if module == "invert":
        return 255 - picture
    if module == "threshold":
        return threshold(picture, a)
    if module == "scribble_xdog":
        return scribble_xdog(picture, a)
    if module == "lineart_standard":
        return lineart_standard(picture)
    if midas is None:
        raise SDError(f"preprocessor {module} needs {MODULES[module].needs}")
    return depth_map(picture, midas)
