"""What a request asks of one ControlNet: ControlUnit, and the names front ends use for its choices.

The enum strings are the sd-webui-controlnet extension's (its API, infotext and UI say them), and it also
takes their positions as integers; `parse_mode` / `parse_resize` read either, and the extension's legacy
names of the resize modes.
"""
from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ldm.errors import SDError
from ldm.limits import check_range

# mode -> the extension's name; position = the extension's integer form
MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
         "control": "ControlNet is more important"}
RESIZES = {"just": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}
# The extension's older names of the resize modes, still sent by clients (stable-gimpfusion).
LEGACY_RESIZES = {"Scale to Fit (Inner Fit)": "crop", "Envelope (Outer Fit)": "fill", "Inner Fit": "crop",
                  "Outer Fit": "fill"}
MAX_WEIGHT = 2.0  # the extension's slider
SOFT_DECAY = 0.825  # "prompt"/"control" modes: residual k of n is weighted by SOFT_DECAY ** (n - 1 - k)
MAX_UNITS = 8
PROCESSOR_RES = (64, 2048)  # a preprocessor's resolution (the extension's slider)
THRESHOLDS = (0, 1024)  # its thresholds a and b


def check_preprocessor(res, a, b, called: Callable[[str], str] = lambda key: key) -> None:
    """A preprocessor's resolution and thresholds, each None (its default) or within PROCESSOR_RES / THRESHOLDS."""
    if res is not None:
        check_range(called("processor_res"), res, *PROCESSOR_RES, whole=True)
    for key, value in (("threshold_a", a), ("threshold_b", b)):
        if value is not None:
            check_range(called(key), value, *THRESHOLDS)


def _parse(value, names: dict, what: str, legacy: Optional[dict] = None) -> str:
    keys = list(names)
    if isinstance(value, bool):
        raise SDError(f"{what}: {value!r} is not one of {', '.join(map(repr, names.values()))}")
    if isinstance(value, int) and 0 <= value < len(keys):
        return keys[value]
    if isinstance(value, str):
        for key, name in names.items():
            if value.strip().lower() in (key, name.lower()):
                return key
        if legacy and value in legacy:
            return legacy[value]
    raise SDError(f"{what}: {value!r} is not one of {', '.join(map(repr, names.values()))} "
                  f"(or 0-{len(keys) - 1})")


def parse_mode(value, what: str = "control mode") -> str:
    return _parse(value, MODES, what)


def parse_resize(value, what: str = "resize mode") -> str:
    return _parse(value, RESIZES, what, LEGACY_RESIZES)


@dataclass
class ControlUnit:
    """One ControlNet applied to a request's images.

    model: the ControlNet file (front ends resolve names to it); image: the picture (H, W, 3) uint8 RGB that
    `module` reads, or the hint itself with module "none"; weight multiplies the residuals; start and end are
    the fractions of the sampling steps during which it acts; mode and resize are keys of MODES and RESIZES.
    processor_res and the thresholds are the preprocessor's (None: its defaults).
    """
    model: str
    image: Optional[np.ndarray] = field(default=None, repr=False)
    module: str = "none"
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    resize: str = "crop"
    processor_res: Optional[int] = None
    threshold_a: Optional[float] = None
    threshold_b: Optional[float] = None
    pixel_perfect: bool = False  # processor_res was derived from the target size (the front end did it)

    def check(self, called: Callable[[str], str] = lambda key: f"ControlNet unit {key}") -> None:
        """One-line SDErrors; `called(field)` is how the front end names a field in messages."""
        from ldm.control.preprocess import check_module

        check_module(self.module, called("module"))
        if not isinstance(self.model, (str, Path)) or not str(self.model) or not Path(self.model).is_file():
            raise SDError(f"{called('model')}: ControlNet file {self.model!r} not found")
        for key, lo, hi in (("weight", 0.0, MAX_WEIGHT), ("start", 0.0, 1.0), ("end", 0.0, 1.0)):
            check_range(called(key), getattr(self, key), lo, hi)
        if self.start > self.end:
            raise SDError(f"{called('start')} {self.start:g} is after {called('end')} {self.end:g}")
        if self.mode not in MODES:
            raise SDError(f"{called('mode')}: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.resize not in RESIZES:
            raise SDError(f"{called('resize')}: {self.resize!r} is not one of {', '.join(RESIZES)}")
        check_preprocessor(self.processor_res, self.threshold_a, self.threshold_b, called)
        if self.image is None:
            raise SDError(f"{called('image')}: no picture given (the hint, or what {self.module} reads)")
        image = self.image
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise SDError(f"{called('image')} must be an RGB picture")
        if min(image.shape[:2]) < 8:
            raise SDError(f"{called('image')} is {image.shape[1]}x{image.shape[0]}; at least 8x8 is needed")

    def infotext(self, model_name: str, model_hash: Optional[str]) -> str:
        """A1111's "ControlNet N" field value for this unit (the extension's keys, in its order)."""
        from ldm.control.preprocess import defaults_of

        res, a, b = defaults_of(self.module, self.processor_res, self.threshold_a, self.threshold_b)
        model = f"{model_name} [{model_hash}]" if model_hash else model_name
        fields = [("Module", self.module), ("Model", model), ("Weight", f"{self.weight:g}"),
                  ("Resize Mode", RESIZES[self.resize]), ("Processor Res", res), ("Threshold A", f"{a:g}"),
                  ("Threshold B", f"{b:g}"), ("Guidance Start", f"{self.start:g}"), ("Guidance End", f"{self.end:g}"),
                  ("Pixel Perfect", str(bool(self.pixel_perfect))), ("Control Mode", MODES[self.mode])]
        return ", ".join(f"{key}: {value}" for key, value in fields)


def parse_infotext(value: str) -> dict:
    """A "ControlNet N" field value -> {key: value} (values as written; the model without its hash)."""
    out = {}
    for part in value.split(", "):
        key, sep, val = part.partition(": ")
        if sep:
            out[key.strip()] = val.strip()
    model = out.get("Model", "")
    if model.endswith("]") and " [" in model:
        out["Model"] = model[:model.rindex(" [")]
    return out
