"""The sd-webui-controlnet extension's API: its units in alwayson_scripts.controlnet.args, and its /controlnet
routes (version, model_list, module_list, control_types, settings, detect).

Units speak the extension's field names, its aliases (input_image for image, guidance for guidance_end,
lowvram for low_vram: sending both names of one field is a 422, as the extension asserts), its enum strings
and their integer forms, and its legacy resize names. Models are named as model_list lists them
("NAME [HASH]", or NAME alone) and found in the server's ControlNet folder (--controlnet-dir). low_vram
changes nothing on sd (no VRAM to save) and is reported in the info's ignored settings when true.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import APIRouter

from ldm.control.preprocess import MODULES, canonical
from ldm.control.units import MAX_UNITS, ControlUnit, check_preprocessor, parse_mode, parse_resize
from ldm.errors import SDError
from ldm.serve import a1111
from ldm.serve.a1111 import RequestError

VERSION = 3  # the extension's API version (external_code.py), which clients compare against
UNIT_COUNT = 3  # /controlnet/settings: the unit panels the extension shows by default
SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt")
MAX_FILES = 1000
ALIAS_FIELDS = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram"}
FIELDS = ("enabled", "module", "model", "weight", "image", "resize_mode", "processor_res", "threshold_a",
          "threshold_b", "guidance_start", "guidance_end", "pixel_perfect", "control_mode", "low_vram", "mask",
          "hr_option", "save_detected_map", "is_ui", "input_mode", "batch_images", "output_dir", "loopback",
          "advanced_weighting", "inpaint_crop_input_image", "effective_region_mask", "ipadapter_input",
          "pulid_mode", "union_control_type")
# request field -> the unit's field
API_FIELDS = {"model": "model", "weight": "weight", "image": "image", "module": "module", "start": "guidance_start",
              "end": "guidance_end", "mode": "control_mode", "resize": "resize_mode",
              "processor_res": "processor_res", "threshold_a": "threshold_a", "threshold_b": "threshold_b"}
# Kinds of ControlNet /controlnet/control_types groups: preprocessors and the file-name word of their models
CONTROL_TYPES = {"Canny": (("canny",), "canny"), "Depth": (("depth_midas",), "depth"),
                 "Scribble": (("scribble_xdog", "invert", "threshold"), "scribble"),
                 "Lineart": (("lineart_standard", "invert"), "lineart")}


def models(server) -> dict[str, Path]:
    """{name: file} of the ControlNet folder."""
    from ldm.files.reading import model_files

    return model_files(server.controlnet_folder(), SUFFIXES, MAX_FILES)


def model_title(name: str, path: Path) -> str:
    """"NAME [HASH]" as model_list shows it (the short form of the file's hash, cached by its stat)."""
    from ldm.files import metadata

    return f"{name} [{metadata.model_hash(path, length=8)}]"


def find_model(server, asked: str, where: str) -> Path:
    listed = models(server)
    name = asked.rsplit(" [", 1)[0] if asked.endswith("]") else asked
    if name in listed:
        return listed[name]
    raise RequestError(f"{where}: no ControlNet named {asked!r} in the server's ControlNet folder "
                       f"(GET /controlnet/model_list lists {len(listed)})")


def _number(value, where: str, whole: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and value != int(value)):
        raise RequestError(f"{where} must be a {'whole ' if whole else ''}number, not {value!r}")
    return int(value) if whole else float(value)


def _image(server, value, where: str) -> np.ndarray:
    if isinstance(value, dict):  # the extension's {"image": ..., "mask": ...}
        if value.get("mask"):
            raise RequestError(f"{where}.mask: sd cannot honour a ControlNet mask")
        value = value.get("image")
    return np.asarray(a1111.decode_image(value, where, server.max_pixels))


def parse_unit(server, raw: Any, where: str, size: tuple[Optional[int], Optional[int]]) -> tuple[Optional[ControlUnit], list[str]]:
    """One entry of args: (the unit, or None for a unit that is off; settings taken without effect: fields
    the extension's units do not have, as older clients send them, are reported, not refused)."""
    if raw is None or raw is False or raw == {}:
        return None, []
    if not isinstance(raw, dict):
        raise RequestError(f"{where} must be an object of the ControlNet extension's unit fields")
    fields = dict(raw)
    for alias, name in ALIAS_FIELDS.items():
        if alias in fields:
            # the extension refuses both names; older clients (stable-gimpfusion) send both with one value
            if name in fields and fields[name] != fields[alias]:
                raise RequestError(f"{where}: {name} {fields[name]!r} and its alias {alias} {fields[alias]!r} "
                                   "disagree; send one")
            fields[name] = fields.pop(alias)
    if not fields.get("enabled", True):
        return None, []
    ignored = [f"{where}.{key} (not a field of the ControlNet extension's units sd knows)"
               for key in sorted(set(fields) - set(FIELDS))]
    model = fields.get("model", "None")
    if model in (None, "", "None", "none"):
        return None, []  # the extension runs no ControlNet without a model
    if not isinstance(model, str):
        raise RequestError(f"{where}.model must be a model name from /controlnet/model_list")
    module = fields.get("module", "none")
    if not isinstance(module, str) or canonical(module) not in MODULES:
        raise RequestError(f"{where}.module: {module!r} is not a preprocessor sd has (GET /controlnet/module_list)")
    if fields.get("image") is None:
        raise RequestError(f"{where}.image: no picture given")
    if fields.get("mask"):
        raise RequestError(f"{where}.mask: sd cannot honour a ControlNet mask")
    if fields.get("low_vram"):
        ignored.append(f"{where}.low_vram (no effect on sd)")
    if fields.get("advanced_weighting") is not None or fields.get("effective_region_mask") is not None:
        raise RequestError(f"{where}: sd cannot honour advanced_weighting or effective_region_mask")
    try:
        mode = parse_mode(fields.get("control_mode", "Balanced"), f"{where}.control_mode")
        resize = parse_resize(fields.get("resize_mode", "Crop and Resize"), f"{where}.resize_mode")
    except SDError as exc:
        raise RequestError(str(exc)) from None
    res = fields.get("processor_res", -1)
    res = None if res is None or res == -1 else _number(res, f"{where}.processor_res", whole=True)
    thresholds = [fields.get(key, -1) for key in ("threshold_a", "threshold_b")]
    thresholds = [None if t is None or t == -1 else _number(t, f"{where}.{key}")
                  for t, key in zip(thresholds, ("threshold_a", "threshold_b"))]
    image = _image(server, fields["image"], f"{where}.image")
    if fields.get("pixel_perfect"):
        res = pixel_perfect_res(image.shape[:2], size, resize)
    unit = ControlUnit(model=str(find_model(server, model, f"{where}.model")), image=image, module=canonical(module),
                       weight=fields.get("weight", 1.0), start=fields.get("guidance_start", 0.0),
                       end=fields.get("guidance_end", 1.0), mode=mode, resize=resize, processor_res=res,
                       threshold_a=thresholds[0], threshold_b=thresholds[1],
                       pixel_perfect=bool(fields.get("pixel_perfect")))
    return unit, ignored


def pixel_perfect_res(picture: tuple[int, int], size: tuple[Optional[int], Optional[int]], resize: str) -> int:
    """The preprocessor resolution at which the hint needs no rescaling for the target size (the extension's
    "pixel perfect"): the picture's shorter side times the scale the resize mode applies."""
    h, w = picture
    width, height = size[0] or w, size[1] or h
    k = max(width / w, height / h) if resize == "crop" else min(width / w, height / h)
    return max(64, min(2048, round(k * min(h, w))))


def units_of(server, request, size: tuple[Optional[int], Optional[int]]) -> tuple[tuple, dict, list[str]]:
    """(units, their fields' names in messages, ignored settings) of a request's alwayson_scripts.controlnet."""
    entry = (request.alwayson_scripts or {}).get("controlnet") or (request.alwayson_scripts or {}).get("ControlNet")
    if not entry:
        return (), {}, []
    if not isinstance(entry, dict) or not isinstance(entry.get("args", []), list):
        raise RequestError("alwayson_scripts.controlnet must be an object such as {\"args\": [unit, ...]}")
    args = entry.get("args", [])
    if len(args) > 64:
        raise RequestError(f"alwayson_scripts.controlnet.args holds {len(args)} units; at most {MAX_UNITS} can run")
    units, names, ignored = [], {}, []
    for index, raw in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{index}]"
        unit, skipped = parse_unit(server, raw, where, size)
        ignored += skipped
        if unit is None:
            continue
        names.update({f"control.{len(units)}.{key}": f"{where}.{field}" for key, field in API_FIELDS.items()})
        names[f"control.{len(units)}"] = where
        units.append(unit)
    if len(units) > MAX_UNITS:
        raise RequestError(f"alwayson_scripts.controlnet: {len(units)} units are on; at most {MAX_UNITS} can run")
    return tuple(units), names, ignored


