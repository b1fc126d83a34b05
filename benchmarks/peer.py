"""The peer: diffusers' UNet2DConditionModel / AutoencoderKL / transformers' CLIPTextModel holding the
same weights as an `sd` checkpoint, converted by diffusers' own single-file converters.

Models are built on the meta device and the converted tensors assigned, so building a full-size peer
costs no random init (the peer is timed on its forward passes and on its own from_pretrained load,
not on this conversion).
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

UNET_PREFIX = "model.diffusion_model."


def _original_config(config_path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)


def _cast(state_dict: dict, dtype: torch.dtype) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}


def diffusers_unet(config_path: Path, checkpoint: dict, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    unet_sd = {k: v for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
    config = create_unet_diffusers_config_from_ldm(_original_config(config_path), unet_sd)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet.load_state_dict(_cast(convert_ldm_unet_checkpoint(unet_sd, config), dtype), strict=True, assign=True)
    return unet.eval().requires_grad_(False)


def diffusers_vae(config_path: Path, checkpoint: dict, dtype: torch.dtype):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    vae_sd = {k: v for k, v in checkpoint.items() if k.startswith("first_stage_model.")}
    original = _original_config(config_path)
    config = create_vae_diffusers_config_from_ldm(original, vae_sd)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    vae.load_state_dict(_cast(convert_ldm_vae_checkpoint(vae_sd, config), dtype), strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def transformers_text_encoder(checkpoint: dict, dtype: torch.dtype):
    """SD 2.x's OpenCLIP ViT-H text tower as transformers' CLIPTextModel (config written here: no hub)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                            layer_norm_eps=1e-5, projection_dim=1024)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    text_sd = {k: v for k, v in checkpoint.items() if k.startswith("cond_stage_model.")}
    converted = convert_open_clip_checkpoint(model, text_sd)
    if not hasattr(model, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    # diffusers drops the last layer for SD 2 (penultimate features), as the config above does.
    names = dict(model.state_dict())
    converted = {k: v for k, v in converted.items() if k in names}
    missing = [k for k in names if k not in converted]
    model.load_state_dict(_cast(converted, dtype), strict=False, assign=True)
    for name in missing:  # non-weight buffers (position_ids)
        if "position_ids" in name:
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            owner.register_buffer(name.rsplit(".", 1)[-1], torch.arange(77)[None], persistent=False)
    return model.eval().requires_grad_(False)


def save_pretrained_peer(config_path: Path, ckpt: Path, out: Path) -> Path:
    """The peer's own on-disk format (diffusers folders, safetensors), written once, for its load time."""
    from ldm.loading.checkpoint import read_state_dict

    if (out / "done").exists():
        return out
    checkpoint = read_state_dict(ckpt)
    diffusers_unet(config_path, checkpoint, torch.float32).save_pretrained(out / "unet")
    diffusers_vae(config_path, checkpoint, torch.float32).save_pretrained(out / "vae")
    transformers_text_encoder(checkpoint, torch.float32).save_pretrained(out / "text_encoder")
    (out / "done").write_text("ok\n")
    return out


def load_pretrained_peer(folder: Path, dtype: torch.dtype):
    """diffusers' usual load of the three models (from_pretrained with torch_dtype)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
    text = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype)
    return unet, vae, text
