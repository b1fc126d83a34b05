"""Stable unCLIP's image side: CLIP image towers and the noise augmentation of their embeddings.

The reference builds these from open_clip / OpenAI's `clip` package, downloading the pretrained weights at
start-up, and then loads the checkpoint's `embedder.model.*` over them. The unCLIP checkpoints already hold
every weight, so here the towers are plain modules with the packages' attribute names (the checkpoint keys),
built on meta and filled from the checkpoint; nothing is fetched. Architecture numbers come from the JSON
files open_clip ships (read, not imported), as for the text encoder.

- FrozenOpenCLIPImageEmbedder (unCLIP-H): OpenCLIP ViT-H/14, GELU, 1024-wide embeddings. The reference
  deletes the text transformer but keeps the text tower's other weights, so the module has them too.
- ClipImageEmbedder (unCLIP-L): OpenAI CLIP ViT-L/14, QuickGELU, 768-wide embeddings, both towers (the
  same module loads Karlo's ViT-L-14.pt, whose text tower feeds the Karlo prior).
- CLIPEmbeddingNoiseAugmentation: q_sample of the (standardised) embedding at a noise level 0..999 of a
  squaredcos_cap_v2 schedule, and the level's sinusoidal embedding, which the UNet sees beside it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ldm.errors import SDError
from ldm.modules.diffusionmodules.upscaling import ImageConcatWithNoiseAugmentation
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.modules import OpenCLIPTextModel, TextTransformer, QuickGELU, _shipped_model_config, text_tower_config

# CLIP's pixel statistics (the reference's `mean` / `std` buffers, not in any checkpoint).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_DEFAULTS = {"image_size": 224, "layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16}
# OpenAI's names for its CLIP models -> open_clip's architecture files (the same networks).
OPENAI_NAMES = {"ViT-L/14": "ViT-L-14", "ViT-B/16": "ViT-B-16", "ViT-B/32": "ViT-B-32"}


def vision_tower_config(arch: str, vision_cfg: Optional[dict] = None) -> dict:
    """open_clip's vision numbers for `arch` (its shipped JSON) overridden by `vision_cfg` (tests' tiny towers)."""
    shipped = _shipped_model_config(arch) if ":" not in arch else None
    if shipped is None and not vision_cfg:
        raise SDError(f"unknown CLIP architecture '{arch}' for the image embedder (e.g. ViT-H-14, ViT-L/14); "
                      "nothing is downloaded")
    cfg = dict(VISION_DEFAULTS)
    given = {k: v for k, v in (vision_cfg or {}).items() if k != "embed_dim"}
    for source in ((shipped or {}).get("vision_cfg", {}), given):
        unknown = sorted(set(source) - set(VISION_DEFAULTS))
        if unknown:
            raise SDError(f"CLIP architecture '{arch}': vision option(s) {', '.join(unknown)} are not implemented")
        cfg.update(source)
    cfg["embed_dim"] = (vision_cfg or {}).get("embed_dim") or (shipped or {}).get("embed_dim")
    if not cfg["embed_dim"]:
        raise SDError(f"CLIP architecture '{arch}': give embed_dim")
    if cfg["width"] % cfg["head_width"]:
        raise SDError(f"CLIP vision width {cfg['width']} is not a multiple of head_width {cfg['head_width']}")
    return cfg


class VisionTransformer(nn.Module):
    """CLIP's ViT image tower (open_clip's and OpenAI's attribute names): patches -> class token -> proj."""

    def __init__(self, cfg: dict, act_layer):
        super().__init__()
        width, patch, side = cfg["width"], cfg["patch_size"], cfg["image_size"]
        if side % patch:
            raise SDError(f"CLIP image size {side} is not a multiple of its patch size {patch}")
        self.image_size = side
        grid = side // patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = TextTransformer(width, cfg["layers"], width // cfg["head_width"], cfg["mlp_ratio"],
                                           act_layer, 1e-5)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, cfg["embed_dim"]) * width ** -0.5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels (B, 3, 224, 224) -> image embeddings (B, embed_dim)."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # (B, W, 16, 16)
        x = x.flatten(2).transpose(1, 2)  # (B, 256, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 257, W)
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x, causal=False)
        return self.ln_post(x[:, 0]) @ self.proj  # the class token, (B, embed_dim)


class CLIPModel(OpenCLIPTextModel):
    """A whole CLIP model (text tower from OpenCLIPTextModel, `visual` image tower) under the packages' keys.
    text_transformer=False drops the text transformer as the reference's OpenCLIP image embedder does."""

    def __init__(self, arch: str, quick_gelu: bool, text_transformer: bool = True, vision_cfg: Optional[dict] = None,
                 text_cfg: Optional[dict] = None):
        cfg = text_tower_config(arch, text_cfg)
        cfg["quick_gelu"] = quick_gelu
        vision = vision_tower_config(arch, vision_cfg)
        cfg["embed_dim"] = vision["embed_dim"]
        super().__init__(cfg)
        if not text_transformer:
            del self.transformer
        self.visual = VisionTransformer(vision, QuickGELU if quick_gelu else nn.GELU)

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, 77) -> (projected end-of-text feature (B, embed_dim), ln_final sequence (B, 77, W)),
        what Karlo's prior reads. The end-of-text token has the largest id, hence argmax."""
        tokens = tokens.to(self.token_embedding.weight.device)
        seq = self(tokens)  # (B, 77, W)
        pooled = seq[torch.arange(seq.shape[0], device=seq.device), tokens.argmax(dim=-1)] @ self.text_projection
        return pooled, seq


