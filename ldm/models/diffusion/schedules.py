"""Noise-level schedules for the samplers.

Samplers work in "VE" space, x = x0 + sigma * eps, and walk down a decreasing 1-D tensor of sigmas
(float64, `steps + 1` entries: the start, then the level after each step). A discrete model trained on
timesteps t = 0 .. T-1 has one sigma per timestep, `model_sigmas[t] = sqrt((1 - a_t) / a_t)` with
`a_t = alphas_cumprod[t]`, increasing with t. Between timesteps, sigma and t are related by linear
interpolation of log(sigma) in t; `sigma_to_t` and `t_to_sigma` are the one place that rule is written.

Two families of schedules exist and they end differently:
- the reference's samplers (DDIM, PLMS, DPM-Solver) stop at timestep 0, i.e. at sigma = model_sigmas[0]
  (about 0.029 for SD), and their output is the VP latent at that level;
- the k-diffusion family (karras, exponential, uniform) appends a final 0: the last step returns the
  denoised x0 itself.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ldm.errors import SDError
from ldm.models.diffusion.sampler_names import SCHEDULE_INFO


# -- the discrete model's sigmas and the sigma <-> t mapping ------------------------------------------

def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t) per timestep, float64 on the CPU, shape (T,)."""
    a = alphas_cumprod.detach().to("cpu", torch.float64)
    return ((1 - a) / a).sqrt()


