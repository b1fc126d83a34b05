"""The discrete DDPM noise schedule shared by LatentDiffusion and the upscaler's noise augmentation."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ldm.errors import SDError


def make_beta_schedule(kind: str, timesteps: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> np.ndarray:
    """betas (T,) in float64, as the reference computes them ("linear" is linear in sqrt(beta))."""
    if kind == "linear":
        return np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
    if kind == "cosine":
        steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps + cosine_s
        alphas_cumprod = np.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.999)
    if kind == "squaredcos_cap_v2":
        # Karlo's (and unCLIP's embedding-noise) schedule: betas from alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2
        # on t = i / T, each capped at 0.999 (improved DDPM's discretisation).
        alpha_bar = np.cos((np.arange(timesteps + 1, dtype=np.float64) / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    if kind == "sqrt_linear":
        return np.linspace(linear_start, linear_end, timesteps, dtype=np.float64)
    if kind == "sqrt":
        return np.linspace(linear_start, linear_end, timesteps, dtype=np.float64) ** 0.5
    raise SDError(f"unknown beta_schedule '{kind}' (linear, cosine, squaredcos_cap_v2, sqrt_linear or sqrt)")


def register_schedule(module: nn.Module, betas: np.ndarray, posterior: bool = True,
                      v_posterior: float = 0.0) -> None:
    """Register the reference's schedule buffers (float32, shape (T,)) under its key names.

    They are created on the CPU explicitly so that a model built under torch.device("meta") still has
    real values; loading a checkpoint then replaces them with the checkpoint's own copies.
    """
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
    }
    if posterior:
        # q(x_{t-1} | x_t, x_0); only training and ancestral DDPM sampling use these, but real
        # checkpoints carry them, so the keys must exist for strict loading.
        posterior_variance = ((1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + v_posterior * betas)
        buffers.update({
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        })
    for name, values in buffers.items():
        module.register_buffer(name, torch.tensor(values, dtype=torch.float32, device="cpu"))
