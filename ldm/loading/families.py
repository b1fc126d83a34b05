"""Model families and their defaults: which settings a task uses when the caller names none.

Every front end (the commands, the Python API, the server) takes its defaults from here, so that
`sd txt2img` and `Pipeline.txt2img` make the same image from the same few arguments. The Stable
Diffusion values are the reference scripts' own, per task; the built-in demo model has its own.

The demo model (configs/demo/, checkpoints/demo/, docs/demo-model.md) is a tiny text-to-image model the
project trained itself on procedural shapes, so that `sd txt2img --prompt ...` produces an image on a
machine that holds no Stable Diffusion weights. It is chosen only when no checkpoint is given at all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ldm.errors import SDError

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = ROOT / "configs" / "demo" / "demo-inference.yaml"
DEMO_CKPT = ROOT / "checkpoints" / "demo" / "demo.safetensors"
DEMO_SIZE = 256  # the demo model's native image side (it was trained on 256x256 scenes)
# The guidance scale the demo model was evaluated with (docs/demo-model.md); the reference's 9.0 over-drives
# it (mottled shapes, 2 of 9 quick-start images read with a dark foreground against 0 of 9 at 5.0).
DEMO_SCALE = 5.0

SD_CONFIGS = ROOT / "configs" / "stable-diffusion"
# Native image sides: SD 2.x base (eps) models were trained at 512, the v models at 768.
NATIVE_SIZE = {"eps": 512, "v": 768, "unclip-h": 768, "unclip-l": 768}

TASKS = ("txt2img", "img2img", "depth2img", "inpaint", "upscale", "variations")

# The settings every task takes, with the reference scripts' defaults (scripts/txt2img.py, img2img.py and
# the gradio/streamlit demos for inpainting, depth and the upscaler). n_samples is the batch size, n_iter
# how often it runs; eta None means "the sampler's own" (0 for the deterministic ones).
_SD = {"steps": 50, "scale": 9.0, "n_samples": 1, "n_iter": 1, "eta": None, "sampler": "ddim", "schedule": None}
SD_DEFAULTS = {
    "txt2img": {**_SD, "n_samples": 3, "n_iter": 3},
    "img2img": {**_SD, "n_samples": 2, "strength": 0.8},
    "depth2img": {**_SD, "strength": 0.9},
    # The inpainting demo samples DDIM with eta 1.0; samplers that take no eta keep none.
    "inpaint": {**_SD, "steps": 45, "scale": 10.0, "n_samples": 4, "eta": 1.0},
    "upscale": {**_SD, "steps": 75, "scale": 10.0, "noise_level": 20},
    # Stable unCLIP's demo (scripts/streamlit/stableunclip.py): 20 DDIM steps, guidance 10, 2 rows of 2.
    "variations": {**_SD, "steps": 20, "scale": 10.0, "n_samples": 2, "n_iter": 2, "noise_level": 0},
}
# The demo model's evaluation settings (DDIM, 20 steps, guidance 5), so that the README's first command
# finishes in about 10 s on 2 plain CPU cores; its txt2img makes four small images at once.
DEMO_DEFAULTS = {"steps": 20, "scale": DEMO_SCALE}
DEMO_TASK_DEFAULTS = {"txt2img": {"n_samples": 4, "n_iter": 1}}

# What a task needs that the demo model (text-to-image only) cannot give, said when no checkpoint is given.
NEEDS_CHECKPOINT = {
    "depth2img": "a depth checkpoint: --ckpt 512-depth-ema.ckpt",
    "upscale": "the x4 upscaler: --ckpt x4-upscaler-ema.ckpt",
    "variations": "a Stable unCLIP checkpoint: --ckpt sd21-unclip-h.ckpt (or sd21-unclip-l.ckpt)",
}


# Few-step models (SD-Turbo) as their makers run them: one Euler ancestral step from the top timestep,
# no guidance (diffusers: num_inference_steps=1, guidance_scale=0.0; scale 1 is sd's "no guidance": one UNet
# pass a step). img2img takes 2 trailing steps, so that its default strength keeps the step at t = 499
# (diffusers: steps x strength >= 1).
TURBO_DEFAULTS = {"steps": 1, "scale": 1.0, "sampler": "euler_a", "schedule": "trailing"}
TURBO_TASK_DEFAULTS = {"img2img": {"steps": 2}}
PRESETS = ("auto", "turbo", "sd")  # auto: turbo when the checkpoint's file name says turbo, else sd


def preset_of(ckpt, asked: Optional[str] = None) -> str:
    """The defaults a checkpoint runs with: `asked` ("turbo" or "sd"), else by its file name as other tools
    decide (nothing in SD-Turbo's keys tells it from SD 2.1-base): "turbo" when the name says turbo."""
    if asked not in (None, "auto"):
        if asked not in PRESETS:
            raise SDError(f"unknown preset '{asked}' (one of {', '.join(PRESETS)})")
        return asked
    return "turbo" if ckpt is not None and "turbo" in Path(ckpt).name.lower() else "sd"


def task_defaults(task: str, demo: bool, preset: str = "sd") -> dict:
    """The default settings of `task` with the demo model (demo=True) or a Stable Diffusion checkpoint run
    with `preset`'s defaults (preset_of)."""
    if task not in SD_DEFAULTS:
        raise SDError(f"unknown task '{task}' (one of {', '.join(TASKS)})")
    if demo:
        return {**SD_DEFAULTS[task], **DEMO_DEFAULTS, **DEMO_TASK_DEFAULTS.get(task, {})}
    if preset == "turbo":
        return {**SD_DEFAULTS[task], **TURBO_DEFAULTS, **TURBO_TASK_DEFAULTS.get(task, {})}
    return dict(SD_DEFAULTS[task])


def resolve_eta(task: str, demo: bool, sampler: str, eta: Optional[float]) -> float:
    """The eta a run uses (and records), resolved here for every front end: the one asked for, 0 included;
    else the task's (inpainting's 1.0) for samplers that take one; else the sampler's own (ddim 0.0,
    euler_a and dpmpp_2m_sde 1.0); 0.0 for the deterministic samplers, which take none."""
    from ldm.models.diffusion.sampler_names import check_sampler

    if eta is not None:
        return float(eta)
    own = check_sampler(sampler).eta
    if own is None:
        return 0.0
    task_eta = task_defaults(task, demo)["eta"]
    return float(own if task_eta is None else task_eta)


def demo_model_missing() -> Optional[str]:
    """Why the demo model cannot be used (its files are missing), or None."""
    if DEMO_CKPT.is_file() and DEMO_CONFIG.is_file():
        return None
    return (f"no --ckpt given and the built-in demo model is missing ({DEMO_CKPT}): pass --ckpt FILE "
            "(.ckpt or .safetensors; see checkpoints/README.md)")