class _ImageEmbedder(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> CLIP image embeddings (B, D), the reference's preprocessing."""
    model: CLIPModel

    def _setup(self, antialias: bool, ucg_rate: float) -> None:
        if ucg_rate:
            raise SDError("image embedder ucg_rate > 0 drops embeddings at random, a training setting: use 0")
        self.antialias = antialias
        self.register_buffer("mean", torch.tensor(CLIP_MEAN, device="cpu"), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD, device="cpu"), persistent=False)
        self.requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.proj.shape[1])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The reference's: kornia's bicubic resize to 224x224 (align_corners, Gaussian antialiasing when
        shrinking), [-1, 1] -> [0, 1], then CLIP's mean/std."""
        from kornia.geometry.transform import resize  # only image embedding needs kornia (1 s to import)

        side = self.model.visual.image_size
        x = resize(images.float(), (side, side), interpolation="bicubic", align_corners=True, antialias=self.antialias)
        x = (x + 1.0) / 2.0
        return (x - self.mean.float()[:, None, None]) / self.std.float()[:, None, None]  # (B, 3, 224, 224)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise SDError(f"images for the CLIP image embedder have shape {tuple(images.shape)}; expected (B, 3, H, W)")
        return self.model.visual(self.preprocess(images)).float()  # (B, D)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)


class FrozenOpenCLIPImageEmbedder(_ImageEmbedder):
    """unCLIP-H's image embedder: OpenCLIP ViT-H/14 (`version` named the weights the reference downloads;
    the checkpoint holds them, so it is accepted and nothing is fetched)."""

    def __init__(self, arch: str = "ViT-H-14", version: str = "laion2b_s32b_b79k", device: str = "cuda",
                 max_length: int = 77, freeze: bool = True, layer: str = "pooled", antialias: bool = True,
                 ucg_rate: float = 0.0, vision_cfg: Optional[dict] = None, text_cfg: Optional[dict] = None):
        super().__init__()
        if layer != "pooled":
            raise SDError(f"FrozenOpenCLIPImageEmbedder layer '{layer}' is not implemented (the reference has only 'pooled')")
        self.model = CLIPModel(arch, quick_gelu=False, text_transformer=False, vision_cfg=vision_cfg, text_cfg=text_cfg)
        self._setup(antialias, ucg_rate)


class ClipImageEmbedder(_ImageEmbedder):
    """unCLIP-L's image embedder: OpenAI CLIP (`model` "ViT-L/14"), text tower included as in its checkpoint."""

    def __init__(self, model: str = "ViT-L/14", jit: bool = False, device: str = "cuda", antialias: bool = True,
                 ucg_rate: float = 0.0, vision_cfg: Optional[dict] = None, text_cfg: Optional[dict] = None):
        super().__init__()
        if jit:
            raise SDError("ClipImageEmbedder jit=True loads OpenAI's TorchScript model, which sd does not use: set jit: false")
        arch = OPENAI_NAMES.get(model, model)
        self.model = CLIPModel(arch, quick_gelu=True, vision_cfg=vision_cfg, text_cfg=text_cfg)
        self._setup(antialias, ucg_rate)


# -- noise augmentation of the embedding ---------------------------------------------------------------

def read_clip_stats(path: str | Path, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of CLIP image embeddings from a torch-saved pair of `width` floats (ViT-L-14_stats.th)."""
    from ldm.loading.checkpoint import read_torch_file

    pair = read_torch_file(Path(path), "CLIP statistics")
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
        raise SDError(f"{path} is not a CLIP statistics file: expected a saved pair (mean, std) of tensors")
    mean, std = (t.detach().float().reshape(-1) for t in pair)
    if mean.numel() != width or std.numel() != width:
        raise SDError(f"{path} holds statistics of {mean.numel()} / {std.numel()} values; this model's embeddings "
                      f"are {width} wide")
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise SDError(f"{path}: the CLIP statistics must be finite with a positive std")
    return mean, std


class CLIPEmbeddingNoiseAugmentation(ImageConcatWithNoiseAugmentation):
    """Embedding e (B, D) at level l -> (unscale(q_sample(scale(e), l)) (B, D), sinusoidal(l) (B, D)).

    scale() standardises with the data statistics, which no checkpoint holds (non-persistent in the
    reference too): `clip_stats_path` when that file exists, else mean 0 / std 1 with `stats_source` None.
    """

    def __init__(self, *args, clip_stats_path: Optional[str] = None, timestep_dim: int = 256, **kwargs):
        super().__init__(*args, **kwargs)
        self.timestep_dim = int(timestep_dim)
        self.clip_stats_path = clip_stats_path
        self.stats_source: Optional[Path] = None
        self.register_buffer("data_mean", torch.zeros(1, self.timestep_dim, device="cpu"), persistent=False)
        self.register_buffer("data_std", torch.ones(1, self.timestep_dim, device="cpu"), persistent=False)
        if clip_stats_path is not None and Path(clip_stats_path).is_file():
            self.use_stats(clip_stats_path)

    def use_stats(self, path: str | Path) -> None:
        """Standardise with the statistics in `path` (ViT-L-14_stats.th)."""
        mean, std = read_clip_stats(path, self.timestep_dim)
        self.data_mean = mean[None].to(self.data_mean.device)
        self.data_std = std[None].to(self.data_std.device)
        self.stats_source = Path(path)

    def forward(self, x: torch.Tensor, noise_level=None, noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.data_mean.to(x), self.data_std.to(x)
        z, level = super().forward((x - mean) / std, noise_level, noise=noise, generator=generator)
        return z * std + mean, timestep_embedding(level, self.timestep_dim).to(x)  # (B, D), (B, D)
