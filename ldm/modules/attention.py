"""Attention blocks of the SD 2.x UNet: CrossAttention, BasicTransformerBlock, SpatialTransformer.

Attribute names are the checkpoint keys (to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2, norm1..3,
proj_in, proj_out, transformer_blocks.N). Attention runs through
torch.nn.functional.scaled_dot_product_attention (SDPA), which picks a fused kernel when it can.

ATTN_PRECISION (environment, default "fp32", as in the reference): with "fp32", attention on half
precision activations (float16 or bfloat16, whether the weights are half or autocast made them so) is
computed in float32: q, k, v are upcast, SDPA (logits, softmax, weighted sum) runs in float32 with
autocast off, and the result is cast back. Without it SD 2.1-v overflows in float16 and gives
black/NaN images. "fp16" runs SDPA in the activations' own dtype (faster; torch's fused kernels still
accumulate in float32, but that is their choice, not a guarantee). The variable is read when a
CrossAttention is built (so when the model is loaded), not per call: set it before loading.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import SDError
from ldm.modules.diffusionmodules.util import zero_module

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def attention_upcast_from_env() -> bool:
    """True when ATTN_PRECISION asks for float32 attention (the default)."""
    value = os.environ.get("ATTN_PRECISION", "fp32")
    if value not in ("fp32", "fp16"):
        raise SDError(f"ATTN_PRECISION={value!r} is not understood; use 'fp32' (default) or 'fp16'")
    return value == "fp32"


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, N, query_dim) on context (B, M, context_dim); self-attention
    when context is None."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        # Plain attribute, not a buffer: nothing to load, nothing to recompute after a meta build.
        self.upcast = attention_upcast_from_env()
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        m = context.shape[1]
        # (B, N, H*D) -> (B, H, N, D): a strided view, which SDPA takes without a copy.
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)
        k = self.to_k(context).view(b, m, self.heads, self.dim_head).transpose(1, 2)  # (B, H, M, D)
        v = self.to_v(context).view(b, m, self.heads, self.dim_head).transpose(1, 2)  # (B, H, M, D)
        if self.upcast and q.dtype in _HALF_DTYPES:
            dtype = q.dtype
            # Autocast would cast SDPA's inputs straight back to half, so it is switched off here.
            with torch.autocast(device_type=q.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            out = out.to(dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # scale = dim_head ** -0.5, as the reference
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)  # (B, N, H*D)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Linear to 2 * dim_out, then value * gelu(gate) (value first, gate second, as the checkpoints)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward of the transformer blocks: dim -> mult * dim (gated) -> dim_out."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention on the context, GEGLU feed-forward.

    disable_self_attn (the x4 upscaler's low levels) makes attn1 attend to the context as well.
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        # Registration order follows the reference (attn1, ff, attn2, norms) so state_dict order does too.
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.tome = None  # token merging while a run asks for it (ldm.modules.tome.token_merging)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # (the reference's name for the block's computation, which tools such as tomesd replace)
        merged = self.tome.merges(x) if self.tome is not None else None
        h = self.norm1(x)
        attended = self.attn1(h if merged is None else merged[0](h), context if self.disable_self_attn else None)
        x = x + (attended if merged is None else merged[1](attended))  # (B, N, dim)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (B, C, H, W), with a residual around it.

    use_linear: proj_in/proj_out are Linear layers applied on (B, H*W, C) (SD 2.x checkpoints);
    otherwise 1x1 convolutions applied on the map. context_dim may be one int or one per block.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | list[int] | None = None, disable_self_attn: bool = False,
                 use_linear: bool = False, use_checkpoint: bool = False):
        super().__init__()
        # use_checkpoint (gradient checkpointing) only trades memory for recomputation in a training
        # backward pass; inference has no backward pass, so it is accepted and ignored.
        inner_dim = n_heads * d_head
        context_dims = context_dim if isinstance(context_dim, (list, tuple)) else [context_dim] * depth
        if len(context_dims) != depth:
            raise SDError(f"SpatialTransformer: {len(context_dims)} context_dim values for depth {depth}")
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dims[d], disable_self_attn)
            for d in range(depth)
        )
        # Zero-initialised as the reference (the block starts as the identity); loading overwrites it.
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | list[torch.Tensor] | None = None) -> torch.Tensor:
        contexts = context if isinstance(context, list) else [context] * len(self.transformer_blocks)
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)  # (B, inner, H, W)
        c = x.shape[1]
        # (B, C, H, W) -> (B, H*W, C); free (a view) when x is channels_last.
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.use_linear:
            x = self.proj_in(x)  # (B, H*W, inner)
        for block, ctx in zip(self.transformer_blocks, contexts):
            x = block(x, ctx)
        if self.use_linear:
            x = self.proj_out(x)  # (B, H*W, C)
        x = x.reshape(b, h, w, x.shape[-1]).permute(0, 3, 1, 2)  # (B, C, H, W), channels_last strides
        if not self.use_linear:
            x = self.proj_out(x)
        # x_in first: the sum takes the layout of the block's input.
        return x_in + x
