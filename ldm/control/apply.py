"""ControlNet files, hints and the residuals a sampling step adds to the UNet.

A ControlNet steers the UNet it was trained beside, so its config is that UNet's (cldm_v21.yaml repeats
v2's UNet parameters and adds hint_channels): `load_controlnet` builds one from the loaded model's UNet
config on the meta device and assigns the file's tensors strictly, named as in the file. Files hold the
ControlNet alone (thibaud/controlnet-sd21's) or a whole ControlLDM checkpoint whose ControlNet keys carry
`control_model.`; either works, any other file is one line.

`Controller` is what LatentDiffusion.apply_model consults during a run (`controlled`): for every unit active
at the current step (start <= step / steps <= end, as the extension counts) it runs the ControlNet on the
step's latent, hint and text, weights the residuals by the unit's weight and control mode, and hands their
sum to the UNet through the conditioning ("c_control"). Modes, as the sd-webui-controlnet extension defines
them: balanced (every residual times the weight, on both halves of guidance), prompt (residual k of n
times weight * 0.825 ** (n - 1 - k), the deep ones strongest), control (prompt's weights, and the
unconditional half of guidance gets no control, so guidance pushes towards the hint).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ldm.control.units import MAX_UNITS, SOFT_DECAY, ControlUnit
from ldm.errors import SDError

PREFIX = "control_model."
MAX_FILE_BYTES = 16 * 2 ** 30  # a full ControlLDM .ckpt in float32 is about 7 GB
# UNet parameters a ControlNet shares (cldm's ControlNet takes the UNet's, without the output and label ones)
SHARED = ("image_size", "model_channels", "num_res_blocks", "attention_resolutions", "dropout", "channel_mult",
          "conv_resample", "dims", "num_heads", "num_head_channels", "use_scale_shift_norm", "resblock_updown",
          "use_spatial_transformer", "transformer_depth", "context_dim", "legacy", "disable_self_attentions",
          "num_attention_blocks", "disable_middle_self_attn", "use_linear_in_transformer")


def read_controlnet_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ControlNet tensors of a file, keys without `control_model.`; SDError for a file that holds none."""
    from ldm.loading.checkpoint import read_state_dict

    state = read_state_dict(path)
    if any(key.startswith(PREFIX) for key in state):
        state = {key[len(PREFIX):]: value for key, value in state.items() if key.startswith(PREFIX)}
    if "input_hint_block.0.weight" not in state:
        from ldm.loading.keys import describe_checkpoint

        looks = describe_checkpoint(state)
        raise SDError(f"{path} holds no ControlNet (no input_hint_block keys)"
                      + (f"; it looks like {looks}" if looks else ""))
    return state


def controlnet_config(unet_params: dict, hint_channels: int, latent_channels: int) -> dict:
    """The ControlNet config for a UNet's parameters: the UNet's own, the latent's channels in (an
    inpainting or depth UNet's extra input channels are not the ControlNet's), hint_channels."""
    params = {key: unet_params[key] for key in SHARED if key in unet_params}
    if unet_params.get("num_classes") is not None:
        raise SDError("ControlNet steers UNets without a class label; this model's UNet has one (num_classes)")
    params.update(in_channels=latent_channels, hint_channels=hint_channels)
    return {"target": "ldm.modules.diffusionmodules.controlnet.ControlNet", "params": params}


def load_controlnet(path: str | Path, unet_params: dict, latent_channels: int, dtype: torch.dtype,
                    device: torch.device) -> torch.nn.Module:
    """A ControlNet file strictly loaded for the model whose UNet has `unet_params`; one line if it does not fit."""
    from omegaconf import OmegaConf

    from ldm.loading.checkpoint import assign_weights, build_on_meta

    state = read_controlnet_state(path)
    hint_channels = int(state["input_hint_block.0.weight"].shape[1])
    config = OmegaConf.create(controlnet_config(unet_params, hint_channels, latent_channels))
    try:
        net = assign_weights(build_on_meta(config), state, str(path), "a ControlNet for this model's UNet")
    except SDError as exc:
        raise SDError(f"ControlNet {Path(path).name} does not fit this model: {exc}") from None
    return net.to(device=device, dtype=dtype)


