"""The text encoder of SD 2.x: OpenCLIP's text tower, written here as a plain module.

The reference builds a whole open_clip CLIP model (downloading ~4 GB of weights at start-up), deletes
its visual tower and keeps the text tower. The released SD 2.x checkpoints already hold every text
weight under cond_stage_model.model.*, so we build only the text tower, with open_clip's attribute
names, and let the checkpoint fill it. open_clip is used for two offline files only, read from its
package directory without importing it (importing it pulls in timm and torchvision, seconds): the
architecture numbers (model_configs/<arch>.json) and the BPE vocabulary, which our own tokenizer
(ldm.text.tokenizer) reads.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import SDError
from ldm.text.tokenizer import get_tokenizer, open_clip_dir

# open_clip's CLIPTextCfg dataclass defaults (open_clip.model.CLIPTextCfg), kept here so that building
# the text encoder need not import open_clip; tests/test_tokenizer.py checks them against open_clip.
CLIP_TEXT_CFG_DEFAULTS = {
    "context_length": 77, "vocab_size": 49408, "hf_tokenizer_name": None, "tokenizer_mode": None,
    "tokenizer_kwargs": None, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0, "ls_init_value": None,
    "embed_cls": False, "pad_id": 0, "eos_id": 2, "no_causal_mask": False, "final_ln_after_pool": False,
    "pool_type": "argmax", "proj_bias": False, "proj_type": "linear", "output_tokens": False,
    "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
    "hf_model_name": None, "hf_model_pretrained": True, "hf_proj_type": "mlp", "hf_pooler_type": "mean_pooler",
}

# Text-config keys that change the tower's structure in ways this module does not build. An
# architecture that sets any of them to a non-default value is refused rather than built wrongly.
_UNSUPPORTED_TEXT_KEYS = (
    "hf_model_name", "hf_tokenizer_name", "ls_init_value", "embed_cls", "block_type", "qk_norm",
    "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
)
# open_clip keeps these two at the top level of a model config; text_cfg may give them too.
_TOP_LEVEL_KEYS = ("embed_dim", "quick_gelu")


def text_tower_config(arch: str, text_cfg: dict | None = None) -> dict:
    """open_clip's text config for `arch` (read from the JSON files it ships) overridden by `text_cfg`.

    Returns every CLIPTextCfg field plus embed_dim and quick_gelu, as open_clip's get_model_config and
    CLIPTextCfg would give. Unknown architectures are fine as long as text_cfg gives the numbers (the
    tests' "tiny" tower does).
    """
    if ":" in arch:  # "hf-hub:org/repo" would be fetched from the network
        raise SDError(f"cond_stage_config arch '{arch}' must be a built-in open_clip architecture name such as "
                      "ViT-H-14 (nothing is downloaded)")
    model_cfg = _shipped_model_config(arch)  # None for names open_clip does not ship
    if model_cfg is None and not text_cfg:
        raise SDError(f"unknown open_clip architecture '{arch}': use e.g. ViT-H-14, or give the numbers in "
                      "cond_stage_config.params.text_cfg")
    defaults = CLIP_TEXT_CFG_DEFAULTS
    cfg = dict(defaults, embed_dim=None, quick_gelu=False)
    if model_cfg is not None:
        shipped = model_cfg.get("text_cfg", {})
        unknown = sorted(set(shipped) - set(defaults))
        if unknown:  # a newer open_clip option: it may change the tower's structure, so do not guess
            raise SDError(f"open_clip architecture '{arch}' uses text_cfg key(s) {', '.join(unknown)}, which this "
                          "text encoder does not know")
        cfg.update(shipped)
        cfg.update({k: model_cfg[k] for k in _TOP_LEVEL_KEYS if k in model_cfg})
    for key, value in (text_cfg or {}).items():
        if key not in cfg:
            raise SDError(f"cond_stage_config text_cfg has unknown key '{key}'")
        cfg[key] = value
    for key in _UNSUPPORTED_TEXT_KEYS:
        if cfg[key] not in (defaults[key], "default"):
            raise SDError(f"open_clip architecture '{arch}' uses text_cfg {key}={cfg[key]!r}, which this text "
                          "encoder does not implement")
    if cfg["embed_dim"] is None:  # only text_projection's shape depends on it
        cfg["embed_dim"] = cfg["width"]
    return cfg


def _shipped_model_config(arch: str) -> dict | None:
    """open_clip's model_configs/<arch>.json, or None when it ships no such architecture.

    As open_clip's registry: only exact file stems of the directory, and only configs that have
    embed_dim, vision_cfg and text_cfg.
    """
    config_dir = open_clip_dir() / "model_configs"
    try:
        shipped = {p.stem for p in config_dir.glob("*.json")}
    except OSError:
        shipped = set()
    if not shipped:
        raise SDError(f"open_clip's architecture configs are missing from {config_dir}; reinstall open_clip_torch")
    if arch not in shipped:
        return None
    path = config_dir / f"{arch}.json"
    try:
        model_cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SDError(f"cannot read open_clip's architecture config {path} ({e}); reinstall open_clip_torch") from e
    if not all(key in model_cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        return None
    return model_cfg


class TextSelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (in_proj_*, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise SDError(f"text tower width {width} is not divisible by its {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, width = x.shape  # (B, 77, W)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, 77, 3W)
        q, k, v = qkv.view(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, 77, W/H) each
        # is_causal: token i attends to tokens 0..i, open_clip's -inf-above-the-diagonal mask.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, 77, W/H)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, width))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI-trained CLIP towers (open_clip's quick_gelu)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act_layer, ln_eps: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = TextSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", act_layer()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act_layer, ln_eps: float):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act_layer, ln_eps) for _ in range(layers))


class OpenCLIPTextModel(nn.Module):
    """The text half of an open_clip CLIP model; state-dict keys equal open_clip's text keys.

    text_projection and logit_scale are not used for SD's per-token features; they exist so that
    checkpoints, which contain them, load strictly.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        width, context_length = cfg["width"], cfg["context_length"]
        act_layer = QuickGELU if cfg["quick_gelu"] else functools.partial(nn.GELU, **(cfg["act_kwargs"] or {}))
        ln_eps = (cfg["norm_kwargs"] or {}).get("eps", 1e-5)
        self.context_length = context_length
        self.vocab_size = cfg["vocab_size"]
        self.causal = not cfg["no_causal_mask"]

        self.token_embedding = nn.Embedding(cfg["vocab_size"], width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = TextTransformer(width, cfg["layers"], cfg["heads"], cfg["mlp_ratio"], act_layer, ln_eps)
        self.ln_final = nn.LayerNorm(width, eps=ln_eps)
        # open_clip's pooled-output projection: a bare matrix by default, a Linear with proj_bias.
        if cfg["proj_type"] == "none":
            self.text_projection = None
        elif cfg["proj_bias"]:
            self.text_projection = nn.Linear(width, cfg["embed_dim"])
        else:
            self.text_projection = nn.Parameter(torch.empty(width, cfg["embed_dim"]))
            nn.init.normal_(self.text_projection, std=width**-0.5)
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))
        # Small random values (open_clip's init scale) so that a tower built without a checkpoint,
        # as in tests, computes finite numbers; real weights always come from the checkpoint.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: torch.Tensor, skip_last: int = 0, vectors=()) -> torch.Tensor:
        """Per-token features (B, L, W) after all resblocks but the last `skip_last`, then ln_final.
        `vectors` [(position, vector (W,)), ...] replace the token embeddings there in every row (textual
        inversion)."""
        n = tokens.shape[1]
        if n > self.context_length:
            raise SDError(f"{n} text tokens exceed the text encoder's context length {self.context_length}")
        x = self.token_embedding(tokens)  # (B, 77, W)
        for position, vector in vectors:
            x[:, position] = vector.to(x)
        x = x + self.positional_embedding[:n]
        for block in self.transformer.resblocks[: len(self.transformer.resblocks) - skip_last]:
            x = block(x, self.causal)
        return self.ln_final(x)  # (B, 77, W)