def sigma_to_t(sigma: torch.Tensor, model_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of each sigma, by linear interpolation of log(sigma) in t.

    A sigma taken from `model_sigmas` maps back to its integer timestep exactly; sigmas outside the
    table clamp to 0 or T-1.
    """
    log_table = model_sigmas.log()
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log().clamp(log_table[0], log_table[-1])
    # i: the last table entry <= log_sigma, kept in [0, T-2] so that i + 1 exists.
    i = (torch.searchsorted(log_table, log_sigma, right=True) - 1).clamp(0, len(log_table) - 2)
    w = (log_sigma - log_table[i]) / (log_table[i + 1] - log_table[i])
    return i.to(torch.float64) + w


def t_to_sigma(t: torch.Tensor, model_sigmas: torch.Tensor) -> torch.Tensor:
    """The inverse of `sigma_to_t`: sigma at fractional timesteps t (clamped to [0, T-1])."""
    log_table = model_sigmas.log()
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(log_table) - 1)
    i = t.floor().long().clamp(max=len(log_table) - 2)
    w = t - i
    sigma = (log_table[i] + w * (log_table[i + 1] - log_table[i])).exp()
    # integer timesteps give the table's own values bit for bit (exp(log(s)) may differ from s in the last bit)
    return torch.where(w == 0, model_sigmas[i], torch.where(w == 1, model_sigmas[i + 1], sigma))


# -- the reference's schedules (end at timestep 0) ----------------------------------------------------

def ddim_uniform_timesteps(T: int, steps: int) -> torch.Tensor:
    """The reference's "uniform" DDIM timesteps, ascending, as a long tensor of `steps` entries.

    The reference takes c = T // S and t = range(0, T, c) + 1. That is exact when S divides T, but for
    other S it yields more than S steps (S=7 gives 8, S=30 gives 31) or indexes t = T and crashes (S=3).
    We keep its intent, steps of T / S starting at t = 1, with the exact step instead of its floor:

        t_k = 1 + floor(k * T / S),   k = 0 .. S-1.

    This equals the reference whenever S divides T, gives exactly S distinct timesteps for any
    1 <= S <= T-1, and never exceeds T-1 (the largest is 1 + floor(T - T/S) <= T-1 since T/S > 1).
    """
    if not 1 <= steps <= T - 1:
        raise SDError(f"DDIM-type samplers need 1 to {T - 1} steps for a model with {T} timesteps (got {steps})")
    k = torch.arange(steps, dtype=torch.long)
    return 1 + (k * T) // steps


def sigmas_from_timesteps(model_sigmas: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Decreasing sigmas at the given timesteps, then model_sigmas[0], the reference's last a_prev."""
    ordered = torch.as_tensor(timesteps).long().sort(descending=True).values
    return torch.cat([model_sigmas[ordered], model_sigmas[:1]])


def ddim_uniform(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """The reference's DDIM / PLMS schedule: n uniform timesteps, ending at timestep 0."""
    return sigmas_from_timesteps(model_sigmas, ddim_uniform_timesteps(len(model_sigmas), n))


def time_uniform(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """DPM-Solver's "time_uniform" spacing (the reference's --dpm): n + 1 levels at timesteps evenly
    spaced from T-1 down to 0 (fractional in between), ending at timestep 0.

    The reference's solver runs on continuous t in [1/T, 1] and feeds the model t_input = (t - 1/T) * T,
    which is exactly linspace(T-1, 0, n + 1).
    """
    T = len(model_sigmas)
    return t_to_sigma(torch.linspace(T - 1, 0, n + 1, dtype=torch.float64), model_sigmas)


def logsnr_uniform(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """DPM-Solver's "logSNR" spacing: n + 1 levels evenly spaced in lambda = -log(sigma), from the
    sigma of timestep T-1 down to that of timestep 0."""
    return _geometric(n + 1, float(model_sigmas[0]), float(model_sigmas[-1]))


# -- the k-diffusion family (end with 0) --------------------------------------------------------------

def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _geometric(n_points: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n_points, dtype=torch.float64).exp()


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: n levels evenly spaced in sigma^(1/rho), then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n levels evenly spaced in log(sigma), then 0."""
    return _append_zero(_geometric(n, sigma_min, sigma_max))


def uniform(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """n levels at timesteps evenly spaced from T-1 to 0, then 0 (k-diffusion's default for discrete
    models; A1111 and ComfyUI call it "normal")."""
    T = len(model_sigmas)
    return _append_zero(t_to_sigma(torch.linspace(T - 1, 0, n, dtype=torch.float64), model_sigmas))


# -- few-step models (SD-Turbo): timesteps from the top, then 0 ----------------------------------------

def trailing(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' timestep_spacing="trailing" (how SD-Turbo is run): n timesteps round(T - k T / n) - 1,
    k = 0 .. n-1, so the first step is always at T-1 (1 step: [999]; 4: [999, 749, 499, 249]), then 0."""
    T = len(model_sigmas)
    if not 1 <= n <= T:
        raise SDError(f"the trailing schedule takes 1 to {T} steps (got {n})")
    t = (T - torch.arange(n, dtype=torch.float64) * (T / n)).round().long() - 1
    return _append_zero(model_sigmas[t])


def sgm_uniform(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's "SGM Uniform": n levels at timesteps linspace(T-1, 0, n + 1) without the last, then 0
    (close to trailing: 2 steps are t = 999 and 499.5)."""
    T = len(model_sigmas)
    return _append_zero(t_to_sigma(torch.linspace(T - 1, 0, n + 1, dtype=torch.float64)[:-1], model_sigmas))


TURBO_LEVELS = 10  # ComfyUI's SDTurboScheduler picks from ten timesteps: 999, 899, ..., 99


def turbo(n: int, model_sigmas: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """ComfyUI's SDTurboScheduler: `n` of the ten timesteps T-1, 0.9 T - 1, ..., 0.1 T - 1 from the top, then
    0; a partial run (img2img's denoise) starts further down, at index 10 - int(10 * strength), and still
    takes `n` steps (2 steps: [999, 899]; strength 0.5: [499, 399])."""
    T = len(model_sigmas)
    start = TURBO_LEVELS - int(TURBO_LEVELS * strength)
    room = TURBO_LEVELS - start
    if not 1 <= n <= room:
        at = "" if strength >= 1.0 else f" at strength {strength:g}"
        raise SDError(f"the turbo schedule takes 1 to {room} steps{at} (got {n})" if room else
                      f"the turbo schedule takes no step at strength {strength:g}: its first level is strength 0.1")
    t = (torch.arange(TURBO_LEVELS, 0, -1, dtype=torch.float64) * (T / TURBO_LEVELS)).round().long() - 1
    return _append_zero(model_sigmas[t[start:start + n]])


# -- by name ------------------------------------------------------------------------------------------

def _model_range(fn: Callable[[int, float, float], torch.Tensor]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Adapt a (n, sigma_min, sigma_max) schedule to the model's own sigma range."""
    return lambda n, model_sigmas: fn(n, float(model_sigmas[0]), float(model_sigmas[-1]))


# name -> (fn(steps, model_sigmas) -> sigmas, one-line description from sampler_names.SCHEDULE_INFO)
_SCHEDULE_FUNCTIONS = {
    "ddim_uniform": ddim_uniform,
    "time_uniform": time_uniform,
    "logsnr": logsnr_uniform,
    "karras": _model_range(karras),
    "exponential": _model_range(exponential),
    "uniform": uniform,
    "trailing": trailing,
    "sgm_uniform": sgm_uniform,
    "turbo": turbo,
}
# Schedules with a start rule of their own for partial (img2img) runs; the others keep their last steps
_OWN_STRENGTH_RULE = {"turbo": turbo}
# Schedules whose full runs start from sigma * noise, as the tools that made them run them (diffusers' Euler
# with trailing timesteps, A1111's and ComfyUI's k-samplers): few-step models are tuned to that start. The
# others start from sqrt(1 + sigma^2) * noise, the reference's x_T = noise in VP space (the two differ by
# 0.2% at sigma 14.6).
START_AT_SIGMA = frozenset({"trailing", "sgm_uniform", "turbo"})
SCHEDULES: dict[str, tuple[Callable[[int, torch.Tensor], torch.Tensor], str]] = {
    name: (fn, SCHEDULE_INFO[name]) for name, fn in _SCHEDULE_FUNCTIONS.items()}


def make_schedule(name: str, model_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """The named schedule with `steps` steps (steps + 1 sigmas) for a model with these sigmas."""
    if name not in SCHEDULES:
        raise SDError(f"unknown schedule '{name}' (one of {', '.join(SCHEDULES)})")
    if steps < 1:
        raise SDError(f"the number of steps must be at least 1 (got {steps})")
    return SCHEDULES[name][0](steps, model_sigmas)


def trim_for_strength(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """Keep the last int(strength * steps) steps of a schedule, for img2img-style partial runs.

    The run then starts at the returned schedule's first sigma from x0 + sigma * noise. Strength 1 keeps
    the whole schedule; strength 0 keeps no step (only the final sigma), so sampling returns its input.
    (The reference's img2img noises its input one DDIM step above the first step it takes; here the
    input is noised to exactly the level of the first step, and strength 1 works. This is also diffusers'
    rule, with which SD-Turbo runs img2img: 2 trailing steps at strength 0.5 take the step at t = 499.)
    """
    if not 0.0 <= strength <= 1.0:
        raise SDError(f"strength must be between 0 and 1 (got {strength})")
    steps = len(sigmas) - 1
    kept = int(strength * steps)
    return sigmas[steps - kept:]


def schedule_at_strength(name: str, model_sigmas: torch.Tensor, steps: int, strength: float = 1.0) -> torch.Tensor:
    """The named schedule of a run at `strength` (1: a full run): the schedule's own start rule where it has
    one (turbo's), else its last int(strength * steps) steps. SDError when a strength above 0 would leave no
    step, which would hand back the input unchanged as if it had been redrawn."""
    if name in _OWN_STRENGTH_RULE and strength < 1.0:
        if strength <= 0.0:
            return make_schedule(name, model_sigmas, 1)[-1:]
        return _OWN_STRENGTH_RULE[name](steps, model_sigmas, strength)
    sigmas = trim_for_strength(make_schedule(name, model_sigmas, steps), strength)
    if strength > 0.0 and len(sigmas) == 1:
        need = math.ceil(1 / strength - 1e-9)
        raise SDError(f"strength {strength:g} of {steps} step(s) runs no step (it keeps int(strength x steps)); "
                      f"use at least {need} steps, or a strength of at least {1 / steps:.3g}")
    return sigmas
