"""AUTOMATIC1111's /sdapi/v1 protocol on top of ldm.pipeline: request fields, sampler names, responses.

Clients such as the `webuiapi` package send every field A1111 knows. Fields sd honours are used; fields
it cannot honour are accepted while they hold A1111's default (restore_faces false, tiling false, no
scripts ...) and refused with one 422 that names them otherwise; unknown
fields are ignored, as A1111 does. Fields a request leaves out take sd's defaults for the loaded model.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
from typing import Annotated, Any, Optional

from PIL import Image
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from ldm.files import metadata
from ldm.errors import SDError
from ldm.limits import SERVER_LIMIT_NAMES

# A1111's older aliases of its sampler names (what GET /samplers lists beside sd's own name).
SAMPLER_ALIASES = {"Euler": ["k_euler"], "Euler a": ["k_euler_a"], "Heun": ["k_heun"], "DPM2": ["k_dpm_2"],
                   "DPM++ 2M": ["k_dpmpp_2m"], "DPM++ 2M SDE": ["k_dpmpp_2m_sde"]}


SD_VERSION = "sd 0.1.0"  # the `version` A1111 clients read from info (A1111 writes its git tag there)


# How the API names the fields of ldm.request.Request in its 422 texts: by A1111's field names.
API_NAMES = {"scale": "cfg_scale", "sampler": "sampler_name", "schedule": "scheduler",
             "clip_skip": "override_settings.CLIP_stop_at_last_layers", "strength": "denoising_strength",
             "decode": "override_settings.sd_vae_decode_method", "encode": "override_settings.sd_vae_encode_method",
             "tome": "override_settings.token_merging_ratio",
             "hires": "enable_hr", "hires.scale": "hr_scale", "hires.width": "hr_resize_x", "hires.height": "hr_resize_y",
             "hires.upscaler": "hr_upscaler", "hires.steps": "hr_second_pass_steps", "hires.strength": "denoising_strength",
             "hires.sampler": "hr_sampler_name", "hires.schedule": "hr_scheduler", "hires.prompt": "hr_prompt",
             "hires.negative_prompt": "hr_negative_prompt", "hires.tome": "override_settings.token_merging_ratio_hr",
             **SERVER_LIMIT_NAMES}


class RequestError(ValueError):
    """A request sd cannot run as asked: the server answers 422 with this one line."""


class NotFound(LookupError):
    """A request names something the server does not have (a job id): a 404 with this one line."""


class ServerFileError(RuntimeError):
    """A file the server was given (not the client) is wrong: the server answers 500 with this one line,
    which names the file, and keeps serving the requests that do not need it."""


MAX_JSON_DEPTH = 64  # request bodies are flat objects; option values hold a list or two at most


def text_problem(value: Any, where: str = "the body", depth: int = 0) -> Optional[str]:
    """What keeps the JSON value `value` from being text sd can hold and echo back, or None: a string (key or
    value) with a lone surrogate ("\\ud800" is valid JSON but no Unicode text: no reply holding it could be
    encoded), or nesting deeper than MAX_JSON_DEPTH. `where` names the value (fields by their JSON path)."""
    if depth > MAX_JSON_DEPTH:
        return f"{where} is nested more than {MAX_JSON_DEPTH} levels deep"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{where} holds a lone surrogate U+{ord(value[exc.start]):04X}, which is not text"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        inner = f"{key}" if depth == 0 else f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]"
        problem = (text_problem(key, f"a key of {where}", depth + 1) if isinstance(key, str) else None) or \
            text_problem(item, inner, depth + 1)
        if problem:
            return problem
    return None


def _text_only(value: Any) -> Any:
    problem = text_problem(value)
    if problem:
        raise PydanticCustomError("text", problem)
    return value


# A JSON object body of a route that takes any keys (options, png-info, extras): held to text_problem, so that
# whatever a reply echoes of it can be sent.
JSONObject = Annotated[dict, AfterValidator(_text_only)]


class Txt2ImgRequest(BaseModel):
    """The fields of A1111's txt2img that sd reads (others are ignored)."""
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _text(cls, values: Any) -> Any:
        return _text_only(values)
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = None  # older clients' name for sampler_name
    scheduler: Optional[str] = None
    batch_size: int = 1
    n_iter: int = 1
    steps: Optional[int] = None
    cfg_scale: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    eta: Optional[float] = None
    send_images: bool = True
    save_images: bool = False
    # Accepted at their A1111 defaults only (UNSUPPORTED below).
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    enable_hr: Optional[bool] = False
    # the hires fix's fields (ldm.hires), read when enable_hr is true; A1111's defaults
    denoising_strength: Optional[float] = None  # txt2img: the second pass's (A1111: 0.75); img2img: its own
    hr_scale: Optional[float] = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: Optional[int] = 0
    hr_resize_x: Optional[int] = 0
    hr_resize_y: Optional[int] = 0
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: Optional[str] = ""
    hr_negative_prompt: Optional[str] = ""
    hr_checkpoint_name: Optional[str] = None
    hr_additional_modules: Optional[list] = None
    firstphase_width: Optional[int] = 0
    firstphase_height: Optional[int] = 0
    subseed_strength: Optional[float] = 0.0
    seed_resize_from_h: Optional[int] = -1
    seed_resize_from_w: Optional[int] = -1
    s_churn: Optional[float] = 0.0
    s_tmin: Optional[float] = 0.0
    s_tmax: Optional[float] = None
    s_noise: Optional[float] = 1.0
    styles: Optional[list] = None
    override_settings: Optional[dict] = None
    override_settings_restore_afterwards: bool = True
    script_name: Optional[str] = None
    script_args: Optional[list] = None
    alwayson_scripts: Optional[dict] = None
    force_task_id: Optional[str] = Field(None, max_length=128)  # the job's id, for POST /internal/progress