def _tokenizer(max_length: int, tokenizer_kwargs: dict | None):
    """CLIP's BPE tokenizer (equal to open_clip's SimpleTokenizer), one instance per setting."""
    return get_tokenizer(max_length, tokenizer_kwargs)


class FrozenOpenCLIPEmbedder(nn.Module):
    """Prompts -> per-token OpenCLIP text features (B, 77, width), as the reference's class of this name.

    layer "last": all resblocks then ln_final; "penultimate" (SD 2.x): all but the last resblock, then
    ln_final (the reference applies ln_final in both cases).
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, arch: str = "ViT-H-14", version: str = "laion2b_s32b_b79k", device: str = "cuda",
                 max_length: int = 77, freeze: bool = True, layer: str = "last", text_cfg: dict | None = None):
        super().__init__()
        # `version` names the pretrained open_clip weights the reference downloads at start-up. The
        # SD checkpoints contain those weights, so it is accepted and ignored and nothing is fetched.
        # `device` is accepted for config compatibility: the module's device follows .to().
        if layer not in self.LAYERS:
            raise SDError(f"cond_stage_config layer must be one of {', '.join(self.LAYERS)}, not '{layer}'")
        cfg = text_tower_config(arch, text_cfg)
        if max_length > cfg["context_length"]:
            raise SDError(f"cond_stage_config max_length {max_length} exceeds the text encoder's context "
                          f"length {cfg['context_length']}")
        self.arch = arch
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = self.LAYERS.index(layer)  # resblocks skipped at the end: 0 or 1
        self.tokenizer_kwargs = cfg["tokenizer_kwargs"]
        self.model = OpenCLIPTextModel(cfg)
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        """(B, max_length) long on the CPU: start token, BPE ids, end token, zero padding. Longer texts
        are cut to max_length with the end token kept in the last position (open_clip's rule)."""
        return _tokenizer(self.max_length, self.tokenizer_kwargs)(texts)

    def count_truncated(self, texts: list[str] | str) -> list[int]:
        """How many of each text's tokens tokenize() drops (0 when it fits), so callers can warn."""
        texts = [texts] if isinstance(texts, str) else texts
        tokenizer = _tokenizer(self.max_length, self.tokenizer_kwargs)
        # + 2 for the start and end tokens, which are always kept.
        return [max(0, len(tokenizer.encode(text)) + 2 - self.max_length) for text in texts]

    def tokenizer(self):
        """The BPE tokenizer (ldm.text.tokenizer.CLIPTokenizer) of this text tower."""
        return _tokenizer(self.max_length, self.tokenizer_kwargs)

    @contextlib.contextmanager
    def clip_skip(self, skip: int):
        """Within the block, features come `skip - 1` resblocks earlier than the configured layer: AUTOMATIC1111's
        "Clip skip", where 1 is the model's own layer (SD 2's penultimate). SDError past the tower's depth."""
        blocks = len(self.model.transformer.resblocks)
        if not isinstance(skip, int) or isinstance(skip, bool) or not 1 <= skip <= blocks - self.layer_idx:
            raise SDError(f"clip skip must be a whole number from 1 to {blocks - self.layer_idx} for this text "
                          f"encoder of {blocks} layers (got {skip})")
        configured = self.layer_idx
        self.layer_idx = configured + skip - 1
        try:
            yield
        finally:
            self.layer_idx = configured

    def encode_tokens(self, tokens: torch.Tensor, vectors=()) -> torch.Tensor:
        """Token ids (B, 77) -> features (B, 77, width) from the configured layer; `vectors` replace token
        embeddings at their positions (textual inversion)."""
        tokens = tokens.to(self.model.token_embedding.weight.device)
        return self.model(tokens, skip_last=self.layer_idx, vectors=vectors)

    def forward(self, texts: list[str] | str) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(texts))  # (B, 77, width)

    def encode(self, texts: list[str] | str) -> torch.Tensor:
        return self(texts)


# unCLIP's image embedders and embedding noise keep the reference's dotted names (configs say
# ldm.modules.encoders.modules.ClipImageEmbedder etc.) but live in image_embedders.
_IMAGE_EMBEDDERS = ("FrozenOpenCLIPImageEmbedder", "ClipImageEmbedder", "CLIPEmbeddingNoiseAugmentation")


def __getattr__(name: str):
    if name in _IMAGE_EMBEDDERS:
        from ldm.modules.encoders import image_embedders

        return getattr(image_embedders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
