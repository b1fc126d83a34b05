"""Kakao Brain's Karlo v1 alpha diffusion prior: a prompt -> a CLIP ViT-L image embedding, so that unCLIP-L
(which takes image embeddings) makes images from text: the reference demo's "Use KARLO prior".

The prior is a causal transformer over [77 text tokens, text embedding, timestep, noisy image embedding,
a learned query] that predicts the clean (standardised) embedding x0; it is sampled as Karlo samples it:
25 of its 1000 squaredcos_cap_v2 steps (improved DDPM's even spacing), ancestral DDPM with the posterior
variance, classifier-free guidance 4.0 on x0 against the empty prompt, x0 clamped to [-10, 10], and the
result mapped back with the CLIP statistics (ViT-L-14_stats.th). Its text features come from OpenAI's CLIP
ViT-L/14 (Karlo's ViT-L-14.pt): the projected end-of-text feature and the 77-token ln_final sequence.

Module and attribute names are the checkpoint's (prior-ckpt-step=01000000-of-01000000.ckpt: `model.*`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import SDError, note
from ldm.modules.diffusionmodules.noise_schedule import make_beta_schedule
from ldm.modules.diffusionmodules.util import timestep_embedding

# configs/karlo/prior_1B_vit_l.yaml and Karlo's "default" sampling settings (its template.py).
PRIOR_CONFIG = {"text_ctx": 77, "xf_width": 2048, "xf_layers": 20, "xf_heads": 32, "xf_final_ln": True, "clip_dim": 768}
PRIOR_STEPS, PRIOR_SCALE, X0_CLAMP, TRAIN_STEPS = 25, 4.0, 10.0, 1000
EXTRA_TOKENS = 4  # text embedding, timestep, noisy image embedding, the prediction query


class LayerNorm(nn.LayerNorm):
    """Karlo's LayerNorm: computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class PriorAttention(nn.Module):
    """Self-attention with Karlo's fused c_qkv, whose outputs are grouped per head as [q | k | v]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape  # (B, 81, W)
        qkv = self.c_qkv(x).view(b, n, self.heads, 3, width // self.heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4)  # (B, H, 81, W/H) each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None].to(q.dtype))  # (B, H, 81, W/H)
        return self.c_proj(out.transpose(1, 2).reshape(b, n, width))


class PriorBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = PriorAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.c_fc = nn.Linear(width, 4 * width)
        self.mlp.gelu = nn.GELU()
        self.mlp.c_proj = nn.Linear(4 * width, width)
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class PriorTransformer(nn.Module):
    """(noisy embedding x_t (B, D), timestep (B,), text embedding (B, D), text tokens' features (B, 77, D),
    token mask (B, 77)) -> predicted clean embedding (B, D), all in standardised CLIP space."""

    def __init__(self, text_ctx: int, xf_width: int, xf_layers: int, xf_heads: int, xf_final_ln: bool, clip_dim: int):
        super().__init__()
        self.text_ctx, self.xf_width, self.clip_dim = text_ctx, xf_width, clip_dim
        self.time_embed = nn.Sequential(nn.Linear(xf_width, xf_width), nn.SiLU(), nn.Linear(xf_width, xf_width))
        self.text_enc_proj = nn.Linear(clip_dim, xf_width)
        self.text_emb_proj = nn.Linear(clip_dim, xf_width)
        self.clip_img_proj = nn.Linear(clip_dim, xf_width)
        self.out_proj = nn.Linear(xf_width, clip_dim)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(PriorBlock(xf_width, xf_heads) for _ in range(xf_layers))
        self.final_ln = LayerNorm(xf_width) if xf_final_ln else None
        self.positional_embedding = nn.Parameter(torch.randn(1, text_ctx + EXTRA_TOKENS, xf_width) * 0.01)
        self.prd_emb = nn.Parameter(torch.randn(1, 1, xf_width) * 0.01)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, text_enc: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        n = self.text_ctx + EXTRA_TOKENS
        tokens = torch.cat([
            self.text_enc_proj(text_enc),  # (B, 77, W)
            self.text_emb_proj(text_emb)[:, None],
            self.time_embed(timestep_embedding(t, self.xf_width).to(x.dtype))[:, None],
            self.clip_img_proj(x)[:, None],
            self.prd_emb.to(x.dtype).expand(b, -1, -1),
        ], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 81, W)
        # padding tokens are never attended to; token i sees tokens 0..i (causal)
        keep = F.pad(mask.bool(), (0, EXTRA_TOKENS), value=True)  # (B, 81)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        allowed = keep[:, None, :] & causal[None]  # (B, 81, 81)
        additive = torch.zeros(allowed.shape, dtype=torch.float32, device=x.device).masked_fill(~allowed, float("-inf"))
        for block in self.transformer.resblocks:
            tokens = block(tokens, additive)
        if self.final_ln is not None:
            tokens = self.final_ln(tokens)
        return self.out_proj(tokens[:, -1])  # the query token, (B, D)


def spaced_steps(steps: int, total: int = TRAIN_STEPS) -> list[int]:
    """Improved DDPM's evenly spaced subset of 0..total-1 (Karlo's space_timesteps(total, "steps"))."""
    if not 1 <= steps <= total:
        raise SDError(f"--prior-steps must be in 1..{total} (got {steps})")
    stride = (total - 1) / (steps - 1) if steps > 1 else 1
    return sorted({round(i * stride) for i in range(steps)})


class KarloPrior(nn.Module):
    """The prior (`model`, the checkpoint's keys) with its sampler; the CLIP statistics are set by use_stats."""

    def __init__(self, config: Optional[dict] = None):
        super().__init__()
        self.model = PriorTransformer(**(config or PRIOR_CONFIG))
        dim = self.model.clip_dim
        self.register_buffer("clip_mean", torch.zeros(1, dim, device="cpu"), persistent=False)
        self.register_buffer("clip_std", torch.ones(1, dim, device="cpu"), persistent=False)
        self.alphas_cumprod = np.cumprod(1.0 - make_beta_schedule("squaredcos_cap_v2", TRAIN_STEPS))  # float64

    def use_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.clip_mean = mean.reshape(1, -1).float().to(self.clip_mean.device)
        self.clip_std = std.reshape(1, -1).float().to(self.clip_std.device)

    @torch.no_grad()
    def sample(self, text_emb: torch.Tensor, text_enc: torch.Tensor, mask: torch.Tensor,
               generators: list[torch.Generator], steps: int = PRIOR_STEPS, scale: float = PRIOR_SCALE) -> torch.Tensor:
        """Image embeddings (B, D) for prompts given as [B conditional rows; B unconditional (empty prompt) rows]
        of text_emb (2B, D), text_enc (2B, 77, D), mask (2B, 77); image k's noise from generators[k]."""
        b, dim = len(generators), self.model.clip_dim
        device = text_emb.device
        schedule = _spaced_schedule(self.alphas_cumprod, spaced_steps(steps))

        def draw() -> torch.Tensor:
            return torch.stack([torch.randn(dim, generator=g) for g in generators]).to(device)  # (B, D)

        x = draw()
        for i in reversed(range(len(schedule.timesteps))):
            t = torch.full((2 * b,), schedule.timesteps[i], device=device, dtype=torch.long)
            out = self.model(torch.cat([x, x]).to(text_emb.dtype), t, text_emb, text_enc, mask).float()
            cond, uncond = out.chunk(2)
            x0 = (uncond + scale * (cond - uncond)).clamp(-X0_CLAMP, X0_CLAMP)  # guidance on x0, as Karlo does
            x = schedule.coef_x0[i] * x0 + schedule.coef_xt[i] * x
            if i > 0:  # the last step adds no noise
                x = x + schedule.sigma[i] * draw()
        return x * self.clip_std + self.clip_mean  # (B, D), CLIP's own scale


@dataclass
class _SpacedSchedule:
    timesteps: list[int]
    coef_x0: list[float]  # posterior mean = coef_x0 * x0 + coef_xt * x_t
    coef_xt: list[float]
    sigma: list[float]  # sqrt of the posterior variance (Karlo's FIXED_SMALL)


def _spaced_schedule(alphas_cumprod: np.ndarray, timesteps: list[int]) -> _SpacedSchedule:
    ac = alphas_cumprod[timesteps]  # float64
    ac_prev = np.append(1.0, ac[:-1])
    betas = 1.0 - ac / ac_prev
    variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    return _SpacedSchedule(list(timesteps), list(betas * np.sqrt(ac_prev) / (1.0 - ac)),
                           list((1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)), list(np.sqrt(variance)))


# -- loading ---------------------------------------------------------------------------------------------

def prior_config_of(state_dict: dict) -> dict:
    """The prior's numbers read from its checkpoint's shapes (heads of 64 channels, as Karlo's 32 x 64)."""
    pos = state_dict.get("model.positional_embedding")
    out = state_dict.get("model.out_proj.weight")
    if pos is None or out is None or len(pos.shape) != 3 or len(out.shape) != 2:
        raise SDError("this is not a Karlo prior checkpoint (model.positional_embedding / model.out_proj missing)")
    layers = len({k.split(".")[3] for k in state_dict if k.startswith("model.transformer.resblocks.")})
    width = int(pos.shape[2])
    return {"text_ctx": int(pos.shape[1]) - EXTRA_TOKENS, "xf_width": width, "xf_layers": layers,
            "xf_heads": max(1, width // 64), "xf_final_ln": "model.final_ln.weight" in state_dict,
            "clip_dim": int(out.shape[0])}


def clip_config_of(state_dict: dict) -> dict:
    """CLIPModel's arguments for an OpenAI CLIP ViT state dict (Karlo's ViT-L-14.pt), from its shapes."""
    need = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "ln_final.weight", "positional_embedding")
    if any(k not in state_dict for k in need):
        raise SDError(f"this is not an OpenAI CLIP ViT file ({', '.join(k for k in need if k not in state_dict)} missing)")
    conv = state_dict["visual.conv1.weight"]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = int(state_dict["ln_final.weight"].shape[0])

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})

    vision = {"image_size": int(conv.shape[-1]) * grid, "layers": count("visual.transformer.resblocks."),
              "width": int(conv.shape[0]), "head_width": 64, "patch_size": int(conv.shape[-1]),
              "embed_dim": int(state_dict["visual.proj"].shape[1])}
    text = {"context_length": int(state_dict["positional_embedding"].shape[0]),
            "vocab_size": int(state_dict["token_embedding.weight"].shape[0]), "width": text_width,
            "heads": max(1, text_width // 64), "layers": count("transformer.resblocks.")}
    return {"arch": "openai-clip", "quick_gelu": True, "vision_cfg": vision, "text_cfg": text}


def read_clip_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of Karlo's ViT-L-14.pt (OpenAI's TorchScript archive, read with torch.jit.load, which runs no
    Python) or of a plain state dict (.pt zip / .safetensors); OpenAI's three scalar entries dropped."""
    import zipfile

    from ldm.loading.checkpoint import read_state_dict

    if not Path(path).is_file():
        raise SDError(f"CLIP text encoder file not found: {path}")
    scripted = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            scripted = any(name.endswith("constants.pkl") for name in z.namelist())
    if not scripted:
        state_dict = read_state_dict(path)
    else:
        try:
            with warnings.catch_warnings():  # torch.jit.load is deprecated, but OpenAI ships this format
                warnings.simplefilter("ignore", FutureWarning)
                state_dict = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as exc:  # a damaged archive can fail in any way
            raise SDError(f"cannot read {path} as a TorchScript CLIP model: {str(exc).splitlines()[0][:200]}") from None
    return {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}


def _load_strict(model: nn.Module, state_dict: dict, path: Path, what: str) -> nn.Module:
    from ldm.loading.checkpoint import assign_weights

    return assign_weights(model, state_dict, str(path), what).float()


class TextToImageEmbedding:
    """Prompts -> CLIP image embeddings (B, D): the CLIP text tower, then the prior."""

    def __init__(self, prior: KarloPrior, text_model, ckpt: Path):
        self.prior, self.text_model, self.ckpt = prior, text_model, Path(ckpt)

    def to(self, device) -> "TextToImageEmbedding":
        self.prior.to(device)
        self.text_model.to(device)
        return self

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids (N, 77), mask (N, 77), True on the start, text and end tokens), as Karlo pads them."""
        from ldm.text.tokenizer import get_tokenizer

        ctx = self.prior.model.text_ctx
        tokenizer = get_tokenizer(ctx)
        ids = tokenizer(prompts)  # (N, 77): start, BPE, end, zeros; the end token kept when cut
        lengths = [min(ctx, len(tokenizer.encode(p)) + 2) for p in prompts]
        mask = torch.arange(ctx)[None] < torch.tensor(lengths)[:, None]
        return ids, mask

    @torch.no_grad()
    def __call__(self, prompts: list[str], generators: list[torch.Generator], steps: int = PRIOR_STEPS,
                 scale: float = PRIOR_SCALE) -> torch.Tensor:
        ids, mask = self.tokens(list(prompts) + [""] * len(prompts))  # conditional rows, then the empty prompt's
        device = self.prior.clip_mean.device
        text_emb, text_enc = self.text_model.encode_text(ids.to(device))  # (2B, D), (2B, 77, D)
        return self.prior.sample(text_emb.float(), text_enc.float(), mask.to(device), generators, steps, scale)


def load_prior(ckpt: str | Path, stats: tuple[torch.Tensor, torch.Tensor], clip: Optional[str | Path] = None,
               text_model=None) -> TextToImageEmbedding:
    """The prior from its checkpoint (strict, offline), with its CLIP text tower from `clip` (ViT-L-14.pt), else
    ViT-L-14.pt beside the prior, else `text_model` (unCLIP-L's own embedder: the same frozen OpenAI ViT-L/14)."""
    from ldm.loading.checkpoint import build_on_meta, read_state_dict
    from ldm.util import OmegaConf

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise SDError(f"Karlo prior checkpoint not found: {ckpt}")
    state_dict = read_state_dict(ckpt)
    config = prior_config_of(state_dict)
    prior = build_on_meta(OmegaConf.create({"target": "ldm.karlo.KarloPrior", "params": {"config": config}}))
    prior = _load_strict(prior, state_dict, ckpt, "the Karlo prior (configs/karlo/prior_1B_vit_l.yaml)")
    prior.use_stats(*stats)
    del state_dict
    found = Path(clip) if clip is not None else ckpt.parent / "ViT-L-14.pt"
    if clip is not None or found.is_file():
        clip_sd = read_clip_file(found)
        text_model = build_on_meta(OmegaConf.create({"target": "ldm.modules.encoders.image_embedders.CLIPModel",
                                                      "params": clip_config_of(clip_sd)}))
        text_model = _load_strict(text_model, clip_sd, found, "OpenAI CLIP (ViT-L-14.pt)")
    elif text_model is None:
        raise SDError(f"the Karlo prior needs OpenAI's CLIP ViT-L/14 text encoder: ViT-L-14.pt beside {ckpt} or --prior-clip FILE")
    else:
        note("Karlo prior: text features from the unCLIP-L checkpoint's own CLIP ViT-L/14 (no ViT-L-14.pt beside the "
             "prior; the same frozen OpenAI weights)")
    widths = {int(text_model.text_projection.shape[1]), int(text_model.ln_final.weight.shape[0])}
    if widths != {prior.model.clip_dim}:
        raise SDError(f"the CLIP text encoder gives {'/'.join(map(str, sorted(widths)))}-wide features; the prior "
                      f"takes {prior.model.clip_dim}")
    return TextToImageEmbedding(prior.eval(), text_model.eval(), ckpt)