# -- the /controlnet routes -------------------------------------------------------------------------------

def module_detail(name: str) -> dict:
    spec = MODULES[name]
    sliders = [{"name": "Preprocessor Resolution", "value": spec.default_res, "min": 64, "max": 2048}]
    for threshold in (spec.threshold_a, spec.threshold_b):
        if threshold is not None:
            label, value, lo, hi = threshold
            sliders.append({"name": label, "value": value, "min": lo, "max": hi})
    return {"model_free": False, "sliders": sliders}


def detect(server, body: dict) -> dict:
    """POST /controlnet/detect: each picture through a preprocessor, as base64 PNGs."""
    from ldm.control.preprocess import detect as run
    from ldm.files.imageio import png_bytes
    from PIL import Image

    module = body.get("controlnet_module", "none")
    if not isinstance(module, str) or canonical(module) not in MODULES:
        raise RequestError(f"controlnet_module: {module!r} is not a preprocessor sd has (GET /controlnet/module_list)")
    pictures = body.get("controlnet_input_images") or []
    if not isinstance(pictures, list) or not pictures or len(pictures) > 16:
        raise RequestError("controlnet_input_images must be a list of 1 to 16 base64 pictures")
    if body.get("controlnet_masks"):
        raise RequestError("controlnet_masks: sd cannot honour masks in detect")
    res, a, b = (None if body.get(key, -1) in (None, -1) else body[key]  # -1: the module's default
                 for key in ("controlnet_processor_res", "controlnet_threshold_a", "controlnet_threshold_b"))
    try:
        check_preprocessor(res, a, b, lambda key: f"controlnet_{key}")
    except SDError as exc:
        raise RequestError(str(exc)) from None
    module = canonical(module)
    if module == "depth_midas" and server.control_midas is None:
        raise RequestError("depth_midas needs MiDaS: start sd serve with --control-midas (the depth2img checkpoint)")
    images = []
    for k, data in enumerate(pictures):
        picture = _image(server, data, f"controlnet_input_images[{k}]")
        try:
            hint = server.worker.run("detect", lambda pipe, progress: run(module, picture, res, a, b, pipe.midas))
        except SDError as exc:
            raise RequestError(str(exc)) from None
        images.append(a1111.encode_png(png_bytes(Image.fromarray(hint))))
    return {"info": "Success", "images": images}


