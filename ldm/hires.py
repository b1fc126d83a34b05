"""The hires fix, as AUTOMATIC1111 runs it: a txt2img first pass at the request's size, an upscale of its
latents (or of its decoded pictures), then an img2img second pass at the larger size.

`Hires` is the request's part (ldm.request.Request.hires), named after the maths and A1111's fields:
scale or an explicit width/height (hr_scale, hr_resize_x/y), the upscaler, the second pass's steps (0: the
first pass's), its denoising strength, its own sampler / schedule / prompts when given, and the token
merging ratio of the second pass, and whether the first pass's pictures are kept too. `target` gives the size rules: both sides from the scale; one side given,
the other keeps the aspect ratio; both given, the first pass is scaled to cover them and the latent cropped
to them (centred). Latent upscalers interpolate the latents (A1111's six "Latent" modes); "Lanczos" and
"Nearest" decode the first pass, resize the pictures and encode them again; "SD x4" runs the x4 diffusion
upscaler on them first (its own checkpoint, loaded beside the model) and resizes its result.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ldm.errors import SDError
from ldm.limits import check_range

# A1111's latent upscale modes (GET /sdapi/v1/latent-upscale-modes): (interpolation, antialias)
LATENT_MODES = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
PIXEL_MODES = ("Lanczos", "Nearest")
X4 = "SD x4"  # the SD x4 diffusion upscaler (its checkpoint: Hires.x4), then a Lanczos resize to the size
UPSCALERS = (*LATENT_MODES, *PIXEL_MODES, X4)
MAX_SCALE = 4.0


@dataclass(frozen=True)
class Hires:
    scale: float = 2.0
    width: int = 0  # hr_resize_x: 0 = from the scale (or the aspect ratio when height is given)
    height: int = 0
    upscaler: str = "Latent"
    steps: int = 0  # 0: the first pass's steps
    strength: float = 0.7  # A1111's denoising_strength of the second pass
    sampler: Optional[str] = None  # None: the first pass's
    schedule: Optional[str] = None
    prompt: str = ""  # "": the first pass's
    negative_prompt: str = ""
    tome: Optional[float] = None  # token merging ratio of the second pass; None: the first pass's
    keep_first: bool = False  # also give the first pass's pictures (A1111's save_images_before_highres_fix)
    x4: Optional[str] = None  # the x4 upscaler's checkpoint, for upscaler "SD x4"
    x4_config: Optional[str] = None  # its config (None: chosen from its keys, as for any checkpoint)
    x4_steps: Optional[int] = None  # its steps (None: its own default, 75)

    def target(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((width, height) the first pass is upscaled to, (width, height) kept after the crop) for a first
        pass of width x height (A1111's hr_upscale_to_x/y and hr_resize_x/y)."""
        if not self.width and not self.height:
            size = (int(width * self.scale), int(height * self.scale))
            return size, size
        if not self.height:
            size = (self.width, self.width * height // width)
            return size, size
        if not self.width:
            size = (self.height * width // height, self.height)
            return size, size
        if width / height < self.width / self.height:
            return (self.width, self.width * height // width), (self.width, self.height)
        return (self.height * width // height, self.height), (self.width, self.height)

    def check(self, width: int, height: int, factor: int, max_side: int, name=lambda key: key) -> None:
        def number(key: str, lo: float, hi: float, whole: bool = False) -> None:
            check_range(name(f"hires.{key}"), getattr(self, key), lo, hi, whole)

        number("scale", 1.0, MAX_SCALE)
        number("width", 0, max_side, whole=True)
        number("height", 0, max_side, whole=True)
        number("steps", 0, 10_000, whole=True)
        number("strength", 0.0, 1.0)
        if self.tome is not None:
            number("tome", 0.0, 0.9)
        if self.upscaler not in UPSCALERS:
            raise SDError(f"{name('hires.upscaler')}: {self.upscaler!r} is not one of {', '.join(UPSCALERS)}")
        if self.upscaler == X4 and (not self.x4 or not Path(self.x4).is_file()):
            raise SDError(f"{name('hires.upscaler')} {X4} needs the x4 upscaler's checkpoint ({name('hires.x4')}: "
                          f"x4-upscaler-ema.ckpt){'' if not self.x4 else f'; {self.x4} is not a file'}")
        (up_w, up_h), (w, h) = self.target(width, height)
        for side, value in (("width", w), ("height", h), ("width", up_w), ("height", up_h)):
            if not factor <= value <= max_side:
                raise SDError(f"the hires fix makes the {side} {value} px, outside {factor}..{max_side} "
                              f"({name('max_side')})")

    def fields(self, first: tuple[int, int]) -> dict:
        """A1111's infotext fields of the second pass ("Denoising strength" among them)."""
        from ldm.models.diffusion.sampler_names import sampler_label, schedule_label

        resized = bool(self.width or self.height)
        return {"Denoising strength": self.strength,
                "Hires upscale": None if resized else self.scale,
                "Hires resize": f"{self.target(*first)[1][0]}x{self.target(*first)[1][1]}" if resized else None,
                "Hires steps": self.steps or None,
                "Hires upscaler": f"{X4} ({Path(self.x4).stem})" if self.upscaler == X4 and self.x4 else self.upscaler,
                "Hires sampler": sampler_label(self.sampler) if self.sampler else None,
                "Hires schedule type": schedule_label(self.schedule) if self.schedule else None,
                "Hires prompt": self.prompt or None, "Hires negative prompt": self.negative_prompt or None,
                "Token merging ratio hr": self.tome or None}


def from_fields(fields: dict) -> Optional[Hires]:
    """The Hires an infotext records (None without its fields); SDError for values that are not numbers."""
    if "Hires upscaler" not in fields and "Hires upscale" not in fields and "Hires resize" not in fields:
        return None
    from ldm.models.diffusion.sampler_names import sampler_of_name

    sampler = schedule = None
    if "Hires sampler" in fields:
        sampler, schedule = sampler_of_name(fields["Hires sampler"], fields.get("Hires schedule type"))
    try:
        width = height = 0
        if "Hires resize" in fields:
            width, _, height = fields["Hires resize"].partition("x")
            width, height = int(width), int(height)
        upscaler = fields.get("Hires upscaler", "Latent")
        upscaler = X4 if upscaler.startswith(f"{X4} (") else upscaler  # which file: the command's --hires-x4
        return Hires(scale=float(fields.get("Hires upscale", 2.0)), width=width, height=height, upscaler=upscaler, steps=int(fields.get("Hires steps", 0)),
                     strength=float(fields.get("Denoising strength", 0.7)), sampler=sampler,
                     schedule=schedule, prompt=fields.get("Hires prompt", ""),
                     negative_prompt=fields.get("Hires negative prompt", ""),
                     tome=float(fields["Token merging ratio hr"]) if "Token merging ratio hr" in fields else None)
    except ValueError as exc:
        raise SDError(f"its hires fields hold a value that is not a number ({exc})") from None


def crop_latents(z: torch.Tensor, keep: tuple[int, int], factor: int) -> torch.Tensor:
    """The centre (keep = (width, height) px) of latents z, as A1111 truncates them."""
    h, w = keep[1] // factor, keep[0] // factor
    top, left = (z.shape[-2] - h) // 2, (z.shape[-1] - w) // 2
    return z[..., top:top + h, left:left + w]


def upscale_latents(z: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Latents (B, C, h, w) -> (B, C, H, W) by a latent mode; size = (H, W)."""
    interpolation, antialias = LATENT_MODES[mode]
    kwargs = {} if interpolation.startswith("nearest") else {"antialias": antialias, "align_corners": False}
    return F.interpolate(z, size=size, mode=interpolation, **kwargs)


def upscale_pictures(pictures: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Pictures (B, 3, h, w) in [-1, 1] -> (B, 3, H, W) resized by PIL's Lanczos or nearest, as A1111's
    non-latent upscalers of those names; size = (width, height)."""
    from PIL import Image

    from ldm.files import imageio

    resample = Image.LANCZOS if mode == "Lanczos" else Image.NEAREST
    out = [imageio.pil_to_tensor(picture.resize(size, resample))
           for picture in imageio.tensor_to_pil(pictures.float().cpu())]
    return torch.cat(out).to(pictures)