def fit_hint(hint: np.ndarray, width: int, height: int, resize: str) -> np.ndarray:
    """The hint picture at (height, width): "just" stretches it, "crop" scales it to cover and cuts the
    centre, "fill" scales it to fit and pads with the median colour of its border."""
    from ldm.control.preprocess import resized, scaled

    h, w = hint.shape[:2]
    if resize == "just":
        return resized(hint, (width, height))
    if resize == "crop":
        out = scaled(hint, max(width / w, height / h))
        top, left = (out.shape[0] - height) // 2, (out.shape[1] - width) // 2
        return np.ascontiguousarray(out[top:top + height, left:left + width])
    out = scaled(hint, min(width / w, height / h))
    border = np.concatenate([hint[0], hint[-1], hint[:, 0], hint[:, -1]])
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = np.median(border, axis=0).astype(np.uint8)
    top, left = (height - out.shape[0]) // 2, (width - out.shape[1]) // 2
    canvas[top:top + out.shape[0], left:left + out.shape[1]] = out[:height, :width]
    return canvas


def hint_tensor(picture: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1], as ControlNets were trained."""
    return torch.from_numpy(np.array(picture, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0


def residual_scales(unit: ControlUnit, n: int) -> list[float]:
    if unit.mode == "balanced":
        return [unit.weight] * n
    return [unit.weight * SOFT_DECAY ** (n - 1 - k) for k in range(n)]


class Controller:
    """The residuals of a run's ControlNet units for LatentDiffusion.apply_model (see the module docstring).

    units: (ControlNet, unit, hint (1, 3, 8h, 8w) in [0, 1]); steps: the sampling steps this batch runs;
    batch: its images; guided: whether calls carry the [uncond; cond] halves of guidance. `step` is advanced
    by the run's step hook (`on_step`).
    """

    def __init__(self, units: list[tuple[torch.nn.Module, ControlUnit, torch.Tensor]], steps: int, batch: int,
                 guided: bool):
        if len(units) > MAX_UNITS:
            raise SDError(f"at most {MAX_UNITS} ControlNet units, not {len(units)}")
        self.units, self.steps, self.batch, self.guided = units, max(1, steps), batch, guided
        self.step = 0

    def on_step(self, info: dict) -> None:
        self.step = info["i"] + 1

    def active(self, unit: ControlUnit) -> bool:
        fraction = self.step / self.steps
        return unit.start <= fraction <= unit.end

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> dict:
        total: Optional[list[torch.Tensor]] = None
        rows = x_t.shape[0]
        for net, unit, hint in self.units:
            if not self.active(unit):
                continue
            x = x_t[:, :net.in_channels]  # an inpainting UNet's extra channels are not the ControlNet's
            residuals = net(x, hint.to(x.device).expand(rows, -1, -1, -1), t, cond["c_crossattn"])
            scales = residual_scales(unit, len(residuals))
            mark = None
            if unit.mode == "control" and self.guided and rows == 2 * self.batch:
                mark = torch.cat([torch.zeros(self.batch), torch.ones(self.batch)]).to(x).view(-1, 1, 1, 1)
            weighted = [r * s if mark is None else r * s * mark.to(r.dtype) for r, s in zip(residuals, scales)]
            total = weighted if total is None else [a + b for a, b in zip(total, weighted)]
        return cond if total is None else {**cond, "c_control": total}


@contextlib.contextmanager
def controlled(model, controller: Optional[Controller]):
    """LatentDiffusion.apply_model consults `controller` within the block (none: nothing changes)."""
    if controller is None:
        yield
        return
    model.control = controller
    try:
        yield
    finally:
        model.control = None


def prepared_hints(units: list[ControlUnit], midas: Optional[Callable] = None) -> list[np.ndarray]:
    """Each unit's hint picture, its preprocessor run once per request (resized per batch by fit_hint)."""
    from ldm.control.preprocess import detect

    return [detect(u.module, u.image, u.processor_res, u.threshold_a, u.threshold_b, midas) for u in units]
