"""AUTOMATIC1111's "extras" routes: resizing pictures with the upscalers sd has.

sd's upscalers are PIL's Lanczos and Nearest (no model: the picture is resampled), and "None" (A1111's
"no upscaler"). The x4 diffusion upscaler is a model with its own checkpoint: /sdapi/v1/img2img on a server
started with x4-upscaler-ema.ckpt, or `sd upscale`; naming it here is a 422 that says so. Two upscalers
blend as in A1111 (extras_upscaler_2_visibility).
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from ldm.files import imageio
from ldm.serve import a1111
from ldm.serve.a1111 import RequestError

RESAMPLE = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
MAX_FACTOR = 8.0
MAX_BATCH = 16


def upscalers() -> list[dict]:
    """GET /upscalers, A1111's shape: "None" first, then what sd can resample with."""
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in ("None", *RESAMPLE)]


def _number(body: dict, key: str, default, low: float, high: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"{key} must be a number from {low:g} to {high:g} (got {value!r})")
    return value


def _target_size(body: dict, size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The size A1111's resize_mode asks for: 0 scales by upscaling_resize, 1 goes to upscaling_resize_w x _h."""
    mode = body.get("resize_mode", 0)
    if mode == 0:
        factor = _number(body, "upscaling_resize", 2, 1, MAX_FACTOR)
        width, height = round(size[0] * factor), round(size[1] * factor)
    elif mode == 1:
        width = int(_number(body, "upscaling_resize_w", 512, 1, max_side))
        height = int(_number(body, "upscaling_resize_h", 512, 1, max_side))
    else:
        raise RequestError(f"resize_mode must be 0 (scale by upscaling_resize) or 1 (to upscaling_resize_w/h), "
                           f"got {mode!r}")
    if max(width, height) > max_side:
        raise RequestError(f"the result would be {width}x{height}, above the server's {max_side} pixels a side "
                           "(the server's max_side)")
    return width, height


def _upscaler(body: dict, key: str) -> str:
    name = body.get(key, "None")
    name = "None" if name in (None, "") else str(name)
    if name != "None" and name not in RESAMPLE:
        raise RequestError(f"{key} '{name}': sd's upscalers here are None, {', '.join(RESAMPLE)} (the x4 diffusion "
                           "upscaler runs as img2img on a server started with x4-upscaler-ema.ckpt)")
    return name


def upscale(picture: Image.Image, body: dict, max_side: int) -> Image.Image:
    """One picture through upscaler_1 (and upscaler_2 blended in by its visibility), to the asked size."""
    size = _target_size(body, picture.size, max_side)
    first, second = _upscaler(body, "upscaler_1"), _upscaler(body, "upscaler_2")
    visibility = _number(body, "extras_upscaler_2_visibility", 0, 0, 1)
    picture = picture.convert("RGB")
    out = picture.resize(size, RESAMPLE.get(first, Image.LANCZOS)) if first != "None" else picture
    if second != "None" and visibility > 0:
        out = Image.blend(out.resize(size), picture.resize(size, RESAMPLE[second]), visibility)
    return out


def _answer(picture: Image.Image) -> str:
    return a1111.encode_png(imageio.png_bytes(picture))


def single(server, body: Any) -> dict:
    """POST /extra-single-image: {"image": base64, resize_mode, upscaling_resize, upscaler_1, ...}."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    picture = a1111.decode_image(body.get("image"), "image", server.max_pixels)
    return {"html_info": "", "image": _answer(upscale(picture, body, server.limits.max_side))}


def batch(server, body: Any) -> dict:
    """POST /extra-batch-images: {"imageList": [{"data": base64, "name": ...}], ...}."""
    if not isinstance(body, dict) or not isinstance(body.get("imageList"), list):
        raise RequestError("imageList must be a list of {\"data\": base64 image, \"name\": ...}")
    entries = body["imageList"]
    if len(entries) > MAX_BATCH:
        raise RequestError(f"imageList holds {len(entries)} images; at most {MAX_BATCH}")
    out = []
    for k, entry in enumerate(entries):
        data = entry.get("data") if isinstance(entry, dict) else None
        picture = a1111.decode_image(data, f"imageList[{k}].data", server.max_pixels)
        out.append(_answer(upscale(picture, body, server.limits.max_side)))
    return {"html_info": "", "images": out}
