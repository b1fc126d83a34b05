"""Which config fits a checkpoint, read from its keys, and which model a run uses.

With `--ckpt` and no `--config`, the checkpoint chooses: its keys tell the family (inpainting: a 9-channel
UNet; depth: depth_model.*; the x4 upscaler: low_scale_model.*; unCLIP: embedder.*, H or L by the
width of the UNet's class embedding; SD 1.x and SDXL are refused with one line), and a 4-channel txt2img
UNet is probed once to tell eps from v prediction (`probe_parameterization`). The native size follows
(512 for eps, 768 for v). One line says what was chosen. An explicit `--config` always wins; when the
probe disagrees with it, one warning says the images will be noise and which config fits.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from ldm.errors import SDError, note, warning
from ldm.loading.keys import CONFIG_NAMES, DESCRIPTIONS, checkpoint_kind
from ldm.loading.families import DEMO_CKPT, DEMO_CONFIG, DEMO_SIZE, NATIVE_SIZE, NEEDS_CHECKPOINT, SD_CONFIGS, demo_model_missing

def reference_config(kind: str) -> Path:
    """The reference config of a family, from ./configs/stable-diffusion first (as the reference looks it
    up), else this checkout's."""
    local = Path("configs") / "stable-diffusion" / CONFIG_NAMES[kind]
    return local if local.is_file() else SD_CONFIGS / CONFIG_NAMES[kind]


# -- eps or v ---------------------------------------------------------------------------------------
PROBE_LEVEL = 0.5  # the constant latent AUTOMATIC1111's probe feeds
PROBE_SIDE = 8  # latent cells per side: the probe's cost is a small fraction of one step at any image size


@torch.no_grad()
def probe_parameterization(model) -> tuple[str, float]:
    """("eps" or "v", slope) for a txt2img model, from one UNet call on a batch of two.

    AUTOMATIC1111's rule: at the last timestep, x_t is almost all noise, so a model that predicts eps
    returns about its input, while one that predicts v = sqrt(a) eps - sqrt(1 - a) x0 returns about
    minus its estimate of x0, which hardly depends on x_t there (A1111 compares the output's mean with a
    constant input's). We feed two constant latents, +0.5 and -0.5, and take the slope
    (out(+) - out(-)) / 1 of the output means: it is about 1 / sqrt(1 - a) ~ 1 for eps and about
    sqrt(a) (1 - var(x0)) ~ 0 for v whatever the data's mean, so 0.5 splits them.
    """
    from ldm.runtime.policy import autocast_context

    device = next(model.parameters()).device
    x = torch.full((2, model.latent_channels, PROBE_SIDE, PROBE_SIDE), PROBE_LEVEL, device=device)
    x[1] = -PROBE_LEVEL
    t = torch.full((2,), float(len(model.alphas_cumprod) - 1), device=device)
    # A model from ldm.loading.build with RuntimeOptions runs under its precision's context; a bare one as it is.
    context = autocast_context(model) if getattr(model, "runtime", None) is not None else contextlib.nullcontext()
    with torch.inference_mode(), context:
        cond = model.make_cond(model.get_learned_conditioning(["", ""]).to(device))
        out = model.apply_model(x, t, cond).float()  # (2, C, 8, 8)
    slope = float(out[0].mean() - out[1].mean()) / (2 * PROBE_LEVEL)
    return ("eps" if slope > 0.5 else "v"), slope


# -- which model a run uses -------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelChoice:
    """The config and checkpoint a run uses, and what they are."""
    config: Path
    ckpt: Path
    demo: bool
    kind: str  # eps, v, inpaint, depth, x4, unclip-h, unclip-l, demo, or "given" (an explicit config not probed)
    native_size: int  # the default side of txt2img images

    @property
    def detected(self) -> bool:
        return self.kind != "given"


