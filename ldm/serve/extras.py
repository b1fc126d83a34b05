"""AUTOMATIC1111's "extras" routes: resizing pictures with the upscalers sd has.

sd's upscalers are PIL's Lanczos and Nearest (no model: the picture is resampled), "None" (A1111's "no
upscaler"), and the x4 diffusion upscaler for every x4 checkpoint in the models folder, listed as
"SD x4 (TITLE)": it runs on the worker like a request that names that checkpoint (loaded for the call,
the served model put back after), with no prompt, seed 0 and the upscaler's own defaults (75 steps, noise level
20), and its exact 4x result is then resized to the asked size with Lanczos. Two upscalers blend as in
A1111 (extras_upscaler_2_visibility).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from ldm.files import imageio
from ldm.serve import a1111
from ldm.serve.a1111 import RequestError

RESAMPLE = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
MAX_FACTOR = 8.0
MAX_BATCH = 16


X4_PREFIX = "SD x4 ("
X4_SEED = 0  # the x4 model draws noise: a fixed seed makes an extras call give the same picture every time
def x4_models(server) -> dict[str, Path]:
    """The models folder's x4 upscaler checkpoints by their upscaler names."""
    return {f"{X4_PREFIX}{server.title(f)})": f for f in server.checkpoint_files() if server.kind_of(f) == "x4"}


def upscalers(server) -> list[dict]:
    """GET /upscalers, A1111's shape: "None" first, then what sd can resample with, then the x4 models."""
    listed = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
              for name in ("None", *RESAMPLE)]
    return listed + [{"name": name, "model_name": path.stem, "model_path": str(path), "model_url": None, "scale": 4}
                     for name, path in x4_models(server).items()]


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


def _upscaler(body: dict, key: str, x4: dict) -> str:
    """The upscaler `key` names: None, a resampler, or one of the `x4` models (x4_models)."""
    name = body.get(key, "None")
    name = "None" if name in (None, "") else str(name)
    if name != "None" and name not in RESAMPLE and name not in x4:
        listed = ", ".join(x4) or "none: put x4-upscaler-ema.ckpt in the models folder"
        raise RequestError(f"{key} '{name}': sd's upscalers here are None, {', '.join(RESAMPLE)}; x4 models: {listed}")
    return name


def _resized(server, picture: Image.Image, name: str, size: tuple[int, int]) -> Image.Image:
    """`picture` at `size` through one upscaler (None: unchanged)."""
    if name == "None":
        return picture
    if name in RESAMPLE:
        return picture.resize(size, RESAMPLE[name])
    return _diffusion_x4(server, picture, name).resize(size, Image.LANCZOS)


def _diffusion_x4(server, picture: Image.Image, name: str) -> Image.Image:
    """The x4 diffusion upscaler's result (4x per side), run on the worker with its checkpoint."""
    from ldm.serve.jobs import Call, Prepared, generate

    prepared = Prepared("", {}, checkpoint=name[len(X4_PREFIX):-1])
    ran = generate(server, prepared, Call("upscale", (picture, ""), {"seed": X4_SEED}), "extras")
    if ran.interrupted or not ran.images:
        raise RequestError("the x4 upscaler was interrupted")
    return ran.images[0].image


def upscale(server, picture: Image.Image, body: dict, x4: dict) -> Image.Image:
    """One picture through upscaler_1 (and upscaler_2 blended in by its visibility), to the asked size;
    `x4`: the models folder's x4 models, listed once per request."""
    size = _target_size(body, picture.size, server.limits.max_side)
    first, second = _upscaler(body, "upscaler_1", x4), _upscaler(body, "upscaler_2", x4)
    visibility = _number(body, "extras_upscaler_2_visibility", 0, 0, 1)
    picture = picture.convert("RGB")
    out = _resized(server, picture, first, size)
    if second != "None" and visibility > 0:
        out = Image.blend(out.resize(size), _resized(server, picture, second, size), visibility)
    return out


def _answer(picture: Image.Image) -> str:
    return a1111.encode_png(imageio.png_bytes(picture))


def single(server, body: Any) -> dict:
    """POST /extra-single-image: {"image": base64, resize_mode, upscaling_resize, upscaler_1, ...}."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    picture = a1111.decode_image(body.get("image"), "image", server.max_pixels)
    return {"html_info": "", "image": _answer(upscale(server, picture, body, x4_models(server)))}


def batch(server, body: Any) -> dict:
    """POST /extra-batch-images: {"imageList": [{"data": base64, "name": ...}], ...}."""
    if not isinstance(body, dict) or not isinstance(body.get("imageList"), list):
        raise RequestError("imageList must be a list of {\"data\": base64 image, \"name\": ...}")
    entries = body["imageList"]
    if len(entries) > MAX_BATCH:
        raise RequestError(f"imageList holds {len(entries)} images; at most {MAX_BATCH}")
    out, x4 = [], x4_models(server)
    for k, entry in enumerate(entries):
        data = entry.get("data") if isinstance(entry, dict) else None
        picture = a1111.decode_image(data, f"imageList[{k}].data", server.max_pixels)
        out.append(_answer(upscale(server, picture, body, x4)))
    return {"html_info": "", "images": out}