def legacy_request(body: dict, kind):
    """An A1111 request of the extension's old routes: controlnet_units become alwayson_scripts.controlnet."""
    from pydantic import ValidationError

    body = dict(body)
    units = body.pop("controlnet_units", [])
    if not isinstance(units, list):
        raise RequestError("controlnet_units must be a list of units")
    scripts = dict(body.get("alwayson_scripts") or {})
    if units:
        scripts["controlnet"] = {"args": units}
    body["alwayson_scripts"] = scripts
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "the body"
        raise RequestError(f"{where}: {first.get('msg', 'invalid')}") from None


def router(server) -> APIRouter:
    api = APIRouter(prefix="/controlnet", strict_content_type=False)

    @api.get("/version")
    def get_version() -> dict:
        return {"version": VERSION}

    @api.get("/model_list")
    def get_model_list(update: bool = False) -> dict:
        return {"model_list": [model_title(name, path) for name, path in models(server).items()]}

    @api.get("/module_list")
    def get_module_list(alias_names: bool = False) -> dict:
        return {"module_list": list(MODULES), "module_detail": {name: module_detail(name) for name in MODULES}}

    @api.get("/control_types")
    def get_control_types() -> dict:
        listed = [model_title(name, path) for name, path in models(server).items()]
        types = {"All": {"module_list": list(MODULES), "model_list": ["None", *listed], "default_option": "none",
                         "default_model": "None"}}
        for kind, (modules, word) in CONTROL_TYPES.items():
            own = [title for title in listed if word in title.lower()]
            types[kind] = {"module_list": ["none", *modules], "model_list": ["None", *own],
                           "default_option": modules[0], "default_model": own[0] if own else "None"}
        return {"control_types": types}

    @api.get("/settings")
    def get_settings() -> dict:
        # the extension's key, and its older one (which the Photoshop plug-in reads)
        return {"control_net_unit_count": UNIT_COUNT, "control_net_max_models_num": UNIT_COUNT}

    @api.post("/detect")
    def post_detect(body: a1111.JSONObject) -> dict:
        return detect(server, body)

    # The extension's first API (its routes before alwayson_scripts), which stable-gimpfusion still calls: an
    # A1111 body with the units in controlnet_units. The detected maps it appended are not returned.
    @api.post("/txt2img")
    def post_txt2img(body: a1111.JSONObject) -> dict:
        from ldm.serve import api as sdapi

        return sdapi.txt2img(server, legacy_request(body, a1111.Txt2ImgRequest))

    @api.post("/img2img")
    def post_img2img(body: a1111.JSONObject) -> dict:
        from ldm.serve import api as sdapi

        return sdapi.img2img(server, legacy_request(body, a1111.Img2ImgRequest))

    return api

