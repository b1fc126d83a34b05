"""Small helpers of the diffusion UNet (and, later, the noise schedule)."""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as the reference: [cos | sin].

    timesteps: (B,) float or integer tensor. Returns (B, dim) float32.
    Frequencies are max_period ** (-k / half) for k = 0..half-1; the embedding is a smooth function
    of t, so samplers that interpolate between discrete timesteps get the in-between embedding.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(k * (-math.log(max_period) / half))  # (half,)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        # An odd width gets one zero column, as in the reference.
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place and return it.

    The reference zero-initialises the last layer of every residual branch so a fresh model starts as
    the identity; weights loaded later overwrite this. On the meta device this is a no-op.
    """
    for p in module.parameters():
        p.detach().zero_()
    return module


def normalization(channels: int) -> nn.GroupNorm:
    """The UNet's GroupNorm: 32 groups, eps 1e-5.

    A plain nn.GroupNorm rather than the reference's GroupNorm32 (which upcasts its input to float32):
    torch's CPU and CUDA group-norm kernels already accumulate half/bfloat16 statistics in float32, and
    a standard module keeps channels_last and torch.compile on their fast paths.
    """
    return nn.GroupNorm(32, channels, eps=1e-5)