def choose_files(config: Optional[Path], ckpt: Optional[Path], task: str = "txt2img",
                 quiet: bool = False) -> tuple[Optional[Path], Path, bool]:
    """(config or None to detect, checkpoint, demo) for a run; without a checkpoint, the demo model. A config
    file beside the checkpoint with its name (model.safetensors + model.yaml, A1111's convention) is its config
    unless one is given."""
    if ckpt is not None:
        beside = Path(ckpt).with_suffix(".yaml")
        if config is None and beside.is_file():
            config = beside
        if _same_file(ckpt, DEMO_CKPT) and (config is None or _same_file(config, DEMO_CONFIG)):
            return DEMO_CONFIG, DEMO_CKPT, True  # the demo model named by its path: its keys are SD 2.x's, smaller
        return (Path(config) if config is not None else None), Path(ckpt), False
    if config is not None:
        raise SDError(f"--config {config} was given without --ckpt: pass the checkpoint it describes "
                      "(or neither, for the built-in demo model)")
    if task in NEEDS_CHECKPOINT:
        raise SDError(f"no --ckpt given: this command needs {NEEDS_CHECKPOINT[task]} "
                      "(the built-in demo model is text-to-image only)")
    missing = demo_model_missing()
    if missing:
        raise SDError(missing)
    if not quiet:
        note("no --ckpt given, using the built-in demo model (256x256 coloured shapes, docs/demo-model.md); "
             "pass --ckpt for Stable Diffusion 2.x weights")
    return DEMO_CONFIG, DEMO_CKPT, True


def _same_file(a: str | Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


def load_chosen(config: Optional[Path], ckpt: Path, demo: bool, opts, quiet: bool = False):
    """(model, ModelChoice): read the checkpoint once, choose its config (unless given), load it, and
    probe a txt2img UNet for eps vs v (a detected config follows the probe, a given one gets a warning)."""
    from ldm.loading.checkpoint import read_state_dict
    from ldm.loading.build import load_model
    from ldm.util import load_config

    if not Path(ckpt).exists():
        raise SDError(f"checkpoint not found: {ckpt} (see checkpoints/README.md)")
    if config is not None and not Path(config).is_file():
        raise SDError(f"config file not found: {config}")
    state_dict = read_state_dict(ckpt)
    kind = "demo" if demo else checkpoint_kind(state_dict) if config is None else "given"
    chosen = Path(config) if config is not None else reference_config("eps" if kind == "txt2img" else kind)
    settled = {"kind": kind, "config": chosen}

    def probe(model) -> None:  # before the fast path, which would otherwise specialise to the probe's shapes
        if kind in ("txt2img", "given") and getattr(model, "build_conditioning", None) is None:
            settled["kind"], settled["config"] = _settle_parameterization(model, kind, chosen, quiet)

    model = load_model(chosen, ckpt, opts, state_dict=state_dict, loaded_config=load_config(chosen), inspect=probe)
    del state_dict
    kind, chosen = settled["kind"], settled["config"]
    if kind not in ("demo", "given", "eps", "v") and not quiet:
        note(f"config: {chosen} (from the checkpoint's keys: {DESCRIPTIONS[kind]})")
    # The native side of images sized by --H/--W: the demo's, the probed kind's, or a given txt2img (or unCLIP,
    # which is 2.1-768-v) config's parameterization; image tasks take their input's size, so 512 only fills the field.
    txt2img = kind == "given" and (getattr(model, "build_conditioning", None) is None or hasattr(model, "embedder"))
    size = DEMO_SIZE if demo else NATIVE_SIZE.get(model.parameterization if txt2img else kind, 512)
    return model, ModelChoice(chosen, Path(ckpt), demo, kind, size)


def _settle_parameterization(model, kind: str, chosen: Path, quiet: bool) -> tuple[str, Path]:
    """Probe a 4-channel txt2img model; a detected config follows the probe, a given one is warned about."""
    start = time.perf_counter()
    found, slope = probe_parameterization(model)
    cost = time.perf_counter() - start
    if kind == "txt2img":
        model.parameterization = found  # v2-inference-v.yaml differs from v2-inference.yaml only in this
        chosen = reference_config(found)
        if not quiet:
            note(f"config: {chosen} (from the checkpoint: a 4-channel UNet predicting {found}, "
                 f"probe slope {slope:.2f} in {cost:.2f} s; --config overrides)")
        return found, chosen
    if found != model.parameterization:
        warning(f"--config {chosen} says the model predicts {model.parameterization}, but the checkpoint's UNet "
                f"predicts {found} (probe slope {slope:.2f}): the images will be noise; use "
                f"{reference_config(found)} or a config with parameterization \"{found}\"")
    return "given", chosen
