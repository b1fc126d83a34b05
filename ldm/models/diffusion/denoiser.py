"""The denoiser contract shared by every sampler.

A denoiser is any callable `denoise(x, sigma, cond) -> x0`: x is a batch in VE space
(x = x0 + sigma * eps), sigma a tensor of shape (B,), and the result the model's estimate of the clean
x0. Samplers that need eps take it as (x - x0) / sigma. Everything model-specific lives here and only
here: the timestep a sigma stands for, the VP input scaling, eps- versus v-prediction, and
classifier-free guidance.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from ldm.models.diffusion.schedules import sigma_to_t, sigmas_from_alphas_cumprod

Cond = Mapping[str, Optional[torch.Tensor]]


def _per_image(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) float64 coefficients -> (B, 1, 1, ...) in x's dtype and device, to broadcast over x."""
    return value.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class DiscreteDenoiser:
    """Wraps a discrete-timestep model (`alphas_cumprod`, `parameterization`, `apply_model`).

    For noise level sigma the model sees the VP input x_t = x / sqrt(1 + sigma^2) (which is
    sqrt(a) x0 + sqrt(1 - a) eps for a = 1 / (1 + sigma^2)) at the fractional timestep that
    interpolates sigma in log space, and its output is turned into x0:
      eps-prediction: x0 = x - sigma * eps
      v-prediction:   x0 = sqrt(a) x_t - sqrt(1 - a) v = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v
    """

    def __init__(self, model, apply_model: Optional[Callable] = None):
        """`apply_model(x_t, t, cond)` defaults to the model's own; image modes pass a wrapped one (latent
        blending, tiles)."""
        if model.parameterization not in ("eps", "v"):
            raise ValueError(f"unsupported parameterization {model.parameterization!r} (eps or v)")
        self.model = model
        self.apply_model = apply_model or model.apply_model
        self.parameterization = model.parameterization
        self.sigmas = sigmas_from_alphas_cumprod(model.alphas_cumprod)  # (T,) float64, increasing in t

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu().expand(x.shape[0])
        t = sigma_to_t(sigma, self.sigmas).to(device=x.device, dtype=torch.float32)  # (B,)
        c_in = 1 / (1 + sigma ** 2).sqrt()  # sqrt(a)
        out = self.apply_model(x * _per_image(c_in, x), t, cond)
        if self.parameterization == "eps":
            return x - _per_image(sigma, x) * out
        return _per_image(c_in ** 2, x) * x - _per_image(sigma * c_in, x) * out


def _stack_conds(first: Cond, second: Cond) -> dict[str, Optional[torch.Tensor]]:
    """One conditioning dict for the batch [first; second]: every tensor concatenated along dim 0."""
    stacked = {}
    for key in dict.fromkeys([*first, *second]):
        a, b = first.get(key), second.get(key)
        if (a is None) != (b is None):
            raise ValueError(f"conditioning '{key}' is given for only one of cond / uncond")
        stacked[key] = None if a is None else torch.cat([a, b])
    return stacked


class CFGDenoiser:
    """Classifier-free guidance, the only place it is written.

    `cond` is {"cond": {...}, "uncond": {...}} with the model's keys (c_crossattn, c_concat, c_adm) in
    each. Both halves go through the model in one batch ([uncond; cond], as the reference orders them)
    and the result is uncond + scale * (cond - uncond). Guiding x0 is the same as guiding eps or v:
    x0 is affine in either with the same coefficients for both halves.
    """

    def __init__(self, denoiser, scale: float):
        self.denoiser = denoiser
        self.scale = float(scale)

    @property
    def sigmas(self) -> torch.Tensor:
        return self.denoiser.sigmas

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Cond]) -> torch.Tensor:
        uncond = cond.get("uncond")
        if uncond is None or self.scale == 1.0:
            return self.denoiser(x, sigma, cond["cond"])
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), _stack_conds(uncond, cond["cond"]))
        x0_uncond, x0_cond = both.chunk(2)
        return x0_uncond + self.scale * (x0_cond - x0_uncond)