class TaskProgressRequest(BaseModel):
    """A1111's POST /internal/progress: one job by its id (its page's way; sd's replicas make it the way)."""
    id_task: Optional[str] = Field(None, max_length=128)
    id_live_preview: int = -1
    live_preview: bool = True


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's img2img: init image, strength, and for inpainting a mask and its options."""
    init_images: list[str] = []
    denoising_strength: float = 0.75
    resize_mode: int = 0
    mask: Optional[str] = None
    mask_blur: Optional[int] = None  # A1111: 4 when left out
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


HANDLED_SCRIPTS = ("controlnet", "ControlNet")  # alwayson_scripts sd runs (ldm.serve.controlnet)


def _disabled_scripts(value: Optional[dict]) -> bool:
    """alwayson_scripts that run nothing: none, or each with no args or a first arg of false (what clients
    send to keep an extension off). An entry that is not an object, or args that are not a list, is a
    RequestError of its own."""
    for name, entry in (value or {}).items():
        if entry is None or name in HANDLED_SCRIPTS:
            continue
        if not isinstance(entry, dict):
            raise RequestError(f"alwayson_scripts.{name} must be an object such as {{\"args\": []}}")
        args = entry.get("args")
        if args is not None and not isinstance(args, list):
            raise RequestError(f"alwayson_scripts.{name}.args must be a list")
        if args and args[0] is not False:
            return False
    return True


# field -> test that the value is A1111's default (what sd does anyway)
UNSUPPORTED = {
    "restore_faces": lambda v: not v, "tiling": lambda v: not v,
    "firstphase_width": lambda v: not v, "firstphase_height": lambda v: not v,
    "subseed_strength": lambda v: not v, "seed_resize_from_h": lambda v: v in (None, 0, -1),
    "seed_resize_from_w": lambda v: v in (None, 0, -1), "s_churn": lambda v: not v, "s_tmin": lambda v: not v,
    "s_tmax": lambda v: v in (None, 0) or v == math.inf, "s_noise": lambda v: v in (None, 1, 1.0),
    "script_name": lambda v: not v, "script_args": lambda v: not v,
    "alwayson_scripts": _disabled_scripts,
}


def refuse_unsupported(request: Txt2ImgRequest) -> None:
    """RequestError naming every field set to something sd cannot do (override_settings: ldm.serve.options)."""
    asked = [name for name, is_default in UNSUPPORTED.items() if not is_default(getattr(request, name))]
    if asked:
        raise RequestError(f"sd cannot honour {', '.join(asked)}; leave them at AUTOMATIC1111's defaults")


def sampler_of(request: Txt2ImgRequest) -> tuple[str, Optional[str]]:
    """(our sampler, schedule) for the request's sampler and scheduler names, A1111's or sd's."""
    from ldm.models.diffusion.sampler_names import sampler_of_name

    try:
        return sampler_of_name(request.sampler_name or request.sampler_index or "Euler a", request.scheduler)
    except SDError as exc:
        raise RequestError(str(exc)) from None


def settings_of(request: Txt2ImgRequest) -> dict:
    """The pipeline settings of a request (None where the model's default applies)."""
    from ldm.models.diffusion.sampler_names import SAMPLER_INFO

    sampler, schedule = sampler_of(request)
    # A1111 applies eta to the samplers that take one and ignores it for the others (clients send 1.0).
    eta = request.eta if SAMPLER_INFO[sampler].eta is not None else None
    return dict(negative_prompt=request.negative_prompt, seed=request.seed, steps=request.steps,
                scale=request.cfg_scale, sampler=sampler, schedule=schedule, eta=eta,
                batch_size=request.batch_size, n_iter=request.n_iter, names=API_NAMES)


SAME = ("", "Use same sampler", "Use same scheduler", "Use same checkpoint", "Use same choices")


