"""AUTOMATIC1111's settings ("options") as sd takes them: GET /options, POST /options, override_settings.

A1111 has a few hundred options (its modules/shared_options.py). Clients post them back whole (Open WebUI
switches models by posting the dict GET /options gave) or send their own defaults with every request
(SillyTavern: CLIP_stop_at_last_layers). So every key is taken, and what happens to it is said:
- honoured: the checkpoint (by title, file name, title with hash, or hash), Clip skip, the VAE as
  "Automatic"/"None" (sd uses the checkpoint's own), DDIM's and the ancestral samplers' default eta; the
  VAE decode and encode methods ("Full", "TAESD": sd serve --taesd), the live preview's type
  (show_progress_type) and the token merging ratios, which POST /options keeps for later requests;
- equal to what sd runs (the table below): accepted;
- any other key (A1111's UI, file names and folders, system settings, extensions' keys): accepted and
  listed as ignored;
- a key of the table with another value would change the image in a way sd cannot: a RequestError that
  names the key and the value.
"""
from __future__ import annotations

from typing import Any, Optional

from ldm.serve.a1111 import RequestError

# Options that change the image, with the value sd runs (A1111's default except randn_source: sd's start
# noise comes from per-image CPU generators). Another value of one of these is refused.
IMAGE_OPTIONS: dict[str, Any] = {
    "enable_quantization": False, "enable_emphasis": True, "enable_batch_seeds": True,
    "comma_padding_backtrack": 20, "upcast_attn": False, "randn_source": "CPU", "tiling": False,
    "sd_unet": "Automatic",
    "inpainting_mask_weight": 1.0, "initial_noise_multiplier": 1.0, "img2img_extra_noise": 0.0,
    "img2img_color_correction": False, "img2img_fix_steps": False, "img2img_background_color": "#ffffff",
    "s_min_uncond": 0.0, "pad_cond_uncond": False, "use_old_emphasis_implementation": False,
    "use_old_karras_scheduler_sigmas": False, "no_dpmpp_sde_batch_determinism": False,
    "dont_fix_second_order_samplers_schedule": False, "use_old_scheduling": False, "face_restoration": False,
    "ddim_discretize": "uniform", "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0,
    "k_sched_type": "Automatic", "sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0, "eta_noise_seed_delta": 0,
    "always_discard_next_to_last_sigma": False, "sd_hypernetwork": "None", "extra_networks_default_multiplier": 1.0,
}
MAX_ETA_OPTION = 1.0  # A1111's eta sliders end at 1
VAE_NAMES = ("Automatic", "None")  # sd has no VAE files: the checkpoint's own VAE is both of these
# A1111's VAE methods ("Full", "TAESD") -> the Request's decode / encode values
VAE_METHODS = {"Full": "full", "TAESD": "taesd"}
# A1111's show_progress_type -> Pipeline.preview's method ("Approx NN", a small network sd does not have, is
# served by TAESD, which does its job better)
PREVIEW_TYPES = {"Full": "full", "Approx NN": "taesd", "Approx cheap": "cheap", "TAESD": "taesd"}
TOME_KEYS = ("token_merging_ratio", "token_merging_ratio_img2img", "token_merging_ratio_hr")
MAX_TOME_OPTION = 0.9  # A1111's sliders

# The options the server keeps (POST /options sets them for every later request; GET /options reads them)
# with A1111's defaults, except the preview: "Approx cheap" costs nothing, where A1111's "Approx NN" needs weights.
KEPT_DEFAULTS: dict[str, Any] = {"sd_vae_decode_method": "Full", "sd_vae_encode_method": "Full",
                                 "show_progress_type": "Approx cheap", **{key: 0.0 for key in TOME_KEYS},
                                 "save_images_before_highres_fix": False}


