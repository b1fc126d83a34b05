"""Sampler accuracy on an analytic problem: the table of docs/samplers.md.

Data x0 ~ N(mu, s^2) independently per dimension. For VE noise x = x0 + sigma * eps the exact denoiser
is E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu), and the probability-flow ODE has the closed-form
solution x(sigma) = mu + sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)) (x(sigma_0) - mu). Every sampler
runs in float64 on that denoiser with its own default schedule, built from the sigma table of SD's
noise schedule (T = 1000, linear 0.00085 .. 0.012), as it would be for the real model.

Two errors per sampler and step count:
- "ODE error" (deterministic samplers): RMS distance to the exact solution from the same start,
  in units of s. The reference point is the exact ODE solution at the schedule's last non-zero sigma,
  followed by the sampler's own final step when the schedule ends at 0 (that step returns the denoiser
  output there, which is exact by definition). It falls as steps^-order.
- "std error": |std of the final samples / std of the exact final law - 1|. For deterministic samplers
  the exact law is represented by the exact solution from the same starts (no sampling noise); for
  stochastic ones (euler_a, dpmpp_2m_sde), where this is the only meaningful error, by its population
  std, so it carries a statistical noise of about 1 / sqrt(2 * dims).

Run:  .venv/bin/python benchmarks/sampler_accuracy.py [--dims N] [--steps 10,20,40,80,160] [--schedule logsnr]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.models.diffusion import samplers  # noqa: E402
from ldm.models.diffusion.schedules import sigmas_from_alphas_cumprod  # noqa: E402

MU, S = 0.5, 0.3


def sd_model_sigmas(T: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> torch.Tensor:
    """The sigma table of SD 2.x's schedule (betas linear in sqrt, float64 cumprod, float32 cast)."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, T, dtype=torch.float64) ** 2
    return sigmas_from_alphas_cumprod(torch.cumprod(1 - betas, 0).float())


def gaussian_denoiser(mu: float = MU, s: float = S):
    """The exact denoiser of N(mu, s^2) data: a denoise(x, sigma, cond) callable."""
    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        var = sigma.to(x).reshape(-1, *([1] * (x.ndim - 1))) ** 2
        return mu + s ** 2 / (s ** 2 + var) * (x - mu)
    return denoise


def exact_ode(x: torch.Tensor, sigma_from: float, sigma_to: float, mu: float = MU, s: float = S) -> torch.Tensor:
    """Probability-flow ODE solution for Gaussian data, from sigma_from to sigma_to."""
    return mu + math.sqrt((s ** 2 + sigma_to ** 2) / (s ** 2 + sigma_from ** 2)) * (x - mu)


def exact_end(x_start: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Where a perfect solver of the schedule ends from the VE start x_start (see the module doc)."""
    last = float(sigmas[-1]) if float(sigmas[-1]) > 0 else float(sigmas[-2])
    x = exact_ode(x_start, float(sigmas[0]), last)
    if float(sigmas[-1]) == 0:
        x = gaussian_denoiser()(x, torch.tensor([last], dtype=torch.float64))
    return x


def run_analytic(sampler: str, steps: int, *, schedule: str | None = None, dims: int = 4096, seed: int = 0,
                 eta: float | None = None, model_sigmas: torch.Tensor | None = None) -> dict:
    """Run one sampler on the Gaussian problem; returns ODE error, std error and mean error (units of s)."""
    model_sigmas = sd_model_sigmas() if model_sigmas is None else model_sigmas
    sigmas = samplers.make_sigmas(schedule or sampler, model_sigmas, steps)
    g = torch.Generator().manual_seed(seed)
    # VE start at sigmas[0]: a sample of the noised data law N(mu, s^2 + sigma_0^2).
    x_start = MU + math.sqrt(S ** 2 + float(sigmas[0]) ** 2) * torch.randn((1, dims), generator=g, dtype=torch.float64)
    noise_sampler = lambda sigma, sigma_next: torch.randn((1, dims), generator=g, dtype=torch.float64)  # noqa: E731
    spec = samplers.SAMPLERS[sampler]
    options = dict(spec.options)
    if spec.eta is not None:
        options["eta"] = spec.eta if eta is None else eta
    x = spec.fn(gaussian_denoiser(), x_start.clone(), sigmas, None, noise_sampler=noise_sampler, **options)
    target = exact_end(x_start, sigmas)
    if options.get("eta"):
        # stochastic: against the std of the exact end law (the denoised law if the schedule ends at 0)
        last = float(sigmas[-1])
        reference_std = math.sqrt(S ** 2 + last ** 2) if last > 0 else S ** 2 / math.sqrt(S ** 2 + float(sigmas[-2]) ** 2)
    else:
        reference_std = float(target.std())  # deterministic: same start, so no sampling noise in the ratio
    return {
        "ode_error": float((x - target).pow(2).mean().sqrt()) / S,
        "std_error": abs(float(x.std()) / reference_std - 1),
        "mean_error": abs(float(x.mean()) - MU) / S,
    }


def slope(steps: list[int], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(steps), sign flipped: the observed order."""
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


def table(step_counts: list[int], dims: int, schedule: str | None = None) -> str:
    """Markdown table: one row per sampler, its error at each step count and the fitted order."""
    header = "| sampler | schedule | error | " + " | ".join(str(n) for n in step_counts) + " | order |"
    lines = [header, "|" + " --- |" * (len(step_counts) + 4)]
    for name, spec in samplers.SAMPLERS.items():
        stochastic = spec.eta not in (None, 0.0)
        key = "std_error" if stochastic else "ode_error"
        errors = [run_analytic(name, n, schedule=schedule, dims=dims)[key] for n in step_counts]
        # the order is fitted on the last three step counts: the first ones are not asymptotic yet
        order = "-" if stochastic else f"{slope(step_counts[-3:], errors[-3:]):.2f}"
        cells = " | ".join(f"{e:.2e}" for e in errors)
        kind = "std" if stochastic else "ODE"
        lines.append(f"| {name} | {schedule or spec.schedule} | {kind} | {cells} | {order} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, default=30_000)
    parser.add_argument("--steps", default="10,20,40,80,160")
    parser.add_argument("--schedule", default="logsnr",
                        help="the schedule of the second table, shared by all samplers")
    args = parser.parse_args()
    torch.set_num_threads(1)  # element-wise work on 30k numbers: threads only add overhead
    steps = [int(n) for n in args.steps.split(",")]
    print(f"Gaussian data N({MU}, {S}^2), {args.dims} dims, float64; errors in units of s.\n")
    print("Each sampler with its default schedule:\n")
    print(table(steps, args.dims))
    print(f"\nAll samplers on the {args.schedule} schedule:\n")
    print(table(steps, args.dims, args.schedule))


if __name__ == "__main__":
    main()
