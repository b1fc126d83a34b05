"""What a checkpoint is, from its keys and shapes alone (nothing is loaded): the family and the reference
config that fits it. ldm.loading.detect chooses the config from this; ldm.loading.checkpoint names it
when keys do not fit."""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from ldm.errors import SDError

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
CONFIG_NAMES = {
    "eps": "v2-inference.yaml", "v": "v2-inference-v.yaml", "inpaint": "v2-inpainting-inference.yaml",
    "depth": "v2-midas-inference.yaml", "x4": "x4-upscaling.yaml",
    "unclip-h": "v2-1-stable-unclip-h-inference.yaml", "unclip-l": "v2-1-stable-unclip-l-inference.yaml",
}
DESCRIPTIONS = {
    "txt2img": "a 4-channel txt2img checkpoint", "eps": "a txt2img checkpoint predicting eps (512-base)",
    "v": "a txt2img checkpoint predicting v (768-v)", "inpaint": "an inpainting checkpoint (9-channel UNet)",
    "depth": "a depth checkpoint (depth_model.*)", "x4": "the x4 upscaler (low_scale_model.*)",
    "unclip-h": "a Stable unCLIP-H checkpoint (embedder.*, OpenCLIP ViT-H image embeddings)",
    "unclip-l": "a Stable unCLIP-L checkpoint (embedder.*, CLIP ViT-L image embeddings)",
}
# unCLIP's UNet class embedding takes the image embedding and its noise-level embedding side by side.
UNCLIP_WIDTHS = {2048: "unclip-h", 1536: "unclip-l"}


def checkpoint_kind(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The family of a checkpoint from its keys and shapes: txt2img (eps or v: see the probe), inpaint,
    depth, x4, unclip-h or unclip-l; SDError naming what it is when sd cannot run it."""
    keys = state_dict.keys()
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        raise SDError("this is a Stable Diffusion 1.x checkpoint (CLIP ViT-L text encoder, cond_stage_model.transformer.*); "
                      "sd runs SD 2.x checkpoints")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise SDError("this is an SDXL checkpoint (conditioner.embedders.*); sd runs SD 2.x checkpoints")
    first = state_dict.get(UNET_IN)
    if first is None or len(first.shape) != 4:
        raise SDError(f"this is not a Stable Diffusion checkpoint: it has no UNet ({UNET_IN} is missing)")
    if any(k.startswith("embedder.") for k in keys):
        label = state_dict.get("model.diffusion_model.label_emb.0.0.weight")
        width = int(label.shape[1]) if label is not None and len(label.shape) == 2 else None
        if width not in UNCLIP_WIDTHS:
            raise SDError(f"an unCLIP checkpoint whose class embedding is {width} wide: neither unCLIP-H (2048) nor -L (1536)")
        return UNCLIP_WIDTHS[width]
    if any(k.startswith("depth_model.") for k in keys):
        return "depth"
    if any(k.startswith("low_scale_model.") for k in keys):
        return "x4"
    channels = int(first.shape[1])
    by_channels = {9: "inpaint", 7: "x4", 5: "depth", 4: "txt2img"}  # latent 4 + mask 1 + masked image 4, ...
    if channels in by_channels:
        return by_channels[channels]
    raise SDError(f"a UNet with {channels} input channels matches no SD 2.x config; pass --config")


def describe_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """What a checkpoint is and which reference config fits it, for error messages; None if unknown."""
    try:
        kind = checkpoint_kind(state_dict)
    except SDError as exc:
        return str(exc).removeprefix("this is ")
    if kind == "txt2img":
        return ("a txt2img checkpoint (configs/stable-diffusion/v2-inference-v.yaml for 768-v models, "
                "v2-inference.yaml for 512-base models)")
    return f"{DESCRIPTIONS[kind]} (configs/stable-diffusion/{CONFIG_NAMES[kind]})"
