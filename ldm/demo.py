"""Which model a generating command uses: --ckpt/--config (or SD_CKPT/SD_CONFIG), else the built-in demo.

The demo model (configs/demo/, checkpoints/demo/, docs/demo-model.md) is a tiny text-to-image model the
project trained itself on procedural shapes, so that `sd txt2img --prompt ...` produces an image on a
machine that holds no Stable Diffusion weights. It is chosen only when no checkpoint is given at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ldm.errors import SDError, note

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo" / "demo-inference.yaml"
DEMO_CKPT = ROOT / "checkpoints" / "demo" / "demo.safetensors"
DEMO_SIZE = 256  # the demo model's native image side (it was trained on 256x256 scenes)
# The guidance scale the demo model was evaluated with (docs/demo-model.md); the reference's 9.0 over-drives
# it (mottled shapes, 2 of 9 quick-start images read with a dark foreground against 0 of 9 at 5.0).
DEMO_SCALE = 5.0
# What the generating commands use with the demo model unless told otherwise: its evaluation settings (DDIM,
# 20 steps, guidance 5), so that the README's first command finishes in about 10 s on 2 plain CPU cores.
DEMO_DEFAULTS = {"steps": 20, "scale": DEMO_SCALE}
SD_SIZE = 512  # the reference's default --H/--W
# The reference's default config, looked up in the working directory first (as the reference does) and
# then in this checkout, so that `sd` also works from another folder.
DEFAULT_CONFIG = Path("configs") / "stable-diffusion" / "v2-inference.yaml"


@dataclass(frozen=True)
class ModelChoice:
    config: Path
    ckpt: Path
    demo: bool

    @property
    def native_size(self) -> int:
        return DEMO_SIZE if self.demo else SD_SIZE


def choose_model(config: Optional[Path], ckpt: Optional[Path], *, command_config: Optional[Path] = None,
                 command_needs: str = "", quiet: bool = False) -> ModelChoice:
    """The config and checkpoint a run uses; without both, the demo model (announced in one line).

    `command_config` is a command's own default config (inpaint's, depth2img's, the upscaler's), used
    with --ckpt when --config is not given. A command that needs its own kind of model (depth, x4) cannot
    use the demo model and says what it needs (`command_needs`) instead.
    """
    if ckpt is not None:
        if config is None:
            default = Path(command_config) if command_config is not None else DEFAULT_CONFIG
            config = default if default.is_file() or default.is_absolute() else ROOT / default
        return ModelChoice(Path(config), Path(ckpt), demo=False)
    if config is not None:
        raise SDError(f"--config {config} was given without --ckpt: pass the checkpoint it describes "
                      "(or neither, for the built-in demo model)")
    if command_needs:
        raise SDError(f"no --ckpt given: this command needs {command_needs} "
                      "(the built-in demo model is text-to-image only)")
    if not DEMO_CKPT.is_file() or not DEMO_CONFIG.is_file():
        raise SDError(f"no --ckpt given and the built-in demo model is missing ({DEMO_CKPT}): pass --ckpt FILE "
                      "(.ckpt or .safetensors; see checkpoints/README.md)")
    if not quiet:
        note("no --ckpt given, using the built-in demo model (256x256 coloured shapes, docs/demo-model.md); "
             "pass --ckpt for Stable Diffusion 2.x weights")
    return ModelChoice(DEMO_CONFIG, DEMO_CKPT, demo=True)
