"""Samplers: step rules as short plain functions over a schedule of sigmas, and their registry.

Every sampler is `sample_NAME(denoise, x, sigmas, cond, *, noise_sampler, callback, **opts) -> x`:
`denoise(x, sigma, cond) -> x0` is the contract of ldm.models.diffusion.denoiser, `x` the start in VE
space (x = x0 + sigma * eps) at sigmas[0], `sigmas` a decreasing float64 schedule (see schedules.py),
and the result the VE sample at sigmas[-1]. Model calls happen only through `denoise`; eps, where a rule
needs it, is (x - x0) / sigma. Step coefficients are computed as Python floats (float64) from the
schedule, so the arithmetic on x loses nothing to the schedule's rounding.

`sample()` is the one entry point: it maps the VP start to VE space and the result back, so that DDIM
reproduces the reference's x_T = noise ... x_0 chain. `run()` adds what the commands need around it
(schedule by name, img2img strength, per-image noise generators).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

from ldm.errors import SDError
from ldm.models.diffusion import sampler_names as names
from ldm.models.diffusion.sampler_names import SAMPLER_INFO
from ldm.models.diffusion.schedules import SCHEDULES, START_AT_SIGMA, schedule_at_strength

NoiseSampler = Callable[[float, float], torch.Tensor]
Callback = Optional[Callable[[dict], Any]]


# -- shared pieces ------------------------------------------------------------------------------------

def _steps(sigmas: torch.Tensor) -> Iterator[tuple[int, float, float]]:
    for i in range(len(sigmas) - 1):
        yield i, float(sigmas[i]), float(sigmas[i + 1])


def _denoise(denoise, x: torch.Tensor, sigma: float, cond) -> torch.Tensor:
    return denoise(x, torch.full((x.shape[0],), sigma, dtype=torch.float64), cond)


def _report(callback: Callback, i: int, x: torch.Tensor, sigma: float, sigma_next: float, denoised: torch.Tensor):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


Step = Callable[[int, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def _walk(denoise, x: torch.Tensor, sigmas: torch.Tensor, cond, callback: Callback, step: Step) -> torch.Tensor:
    """The loop of every sampler: denoise at each level, report, then x = step(i, x, x0, sigma, sigma_next).

    A step that ends at sigma 0 returns x0, the limit of every rule here (eps is undefined at sigma 0, and
    h = log(sigma / sigma_next) is infinite).
    """
    for i, sigma, sigma_next in _steps(sigmas):
        x0 = _denoise(denoise, x, sigma, cond)
        _report(callback, i, x, sigma, sigma_next, x0)
        x = x0 if sigma_next == 0 else step(i, x, x0, sigma, sigma_next)
    return x


def _noise_or_default(noise_sampler: Optional[NoiseSampler], x: torch.Tensor) -> NoiseSampler:
    """Without a noise sampler, fresh noise comes from torch's global generator (not per-image seeded)."""
    return noise_sampler if noise_sampler is not None else (lambda sigma, sigma_next: torch.randn_like(x))


def ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from sigma to sigma_next.

    The deterministic part goes down to sigma_down, then fresh noise of std sigma_up brings the level back
    to sigma_next (sigma_down^2 + sigma_up^2 = sigma_next^2). sigma_up = eta * sigma_next *
    sqrt(1 - sigma_next^2 / sigma^2) is the reference's DDIM sigma_eta
    (eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))) divided by sqrt(a_prev); it is capped
    at sigma_next so that eta > 1 stays defined.
    """
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


# -- first order: DDIM, Euler, Euler ancestral --------------------------------------------------------

def sample_euler_ancestral(denoise, x, sigmas, cond, *, noise_sampler=None, callback=None, eta=1.0):
    """Euler steps of the probability-flow ODE to sigma_down, plus fresh noise of std sigma_up."""
    noise_sampler = _noise_or_default(noise_sampler, x)

    def step(i, x, x0, sigma, sigma_next):
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        x = x0 + (sigma_down / sigma) * (x - x0)  # = x + (sigma_down - sigma) * eps
        return x + sigma_up * noise_sampler(sigma, sigma_next).to(x) if sigma_up > 0 else x

    return _walk(denoise, x, sigmas, cond, callback, step)


def sample_ddim(denoise, x, sigmas, cond, *, noise_sampler=None, callback=None, eta=0.0):
    """The reference's DDIM. In VE space its update sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z
    (divided by sqrt(a_prev)) is x0 + sigma_down * eps + sigma_up * z: exactly an ancestral Euler step."""
    return sample_euler_ancestral(denoise, x, sigmas, cond, noise_sampler=noise_sampler, callback=callback, eta=eta)


def sample_euler(denoise, x, sigmas, cond, *, noise_sampler=None, callback=None):
    """Euler on the probability-flow ODE dx/dsigma = eps (DDIM with eta = 0)."""
    return sample_euler_ancestral(denoise, x, sigmas, cond, callback=callback, eta=0.0)


# -- two model calls per step: Heun, DPM2 -------------------------------------------------------------

def _two_stage(denoise, x, sigmas, cond, callback, probe: Callable[[float, float], float], combine: Callable):
    """Shared rule of Heun and DPM2: an Euler probe to sigma_probe = probe(sigma, sigma_next), a second
    eps there, then the full step with combine(eps, eps_probe)."""
    def step(i, x, x0, sigma, sigma_next):
        eps = (x - x0) / sigma
        sigma_probe = probe(sigma, sigma_next)
        x_probe = x + (sigma_probe - sigma) * eps
        eps_probe = (x_probe - _denoise(denoise, x_probe, sigma_probe, cond)) / sigma_probe
        return x + (sigma_next - sigma) * combine(eps, eps_probe)

    return _walk(denoise, x, sigmas, cond, callback, step)


def sample_heun(denoise, x, sigmas, cond, *, noise_sampler=None, callback=None):
    """Heun (trapezoidal predictor-corrector): eps averaged over both ends of the step."""
    return _two_stage(denoise, x, sigmas, cond, callback, probe=lambda s, s_next: s_next,
                      combine=lambda eps, eps_probe: (eps + eps_probe) / 2)


def sample_dpm2(denoise, x, sigmas, cond, *, noise_sampler=None, callback=None):
    """DPM-Solver-2 (k-diffusion's DPM2): eps at the midpoint in log(sigma) drives the whole step."""
    return _two_stage(denoise, x, sigmas, cond, callback, probe=lambda s, s_next: math.sqrt(s * s_next),
                      combine=lambda eps, eps_probe: eps_probe)


# -- PLMS ---------------------------------------------------------------------------------------------

def sample_plms(denoise, x, sigmas, cond, *, noise_sampler=None, callback=None):
    """The reference's pseudo linear multistep method (Liu et al. 2022) on eps.

    Each step is a DDIM step (x + (sigma_next - sigma) * eps') with eps' an Adams-Bashforth combination
    of the eps of this and the previous steps (orders 2, 3, 4 as history fills up); the first step has
    no history and uses improved Euler instead: eps' = (eps + eps at the Euler guess at sigma_next) / 2.
    v-models work too, since eps comes from the denoiser's x0. (For a 1-step run the reference
    re-evaluates at the start timestep; here the guess is evaluated at sigma_next as in every other run.)
    """
    history: list[torch.Tensor] = []  # eps of the previous steps, most recent last

    def step(i, x, x0, sigma, sigma_next):
        nonlocal history
        eps = (x - x0) / sigma
        if not history:
            x_guess = x + (sigma_next - sigma) * eps
            eps_prime = (eps + (x_guess - _denoise(denoise, x_guess, sigma_next, cond)) / sigma_next) / 2
        elif len(history) == 1:
            eps_prime = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            eps_prime = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = (history + [eps])[-3:]
        return x + (sigma_next - sigma) * eps_prime

    return _walk(denoise, x, sigmas, cond, callback, step)


# -- DPM-Solver++ (data prediction) family ------------------------------------------------------------

def _dpm_solver_update(x, sigma, sigma_next, x0s: Sequence[torch.Tensor], lambdas: Sequence[float], order: int):
    """One multistep DPM-Solver++ update of the given order (Lu et al. 2022), in VE space.

    With lambda = -log(sigma) (the half log-SNR), h = lambda_next - lambda and the data predictions
    x0s[-1], x0s[-2], ... at lambdas[-1], lambdas[-2], ...:
        x_next = (sigma_next / sigma) x + phi1 m0 + phi2 D1 - phi3 D2
    with phi1 = 1 - e^-h, phi2 = 1 - phi1 / h, phi3 = phi2 / h - 1/2 and D1, D2 the backward
    differences of the reference's "dpm_solver" type (order 2 uses 0.5 * phi1 * D1_0 instead of phi2 D1).
    This is the reference's VP formula divided by alpha_t. (Its order-3 D2 is about h^2 x0''/2 while
    the phi3 term integrates h^2 x0'', so that update is O(h^3) locally, like order 2; we keep it.)
    """
    h = math.log(sigma / sigma_next)
    phi1 = -math.expm1(-h)
    m0 = x0s[-1]
    x_next = (sigma_next / sigma) * x + phi1 * m0
    if order == 1:
        return x_next
    r0 = (lambdas[-1] - lambdas[-2]) / h
    d1_0 = (m0 - x0s[-2]) / r0
    if order == 2:
        return x_next + 0.5 * phi1 * d1_0
    r1 = (lambdas[-2] - lambdas[-3]) / h
    d1_1 = (x0s[-2] - x0s[-3]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = 1 - phi1 / h
    phi3 = phi2 / h - 0.5
    return x_next + phi2 * d1 - phi3 * d2


def sample_dpm_solver(denoise, x, sigmas, cond, *, noise_sampler=None, callback=None, order=2,
                      lower_order_final=True):
    """Multistep DPM-Solver++ of order 1-3: the reference's --dpm is order 2 on the time-uniform schedule.

    As the reference: step k (from 1) uses order min(order, k) while the history fills; with
    lower_order_final and fewer than 15 steps the last steps lower the order again, min(order,
    steps + 1 - k).
    """
    if order not in (1, 2, 3):
        raise SDError(f"DPM-Solver order must be 1, 2 or 3 (got {order})")
    n = len(sigmas) - 1
    x0s: list[torch.Tensor] = []
    lambdas: list[float] = []

    def step(i, x, x0, sigma, sigma_next):
        nonlocal x0s, lambdas
        x0s, lambdas = (x0s + [x0])[-order:], (lambdas + [-math.log(sigma)])[-order:]
        step_order = min(order, i + 1)
        if lower_order_final and n < 15:
            step_order = min(step_order, n - i)
        return _dpm_solver_update(x, sigma, sigma_next, x0s, lambdas, step_order)

    return _walk(denoise, x, sigmas, cond, callback, step)


def sample_dpmpp_2m(denoise, x, sigmas, cond, *, noise_sampler=None, callback=None):
    """DPM++ 2M (k-diffusion's name): DPM-Solver++ multistep order 2 without lowering the final order."""
    return sample_dpm_solver(denoise, x, sigmas, cond, callback=callback, order=2, lower_order_final=False)


def sample_dpmpp_2m_sde(denoise, x, sigmas, cond, *, noise_sampler=None, callback=None, eta=1.0):
    """DPM++ 2M SDE (midpoint form): the SDE variant of DPM-Solver++ (2M), with fresh noise each step.

    With h = log(sigma / sigma_next) and g = (1 + eta) h, in VE space:
        x_next = (sigma_next / sigma) e^(-eta h) x + (1 - e^-g) (x0 + D1_0 / 2)
                 + sigma_next sqrt(1 - e^(-2 eta h)) z
    where D1_0 = (x0 - x0_prev) / r, r = h_prev / h (absent on the first step). The x0 coefficients sum
    to 1 and the noise variances to sigma_next^2, so the marginals stay right; eta = 0 is DPM++ 2M.
    """
    noise_sampler = _noise_or_default(noise_sampler, x)
    previous: list = []  # (x0, h) of the previous step

    def step(i, x, x0, sigma, sigma_next):
        h = math.log(sigma / sigma_next)
        phi = -math.expm1(-(1 + eta) * h)
        x0_mix = x0
        if previous:
            x0_prev, h_prev = previous.pop()
            x0_mix = x0 + (0.5 * h / h_prev) * (x0 - x0_prev)
        previous.append((x0, h))
        x = (sigma_next / sigma) * math.exp(-eta * h) * x + phi * x0_mix
        if eta > 0:
            x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * noise_sampler(sigma, sigma_next).to(x)
        return x

    return _walk(denoise, x, sigmas, cond, callback, step)


# -- DDIM inversion -----------------------------------------------------------------------------------

def encode_ddim(denoise, x0: torch.Tensor, sigmas: torch.Tensor, cond, *, refine: int = 0,
                callback: Callback = None) -> torch.Tensor:
    """Deterministic DDIM inversion: the VP latent at sigmas[-1] -> the VP latent at sigmas[0].

    Each step runs the eta = 0 rule up the schedule, x_up = x + (sigma_up - sigma) * eps(x, sigma).
    Decoding steps back with eps(x_up, sigma_up), so the exact inverse of a decoding step solves
    x_up = x + (sigma_up - sigma) * eps(x_up, sigma_up); `refine` fixed-point iterations of that equation
    (one model call each) make the round trip exact to any tolerance, while refine=0 is the usual one-call
    inversion whose round-trip error falls only as 1 / steps.
    """
    sigmas = _as_schedule(sigmas)
    if float(sigmas[-1]) <= 0:
        raise SDError("DDIM inversion needs a schedule that ends above sigma 0 (use the ddim_uniform schedule)")
    x = x0 * math.sqrt(1 + float(sigmas[-1]) ** 2)
    for i, sigma, sigma_up in _steps(sigmas.flip(0)):
        denoised = _denoise(denoise, x, sigma, cond)
        _report(callback, i, x, sigma, sigma_up, denoised)
        x_up = x + (sigma_up - sigma) * (x - denoised) / sigma
        for _ in range(refine):
            x_up = x + (sigma_up - sigma) * (x_up - _denoise(denoise, x_up, sigma_up, cond)) / sigma_up
        x = x_up
    return x / math.sqrt(1 + float(sigmas[0]) ** 2)


# -- per-image noise ----------------------------------------------------------------------------------

class BatchedNoiseSampler:
    """Fresh noise for ancestral/SDE steps, drawn per image from its own seeded CPU generator.

    `seeds` holds one entry per image: an int seeds a new torch.Generator("cpu"); a Generator is used as
    it is, so passing the generators that drew the start noise continues each image's stream. Image k's
    noise then depends only on its own seed, never on the batch it is in.
    """

    def __init__(self, seeds: Sequence[Union[int, torch.Generator]], shape: Sequence[int], device="cpu"):
        self.generators = [s if isinstance(s, torch.Generator) else torch.Generator("cpu").manual_seed(int(s))
                           for s in seeds]
        self.shape = tuple(shape)
        self.device = device

    def draw(self) -> torch.Tensor:
        """(B, *shape) standard normal noise, one draw from each image's generator."""
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)

    def __call__(self, sigma: float = 0.0, sigma_next: float = 0.0) -> torch.Tensor:
        return self.draw()


# -- registry and entry points ------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerSpec:
    """A sampler's step rule and its table entry (ldm.models.diffusion.sampler_names.SAMPLER_INFO)."""
    fn: Callable
    schedule: str
    description: str
    steps: int
    eta: Optional[float] = None
    options: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""


_STEP_RULES = {"ddim": sample_ddim, "plms": sample_plms, "dpm": sample_dpm_solver, "dpm3": sample_dpm_solver,
               "euler": sample_euler, "euler_a": sample_euler_ancestral, "heun": sample_heun, "dpm2": sample_dpm2,
               "dpmpp_2m": sample_dpmpp_2m, "dpmpp_2m_sde": sample_dpmpp_2m_sde}
SAMPLERS: dict[str, SamplerSpec] = {name: SamplerSpec(_STEP_RULES[name], **vars(info))
                                    for name, info in SAMPLER_INFO.items()}


def check_sampler(sampler: str, schedule: Optional[str] = None, eta: Optional[float] = None) -> SamplerSpec:
    """The sampler's spec, after checking the names and that eta fits it (SDError otherwise)."""
    names.check_sampler(sampler, schedule, eta)
    return SAMPLERS[sampler]


def make_sigmas(name_or_schedule: str, model_sigmas: torch.Tensor, steps: int, strength: float = 1.0) -> torch.Tensor:
    """A schedule by schedule name, or the default schedule of a sampler name, for a run at `strength`
    (schedules.schedule_at_strength: 1 is a full run)."""
    if name_or_schedule in SAMPLERS:
        name_or_schedule = SAMPLERS[name_or_schedule].schedule
    elif name_or_schedule not in SCHEDULES:
        raise SDError(f"'{name_or_schedule}' is neither a sampler ({', '.join(SAMPLERS)}) "
                      f"nor a schedule ({', '.join(SCHEDULES)})")
    return schedule_at_strength(name_or_schedule, model_sigmas, steps, strength)


def _as_schedule(sigmas) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if sigmas.ndim != 1 or len(sigmas) < 1:
        raise ValueError("sigmas must be a non-empty 1-D schedule")
    if len(sigmas) > 1 and not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing")
    return sigmas


def sample(denoise, noise_or_x: torch.Tensor, sigmas, cond, sampler: str, *,
           noise_sampler: Optional[NoiseSampler] = None, callback: Callback = None,
           eta: Optional[float] = None) -> torch.Tensor:
    """Run a sampler by name from the VP-space start `noise_or_x` at sigmas[0] to the VP-space result at
    sigmas[-1].

    The start is the noise itself for a full run (the reference's x_T = noise), or
    (x0 + sigma * noise) / sqrt(1 + sigma^2) with sigma = sigmas[0] for a partial (img2img) run.
    eta=None uses the sampler's own default (0 for ddim, 1 for euler_a and dpmpp_2m_sde).
    """
    spec = check_sampler(sampler, eta=eta)
    sigmas = _as_schedule(sigmas)
    if len(sigmas) == 1:
        return noise_or_x
    options = dict(spec.options)
    if spec.eta is not None:
        options["eta"] = spec.eta if eta is None else float(eta)
    x = noise_or_x * math.sqrt(1 + float(sigmas[0]) ** 2)
    x = spec.fn(denoise, x, sigmas, cond, noise_sampler=noise_sampler, callback=callback, **options)
    return x / math.sqrt(1 + float(sigmas[-1]) ** 2)


def run(denoise, noise: torch.Tensor, cond, sampler: str, *, steps: int, schedule: Optional[str] = None,
        eta: Optional[float] = None, generators: Optional[Sequence[torch.Generator]] = None,
        callback: Callback = None, start_latents: Optional[torch.Tensor] = None,
        strength: float = 1.0) -> torch.Tensor:
    """What a generating command runs for one batch; returns the VP latents at the schedule's end.

    `denoise` must expose the model's `sigmas` (DiscreteDenoiser and CFGDenoiser do). `noise` is the
    batch's start noise; `generators` (one per image, the ones that drew `noise`) keep drawing the fresh
    noise of ancestral/SDE steps. With `start_latents` the run is img2img-style: the schedule keeps its
    last int(strength * steps) steps and starts from start_latents noised to that level. eta None is the
    sampler's own; 0 is 0 (ldm.loading.families.resolve_eta gives a run's eta).
    """
    check_sampler(sampler, schedule, eta)
    sigmas = make_sigmas(schedule or sampler, denoise.sigmas, steps, strength if start_latents is not None else 1.0)
    start = noise
    if start_latents is None and schedule in START_AT_SIGMA:  # VE start sigma * noise (schedules.START_AT_SIGMA)
        sigma = float(sigmas[0])
        start = noise * (sigma / math.sqrt(1 + sigma ** 2))
    if start_latents is not None:
        sigma = float(sigmas[0])
        start = (start_latents + sigma * noise) / math.sqrt(1 + sigma ** 2)
    noise_sampler = None
    if generators is not None:
        noise_sampler = BatchedNoiseSampler(generators, noise.shape[1:], noise.device)
    return sample(denoise, start, sigmas, cond, sampler, noise_sampler=noise_sampler, callback=callback,
                  eta=eta)