def same(a: Any, b: Any) -> bool:
    """Equal as settings: 1 == 1.0 == "1.0", True is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (str(a).lower() == str(b).lower() and not isinstance(a, (int, float)))
    try:
        return float(a) == float(b)
    except OverflowError:  # an integer past float's range equals no setting
        return False
    except (TypeError, ValueError):
        return str(a) == str(b)


class Settings:
    """The A1111 settings one request runs with: the checkpoint to use, clip skip, default etas, and the keys
    taken without effect (reported as ignored)."""

    def __init__(self, clip_skip: int = 1, eta_ddim: float = 0.0, eta_ancestral: float = 1.0,
                 kept: Optional[dict] = None):
        self.checkpoint: Optional[str] = None
        self.clip_skip, self.eta_ddim, self.eta_ancestral = clip_skip, eta_ddim, eta_ancestral
        self.kept: dict[str, Any] = {**KEPT_DEFAULTS, **(kept or {})}  # the server's, then this request's
        self.ignored: list[str] = []

    @property
    def decode(self) -> str:
        return VAE_METHODS[self.kept["sd_vae_decode_method"]]

    @property
    def encode(self) -> str:
        return VAE_METHODS[self.kept["sd_vae_encode_method"]]

    @property
    def preview(self) -> str:
        return PREVIEW_TYPES[self.kept["show_progress_type"]]

    def request_fields(self, task: str) -> dict:
        """The Request fields these settings give a job of `task`: decoder, encoder, token merging ratio."""
        return {"decode": self.decode, "encode": self.encode, "tome": self.tome(task)}

    def tome(self, task: str) -> float:
        """A1111's precedence: the img2img ratio for image tasks when it is not 0, else token_merging_ratio."""
        image_task = task in ("img2img", "inpaint", "depth2img")
        if image_task and self.kept["token_merging_ratio_img2img"]:
            return float(self.kept["token_merging_ratio_img2img"])
        return float(self.kept["token_merging_ratio"])

    def take(self, values: Any, where: str) -> "Settings":
        """Read `values` (a JSON object of A1111 option keys); RequestError for what sd cannot do."""
        if values is None:
            return self
        if not isinstance(values, dict):
            raise RequestError(f"{where} must be a JSON object of AUTOMATIC1111 option keys")
        for key, value in values.items():
            self._take(str(key), value, where)
        return self

    def _take(self, key: str, value: Any, where: str) -> None:
        if key == "sd_model_checkpoint":
            self.checkpoint = None if value in (None, "") else str(value)
        elif key == "CLIP_stop_at_last_layers":
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 12
                    or value != int(value)):  # the range first: int() of inf or NaN raises
                raise RequestError(f"{where}.CLIP_stop_at_last_layers must be a whole number from 1 to 12 (got {value!r})")
            self.clip_skip = int(value)
        elif key in ("eta_ddim", "eta_ancestral"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_ETA_OPTION:
                raise RequestError(f"{where}.{key} must be a number from 0 to 1 (got {value!r})")
            setattr(self, key, float(value))
        elif key in ("sd_vae_decode_method", "sd_vae_encode_method"):
            if value not in VAE_METHODS:
                raise RequestError(f"{where}.{key} must be one of {', '.join(map(repr, VAE_METHODS))} (got {value!r})")
            self.kept[key] = value
        elif key == "show_progress_type":
            if value not in PREVIEW_TYPES:
                raise RequestError(f"{where}.{key} must be one of {', '.join(map(repr, PREVIEW_TYPES))} (got {value!r})")
            self.kept[key] = value
        elif key in TOME_KEYS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_TOME_OPTION:
                raise RequestError(f"{where}.{key} must be a number from 0 to {MAX_TOME_OPTION} (got {value!r})")
            self.kept[key] = float(value)  # token_merging_ratio_hr: the hires fix's second pass (a1111.hires_of)
        elif key == "save_images_before_highres_fix":
            if not isinstance(value, bool):
                raise RequestError(f"{where}.{key} must be true or false (got {value!r})")
            self.kept[key] = value
        elif key == "sd_vae":
            if value not in VAE_NAMES:
                raise RequestError(f"{where}.sd_vae {value!r}: sd uses the checkpoint's own VAE (\"Automatic\" or "
                                   "\"None\"); it loads no separate VAE files")
        elif key in IMAGE_OPTIONS:
            if not same(value, IMAGE_OPTIONS[key]):
                raise RequestError(f"{where}.{key} {value!r} would change the image in a way sd cannot; sd runs "
                                   f"{IMAGE_OPTIONS[key]!r}")
        else:  # A1111's UI, files, folders and system settings, and extensions' keys: nothing sd draws
            self.ignored.append(key)

    def eta_for(self, sampler: str) -> Optional[float]:
        """The default eta these settings give `sampler` (None: sd's own resolution)."""
        if sampler == "ddim" and self.eta_ddim != 0.0:
            return self.eta_ddim
        if sampler in ("euler_a", "dpmpp_2m_sde") and self.eta_ancestral != 1.0:
            return self.eta_ancestral
        return None


def current(server) -> dict:
    """GET /options: the A1111 options clients read, with the values sd runs."""
    return {
        "sd_model_checkpoint": server.current_title(), "sd_checkpoint_hash": server.current_sha256(),
        "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0, "eta_ancestral": 1.0,
        "samples_format": "png", "grid_format": "png", "samples_save": server.outdir is not None,
        "outdir_samples": str(server.outdir) if server.outdir is not None else "", "enable_pnginfo": True,
        "sd_checkpoints_limit": 1, "sd_lora": "None", "live_previews_enable": server.preview_every > 0,
        "show_progress_every_n_steps": server.preview_every,
        **IMAGE_OPTIONS, **server.kept_options,
    }