def hires_of(request: Txt2ImgRequest, tome_hr: float = 0.0, keep_first: bool = False, x4_models: Optional[dict] = None):
    """The hires fix a request's enable_hr asks for (None when off); RequestError for what sd cannot run.
    `x4_models`: the upscaler names of the models folder's x4 checkpoints (/upscalers lists them)."""
    from ldm.hires import UPSCALERS, X4, Hires
    from ldm.models.diffusion.sampler_names import sampler_of_name

    if not request.enable_hr:
        return None
    if isinstance(request, Img2ImgRequest):
        raise RequestError("enable_hr is txt2img's: A1111's img2img has no hires fix")
    if request.hr_checkpoint_name not in (None, *SAME):
        raise RequestError(f"hr_checkpoint_name {request.hr_checkpoint_name!r}: sd runs the second pass on the same "
                           "checkpoint (send \"Use same checkpoint\")")
    modules = request.hr_additional_modules
    if modules and any(m not in SAME for m in modules):
        raise RequestError("hr_additional_modules: sd has no modules to change for the second pass")
    upscaler = request.hr_upscaler or "Latent"
    upscaler = "Lanczos" if upscaler == "None" else upscaler  # A1111's "None" resizes with Lanczos
    x4 = (x4_models or {}).get(upscaler)
    if x4 is None and upscaler not in UPSCALERS or upscaler == X4:
        names = [*(name for name in UPSCALERS if name != X4), *(x4_models or {})]
        raise RequestError(f"hr_upscaler: could not find upscaler named {upscaler!r}; sd's hires fix has "
                           f"{', '.join(names)}")
    sampler = schedule = None
    try:
        if request.hr_sampler_name not in (None, *SAME):
            sampler, schedule = sampler_of_name(request.hr_sampler_name, None)
        if request.hr_scheduler not in (None, *SAME, "Automatic"):
            schedule = sampler_of_name(sampler or "euler", request.hr_scheduler)[1]
    except SDError as exc:
        raise RequestError(str(exc)) from None
    upscaler = X4 if x4 is not None else upscaler
    return Hires(scale=2.0 if request.hr_scale is None else request.hr_scale, width=request.hr_resize_x or 0,
                 height=request.hr_resize_y or 0, upscaler=upscaler, steps=request.hr_second_pass_steps or 0,
                 strength=0.75 if request.denoising_strength is None else request.denoising_strength,
                 sampler=sampler, schedule=schedule, prompt=request.hr_prompt or "",
                 negative_prompt=request.hr_negative_prompt or "", tome=tome_hr or None, keep_first=keep_first,
                 x4=None if x4 is None else str(x4))


def decode_base64(data: Any, what: str) -> bytes:
    """The bytes of a base64 string (a data: URL too); RequestError for anything else."""
    if not isinstance(data, str) or not data:
        raise RequestError(f"{what} must be a base64 image string")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64") from None


def decode_image(data: Any, what: str, max_pixels: int, mode: str = "RGB") -> Image.Image:
    """A base64 picture (a data: URL too) decoded as the commands decode a file (ldm.files.imageio's
    decode_picture: EXIF orientation, 16-bit and float pictures, transparency, `mode`); RequestError for
    anything else. The size is read from the header and checked before anything is decoded."""
    from ldm.files.imageio import decode_picture

    raw = decode_base64(data, what)
    try:
        return decode_picture(io.BytesIO(raw), what, mode, max_pixels, bound="the server's max_pixels")
    except SDError as exc:
        raise RequestError(str(exc)) from None


def encode_png(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def info_of(request: Txt2ImgRequest, images: list, model_hash: str, model_name: str,
            interrupted: bool = False, ignored: tuple = (), styles: tuple = ()) -> str:
    """A1111's `info`: a JSON string with the seeds and one "parameters" text per image."""
    first = images[0] if images else None
    info = metadata.Infotext.read(first.parameters) if first else metadata.Infotext()
    width, height = info.size() or (request.width, request.height)
    return json.dumps({
        "prompt": request.prompt, "all_prompts": [request.prompt] * len(images),
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * len(images),
        "seed": first.seed if first else request.seed, "all_seeds": [image.seed for image in images],
        "subseed": -1, "all_subseeds": [-1] * len(images), "subseed_strength": 0,
        "width": width, "height": height,
        "sampler_name": info.fields.get("Sampler", request.sampler_name or request.sampler_index or "Euler a"),
        "cfg_scale": info.number("CFG scale", float, request.cfg_scale),
        "steps": info.number("Steps", int, request.steps),
        "batch_size": request.batch_size, "restore_faces": False, "sd_model_name": model_name,
        "sd_model_hash": model_hash, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": getattr(request, "denoising_strength", None), "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": [image.parameters for image in images], "styles": list(styles),
        "sd_vae_name": None, "sd_vae_hash": None, "version": SD_VERSION, "ignored_settings": list(ignored),
        "job_timestamp": "", "clip_skip": 1, "is_using_inpainting_conditioning": False, "interrupted": interrupted,
    })
