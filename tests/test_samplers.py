"""Samplers, schedules and the denoiser contract.

Three kinds of evidence:
- agreement with independent VP-space transcriptions of the reference's DDIM, PLMS and DPM-Solver
  formulas (written here from the reference's equations, not from our VE-space code) and with
  diffusers' schedulers configured the same way, on a small fake discrete-timestep model;
- the analytic Gaussian problem (benchmarks/sampler_accuracy.py), where the exact denoiser and the exact
  probability-flow ODE solution are known: pinned convergence orders, final mean and std;
- per-image reproducibility of the stochastic samplers' noise.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.sampler_accuracy import (MU, S, exact_ode, gaussian_denoiser, run_analytic, sd_model_sigmas,
                                         slope)
from ldm.errors import SDError
from ldm.models.diffusion import samplers
from ldm.models.diffusion.denoiser import CFGDenoiser, DiscreteDenoiser
from ldm.models.diffusion.schedules import (SCHEDULES, ddim_uniform_timesteps, karras, make_schedule,
                                            sigma_to_t, sigmas_from_timesteps, t_to_sigma, trim_for_strength)

T = 1000


def sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class FakeModel:
    """A discrete-timestep model with the LatentDiffusion surface the denoiser uses.

    Its output is a smooth nonlinear function of x_t, t and every conditioning tensor, computed per
    image, so batching cond and uncond together cannot change any image's result.
    """

    def __init__(self, parameterization: str = "eps"):
        self.alphas_cumprod = sd_alphas_cumprod()
        self.parameterization = parameterization
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def apply_model(self, x_t, t, cond):
        self.calls.append((x_t.clone(), t.clone()))
        shift = cond["c_crossattn"].mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        if cond.get("c_concat") is not None:
            shift = shift + 0.3 * cond["c_concat"].mean(dim=1, keepdim=True)
        if cond.get("c_adm") is not None:
            shift = shift + 0.1 * cond["c_adm"].reshape(-1, 1, 1, 1)
        tt = t.to(x_t.dtype).reshape(-1, 1, 1, 1)
        return 0.6 * torch.tanh(1.3 * x_t + shift) * torch.cos(0.004 * tt) + 0.3 * torch.sin(0.01 * tt) + 0.2 * x_t


def make_cond(batch: int, seed: int = 0, concat: bool = False, adm: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "c_crossattn": torch.randn((batch, 3, 5), generator=g),
        "c_concat": torch.randn((batch, 1, 4, 4), generator=g) if concat else None,
        "c_adm": torch.randn((batch,), generator=g) if adm else None,
    }


def start_noise(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, 2, 4, 4), generator=torch.Generator().manual_seed(seed))


def queued_noise(noises: list[torch.Tensor]):
    """A noise sampler that hands out the given tensors in order."""
    queue = list(noises)
    return lambda sigma, sigma_next: queue.pop(0)


# -- independent VP-space transcriptions of the reference's samplers ------------------------------------

def vp_eps_and_x0(model, x, t_model, a, cond):
    """Reference conversions: model output at VP x for alpha_cumprod a -> (eps, x0), in float64."""
    out = model.apply_model(x.float(), t_model, cond).double()
    if model.parameterization == "eps":
        eps = out
    else:
        eps = a.sqrt() * out + (1 - a).sqrt() * x
    return eps, (x - (1 - a).sqrt() * eps) / a.sqrt()


def reference_ddim(model, x, cond, timesteps, eta=0.0, noises=()):
    """DDIMSampler.p_sample_ddim: a_t = acp[t], a_prev = previous entry (acp[0] first)."""
    acp = model.alphas_cumprod.double()
    alphas = acp[timesteps]
    alphas_prev = torch.cat([acp[:1], acp[timesteps[:-1]]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    noises = list(noises)
    x = x.double()
    for index in reversed(range(len(timesteps))):
        t = torch.full((x.shape[0],), float(timesteps[index]))
        eps, x0 = vp_eps_and_x0(model, x, t, alphas[index], cond)
        a_prev, s = alphas_prev[index], sigmas[index]
        x = a_prev.sqrt() * x0 + (1 - a_prev - s ** 2).sqrt() * eps
        if eta > 0:
            x = x + s * noises.pop(0).double()
    return x


def reference_plms(model, x, cond, timesteps):
    """PLMSSampler.p_sample_plms: improved Euler first, then Adams-Bashforth 2/3/4 on eps."""
    acp = model.alphas_cumprod.double()
    alphas = acp[timesteps]
    alphas_prev = torch.cat([acp[:1], acp[timesteps[:-1]]])
    time_range = list(reversed(timesteps.tolist()))
    x = x.double()
    old_eps: list[torch.Tensor] = []

    def eps_at(x_, t_):
        return vp_eps_and_x0(model, x_, torch.full((x_.shape[0],), float(t_)), acp[t_], cond)[0]

    def x_prev_from(x_, e, index):
        a, a_prev = alphas[index], alphas_prev[index]
        x0 = (x_ - (1 - a).sqrt() * e) / a.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e

    for i, t in enumerate(time_range):
        index = len(time_range) - i - 1
        t_next = time_range[min(i + 1, len(time_range) - 1)]
        e_t = eps_at(x, t)
        if not old_eps:
            e_next = eps_at(x_prev_from(x, e_t, index), t_next)
            e_prime = (e_t + e_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev_from(x, e_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x


def reference_dpm_solver(model, x, cond, steps, order=2):
    """The reference's DPM_Solver(predict_x0=True).sample(method="multistep", skip_type="time_uniform",
    lower_order_final=True) on NoiseScheduleVP('discrete'): continuous t in [1/N, 1], log(alpha)
    piecewise linear in t, model time (t - 1/N) * 1000."""
    N = len(model.alphas_cumprod)
    log_alpha_table = 0.5 * model.alphas_cumprod.double().log().numpy()
    t_table = np.arange(1, N + 1) / N

    def log_alpha(t):
        return float(np.interp(t, t_table, log_alpha_table))

    def sigma_vp(t):
        return math.sqrt(1 - math.exp(2 * log_alpha(t)))

    def lam(t):
        return log_alpha(t) - math.log(sigma_vp(t))

    def x0_at(x_, t):
        a = torch.tensor(math.exp(2 * log_alpha(t)), dtype=torch.float64)
        t_in = torch.full((x_.shape[0],), (t - 1 / N) * 1000)
        return vp_eps_and_x0(model, x_, t_in, a, cond)[1]

    grid = np.linspace(1.0, 1 / N, steps + 1)
    x = x.double()
    ms, ts = [x0_at(x, grid[0])], [grid[0]]
    for step in range(1, steps + 1):
        step_order = min(order, step, steps + 1 - step) if steps < 15 else min(order, step)
        s, t = ts[-1], grid[step]
        h = lam(t) - lam(s)
        alpha_t = math.exp(log_alpha(t))
        x_new = sigma_vp(t) / sigma_vp(s) * x - alpha_t * math.expm1(-h) * ms[-1]
        if step_order >= 2:
            r0 = (lam(ts[-1]) - lam(ts[-2])) / h
            d1_0 = (ms[-1] - ms[-2]) / r0
        if step_order == 2:
            x_new = x_new - 0.5 * alpha_t * math.expm1(-h) * d1_0
        elif step_order == 3:
            r1 = (lam(ts[-2]) - lam(ts[-3])) / h
            d1_1 = (ms[-2] - ms[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x_new = (x_new + alpha_t * (math.expm1(-h) / h + 1) * d1
                     - alpha_t * ((math.expm1(-h) + h) / h ** 2 - 0.5) * d2)
        x = x_new
        ts.append(t)
        if step < steps:
            ms.append(x0_at(x, t))
    return x


@pytest.fixture
def reference_cond():
    return make_cond(2, seed=3)


# -- schedules --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 4, 5, 8, 10, 20, 25, 40, 50, 100, 125, 200, 250, 500])
def test_ddim_timesteps_equal_the_reference_when_steps_divide_T(steps):
    expected = np.asarray(list(range(0, T, T // steps))) + 1
    assert ddim_uniform_timesteps(T, steps).tolist() == expected.tolist()


@pytest.mark.parametrize("steps, expected", [
    (3, [1, 334, 667]),
    (7, [1, 143, 286, 429, 572, 715, 858]),
    (30, [1 + (k * 1000) // 30 for k in range(30)]),
])
def test_ddim_timesteps_for_other_step_counts_are_exactly_S_distinct_valid_timesteps(steps, expected):
    ts = ddim_uniform_timesteps(T, steps)
    assert ts.tolist() == expected
    assert len(set(ts.tolist())) == steps and ts.min() == 1 and ts.max() <= T - 1


def test_ddim_timesteps_extremes():
    assert ddim_uniform_timesteps(T, T - 1).tolist() == list(range(1, T))  # 999 steps: every t but 0
    for bad in (0, T, T + 1):
        with pytest.raises(SDError):
            ddim_uniform_timesteps(T, bad)


def test_sigma_t_mapping_is_log_linear_and_exact_on_the_table():
    model_sigmas = DiscreteDenoiser(FakeModel()).sigmas
    t = torch.arange(T, dtype=torch.float64)
    assert torch.equal(sigma_to_t(model_sigmas, model_sigmas), t)
    assert torch.equal(t_to_sigma(t, model_sigmas), model_sigmas)
    mid = (model_sigmas[:-1] * model_sigmas[1:]).sqrt()  # midpoint in log(sigma)
    torch.testing.assert_close(sigma_to_t(mid, model_sigmas), t[:-1] + 0.5, rtol=0, atol=1e-9)
    # outside the table: clamped
    assert sigma_to_t(torch.tensor([1e-4, 1e3]), model_sigmas).tolist() == [0.0, T - 1.0]


def test_reference_schedules_end_at_timestep_0_and_k_schedules_at_zero():
    model_sigmas = sd_model_sigmas()
    for name in SCHEDULES:
        steps = 9 if name == "turbo" else 12  # turbo picks from ten levels
        sigmas = make_schedule(name, model_sigmas, steps)
        assert sigmas.dtype == torch.float64 and len(sigmas) == steps + 1
        assert bool((sigmas[1:] < sigmas[:-1]).all()), name
        expected_end = float(model_sigmas[0]) if name in ("ddim_uniform", "time_uniform", "logsnr") else 0.0
        assert float(sigmas[-1]) == expected_end, name
    ddim = make_schedule("ddim_uniform", model_sigmas, 20)
    assert torch.equal(ddim[:-1], model_sigmas[torch.arange(951, 0, -50)])
    assert torch.equal(sigmas_from_timesteps(model_sigmas, torch.tensor([1, 501])), model_sigmas[[501, 1, 0]])
    tu = make_schedule("time_uniform", model_sigmas, 20)
    torch.testing.assert_close(sigma_to_t(tu, model_sigmas), torch.linspace(999, 0, 21, dtype=torch.float64))
    log_steps = make_schedule("logsnr", model_sigmas, 20).log().diff()
    torch.testing.assert_close(log_steps, log_steps[:1].expand(20))


def test_karras_values():
    rho, lo, hi = 7.0, 0.1, 10.0
    expected = [hi, (hi ** (1 / rho) / 2 + lo ** (1 / rho) / 2) ** rho, lo, 0.0]
    torch.testing.assert_close(karras(3, lo, hi), torch.tensor(expected, dtype=torch.float64))


def test_trim_for_strength_keeps_the_last_steps():
    sigmas = make_schedule("ddim_uniform", sd_model_sigmas(), 50)
    assert torch.equal(trim_for_strength(sigmas, 1.0), sigmas)
    assert torch.equal(trim_for_strength(sigmas, 0.8), sigmas[10:])  # int(0.8 * 50) = 40 steps
    assert torch.equal(trim_for_strength(sigmas, 0.0), sigmas[-1:])  # no step
    for bad in (-0.1, 1.5):
        with pytest.raises(SDError):
            trim_for_strength(sigmas, bad)


# -- the denoiser contract --------------------------------------------------------------------------------

@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_discrete_denoiser_converts_in_vp_space(parameterization):
    model = FakeModel(parameterization)
    denoise = DiscreteDenoiser(model)
    cond = make_cond(2)
    a = model.alphas_cumprod.double()[[999, 37]].reshape(-1, 1, 1, 1)
    x_vp = start_noise(2).double()
    x_ve = x_vp / a.sqrt()
    x0 = denoise(x_ve, ((1 - a) / a).sqrt().flatten(), cond)
    x_seen, t_seen = model.calls[-1]
    assert t_seen.tolist() == [999.0, 37.0]
    torch.testing.assert_close(x_seen, x_vp, rtol=0, atol=1e-12)
    out = model.apply_model(x_vp, torch.tensor([999.0, 37.0]), cond)
    if parameterization == "eps":
        expected = (x_vp - (1 - a).sqrt() * out) / a.sqrt()
    else:
        expected = a.sqrt() * x_vp - (1 - a).sqrt() * out
    torch.testing.assert_close(x0, expected, rtol=0, atol=1e-12)


def test_cfg_batches_cond_and_uncond_in_one_call_and_guides_once():
    model = FakeModel("v")
    inner = DiscreteDenoiser(model)
    cond, uncond = make_cond(2, seed=1, concat=True, adm=True), make_cond(2, seed=2, concat=True, adm=True)
    x, sigma = start_noise(2).double() * 3, torch.tensor([2.5, 0.7], dtype=torch.float64)
    guided = CFGDenoiser(inner, 7.5)(x, sigma, {"cond": cond, "uncond": uncond})
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 4
    x0_c, x0_u = inner(x, sigma, cond), inner(x, sigma, uncond)
    torch.testing.assert_close(guided, x0_u + 7.5 * (x0_c - x0_u), rtol=0, atol=1e-12)
    # scale 1 or no uncond: one plain call
    model.calls.clear()
    torch.testing.assert_close(CFGDenoiser(inner, 1.0)(x, sigma, {"cond": cond, "uncond": uncond}), x0_c)
    assert model.calls[0][0].shape[0] == 2
    with pytest.raises(ValueError):
        CFGDenoiser(inner, 3.0)(x, sigma, {"cond": cond, "uncond": make_cond(2, seed=2)})  # c_concat only in one


# -- agreement with the reference's formulas on the fake model --------------------------------------------

@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("steps, eta", [(10, 0.0), (10, 0.7), (7, 0.0), (20, 1.0)])
def test_ddim_reproduces_the_reference_vp_chain(parameterization, steps, eta, reference_cond):
    model = FakeModel(parameterization)
    denoise = DiscreteDenoiser(model)
    noise = start_noise(2)
    noises = [torch.randn(noise.shape, generator=torch.Generator().manual_seed(100 + k)) for k in range(steps)]
    sigmas = samplers.make_sigmas("ddim", denoise.sigmas, steps)
    ours = samplers.sample(denoise, noise, sigmas, reference_cond, "ddim", eta=eta, noise_sampler=queued_noise(noises))
    timesteps = torch.tensor([1 + (k * T) // steps for k in range(steps)])
    expected = reference_ddim(model, noise, reference_cond, timesteps, eta, noises)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-5)
    assert float(expected.abs().max()) > 0.5  # a real result, not a collapsed one


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("steps", [5, 20])
def test_plms_matches_the_reference_formulas(parameterization, steps, reference_cond):
    model = FakeModel(parameterization)
    denoise = DiscreteDenoiser(model)
    noise = start_noise(2)
    ours = samplers.sample(denoise, noise, samplers.make_sigmas("plms", denoise.sigmas, steps), reference_cond, "plms")
    expected = reference_plms(model, noise, reference_cond, torch.arange(0, T, T // steps) + 1)
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-5)
    # PLMS is not DDIM: the multistep combination changes the result
    ddim = samplers.sample(denoise, noise, samplers.make_sigmas("ddim", denoise.sigmas, steps), reference_cond, "ddim")
    assert float((ddim - ours).abs().max()) > 1e-3


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("order, steps", [(2, 10), (2, 20), (3, 12)])
def test_dpm_solver_matches_the_reference_formulas(parameterization, order, steps, reference_cond):
    model = FakeModel(parameterization)
    denoise = DiscreteDenoiser(model)
    noise = start_noise(2)
    name = "dpm" if order == 2 else "dpm3"
    ours = samplers.sample(denoise, noise, samplers.make_sigmas(name, denoise.sigmas, steps), reference_cond, name)
    expected = reference_dpm_solver(model, noise, reference_cond, steps, order)
    # The reference interpolates log(alpha) in t between timesteps, we interpolate log(sigma): the
    # schedules differ by < 1e-5 relative at the fractional timesteps, hence 1e-4 here.
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-4)


@pytest.fixture
def one_thread():
    """Tiny convolutions on a shared 2-core machine: one intra-op thread is fastest and never spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("parameterization, sampler", [("eps", "plms"), ("eps", "dpm"), ("v", "dpm")])
def test_reference_formulas_on_the_tiny_checkpoints(tiny_ckpts, one_thread, parameterization, sampler):
    """The same agreement on the tiny SD 2.x models (real UNet, random weights)."""
    model = tiny_ckpts[parameterization]["model"]
    denoise = DiscreteDenoiser(model)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    context = torch.randn((1, 77, 32), generator=torch.Generator().manual_seed(5))
    cond = {"c_crossattn": context, "c_concat": None, "c_adm": None}
    steps = 5  # divides T, so the reference timesteps are range(0, T, T // steps) + 1
    with torch.no_grad():
        ours = samplers.sample(denoise, noise, samplers.make_sigmas(sampler, denoise.sigmas, steps), cond, sampler)
        if sampler == "plms":
            expected = reference_plms(model, noise, cond, torch.arange(0, T, T // steps) + 1)
        else:
            expected = reference_dpm_solver(model, noise, cond, steps)
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-4)
    assert float((ours - noise).abs().mean()) > 0.1  # the model did move the sample


# -- agreement with diffusers' schedulers ------------------------------------------------------------------

def sd_betas() -> np.ndarray:
    return (np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=np.float64) ** 2).astype(np.float32)


def diffusers_loop(scheduler, model, noise, cond, timesteps, noises=None):
    """Run a diffusers DPM-Solver scheduler on the fake model (VP space throughout), with the model's own
    float32 alphas_cumprod (diffusers would otherwise take the cumprod in float32)."""
    scheduler.alphas_cumprod = model.alphas_cumprod.clone()
    scheduler.set_timesteps(timesteps=[int(t) for t in timesteps])
    x = noise.clone()
    queue = list(noises or [])
    for t in scheduler.timesteps:
        out = model.apply_model(x, torch.full((x.shape[0],), float(t)), cond)
        extra = {"variance_noise": queue.pop(0)} if noises else {}
        x = scheduler.step(out, t, x, **extra).prev_sample
    return x


@pytest.fixture(scope="module")
def diffusers_schedulers():
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler
    return DPMSolverMultistepScheduler, PNDMScheduler


@pytest.mark.parametrize("kind, diffusers_name", [("linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")])
def test_beta_schedules_equal_diffusers(kind, diffusers_name):
    """The reference's "linear" (SD's) and "cosine" (Nichol & Dhariwal's, betas capped at 0.999) betas are
    diffusers' "scaled_linear" and "squaredcos_cap_v2"; cosine's last beta is the cap, so alphas_cumprod
    ends near 0 (pure noise at t = 999)."""
    from diffusers import DDPMScheduler

    from ldm.modules.diffusionmodules.noise_schedule import make_beta_schedule

    betas = make_beta_schedule(kind, T, 0.00085, 0.012)
    expected = DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012,
                             beta_schedule=diffusers_name).betas
    np.testing.assert_allclose(betas, expected.double().numpy(), rtol=1e-6, atol=1e-9)
    if kind == "cosine":
        assert betas[-1] == 0.999 and np.cumprod(1 - betas)[-1] < 1e-8


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_plms_agrees_with_diffusers_pndm_for_eps_models(diffusers_schedulers, reference_cond):
    """diffusers' PNDM with skip_prk_steps is the reference's PLMS (its repeated first timestep is the
    improved-Euler start). For v-models they differ: PNDM combines raw v outputs and converts the
    combination with the current step's alpha, while the reference-style rule combines eps."""
    _, PNDMScheduler = diffusers_schedulers
    model = FakeModel("eps")
    denoise = DiscreteDenoiser(model)
    noise = start_noise(2)
    steps = 20
    pndm = PNDMScheduler(num_train_timesteps=T, trained_betas=sd_betas(), skip_prk_steps=True,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    pndm.alphas_cumprod = model.alphas_cumprod.clone()
    pndm.final_alpha_cumprod = model.alphas_cumprod[0].clone()
    pndm.set_timesteps(steps)
    x = noise.clone()
    for t in pndm.timesteps:
        x = pndm.step(model.apply_model(x, torch.full((2,), float(t)), reference_cond), t, x).prev_sample
    ours = samplers.sample(denoise, noise, samplers.make_sigmas("plms", denoise.sigmas, steps), reference_cond, "plms")
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy-2 warning
@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("sampler, order, steps", [("dpm", 2, 10), ("dpm", 2, 16), ("dpm3", 3, 10),
                                                   ("dpm3", 3, 16), ("dpmpp_2m", 2, 10)])
def test_dpm_solver_agrees_with_diffusers(diffusers_schedulers, parameterization, sampler, order, steps,
                                         reference_cond):
    """Same step rule on the same integer timesteps: DPMSolverMultistepScheduler(dpmsolver++, midpoint,
    solver_order, lower_order_final, final sigma = that of timestep 0)."""
    DPMSolverMultistepScheduler, _ = diffusers_schedulers
    model = FakeModel(parameterization)
    denoise = DiscreteDenoiser(model)
    noise = start_noise(2)
    timesteps = torch.linspace(T - 1, 0, steps + 1).round().long()[:-1]
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=sd_betas(), solver_order=order, algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=(sampler != "dpmpp_2m"), final_sigmas_type="sigma_min",
        prediction_type="epsilon" if parameterization == "eps" else "v_prediction")
    expected = diffusers_loop(scheduler, model, noise, reference_cond, timesteps)
    sigmas = sigmas_from_timesteps(denoise.sigmas, timesteps)
    ours = samplers.sample(denoise, noise, sigmas, reference_cond, sampler)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_dpmpp_2m_sde_agrees_with_diffusers(diffusers_schedulers, parameterization, reference_cond):
    DPMSolverMultistepScheduler, _ = diffusers_schedulers
    model = FakeModel(parameterization)
    denoise = DiscreteDenoiser(model)
    noise = start_noise(2)
    steps = 16  # >= 15: diffusers keeps second order to the end, as k-diffusion's rule does
    timesteps = torch.linspace(T - 1, 0, steps + 1).round().long()[:-1]
    noises = [torch.randn(noise.shape, generator=torch.Generator().manual_seed(50 + k)) for k in range(steps)]
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=sd_betas(), solver_order=2, algorithm_type="sde-dpmsolver++",
        solver_type="midpoint", final_sigmas_type="sigma_min",
        prediction_type="epsilon" if parameterization == "eps" else "v_prediction")
    expected = diffusers_loop(scheduler, model, noise, reference_cond, timesteps, noises)
    sigmas = sigmas_from_timesteps(denoise.sigmas, timesteps)
    ours = samplers.sample(denoise, noise, sigmas, reference_cond, "dpmpp_2m_sde", noise_sampler=queued_noise(noises))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


# -- the analytic Gaussian problem ------------------------------------------------------------------------

# Observed orders on the logSNR-uniform schedule (uniform steps in log sigma), steps 20, 40, 80: the
# error of the final sample against the exact ODE solution falls as steps^-order. The DPM-Solver family
# is second order globally, dpm3 included: as in the reference, its first step is first order, and the
# reference's third-order multistep update is itself only O(h^3) locally (see the next test).
PINNED_ORDERS = {"ddim": 0.98, "euler": 0.98, "plms": 2.05, "dpm": 1.95, "dpm3": 2.22, "heun": 2.04,
                 "dpm2": 2.03, "dpmpp_2m": 1.95}


@pytest.mark.parametrize("sampler", sorted(PINNED_ORDERS))
def test_convergence_order_on_the_analytic_problem(sampler):
    steps = [20, 40, 80]
    errors = [run_analytic(sampler, n, schedule="logsnr", dims=16)["ode_error"] for n in steps]
    assert slope(steps, errors) == pytest.approx(PINNED_ORDERS[sampler], abs=0.03)


@pytest.mark.parametrize("order, expected_local_order", [(1, 2), (2, 3), (3, 3)])
def test_dpm_solver_update_local_error_order(order, expected_local_order):
    """One multistep update from exact history (equal steps h in lambda): the local error's order.

    Orders 1 and 2 give O(h^2) and O(h^3). The reference's order-3 formula (the same in diffusers and
    k-diffusion) weights D2 = (D1_0 - D1_1) / (r0 + r1), which is about h^2 x0''/2, with the
    coefficient of h^2 x0'', so its local error stays O(h^3): third-order accuracy would need twice
    that term. We keep the reference's definition (it matches diffusers to 1e-4 above).
    """
    denoise = gaussian_denoiser()
    x_ref = torch.tensor([[MU + 1.7]], dtype=torch.float64)  # VE state at sigma_ref on the exact ODE path
    sigma_ref = 0.8
    errors, hs = [], [0.2, 0.1, 0.05]
    for h in hs:
        levels = [sigma_ref * math.exp(k * h) for k in range(order - 1, -1, -1)]  # oldest first
        xs = [exact_ode(x_ref, sigma_ref, s) for s in levels]
        x0s = [denoise(x, torch.tensor([s], dtype=torch.float64)) for x, s in zip(xs, levels)]
        sigma_next = sigma_ref * math.exp(-h)
        x_next = samplers._dpm_solver_update(xs[-1], sigma_ref, sigma_next, x0s, [-math.log(s) for s in levels], order)
        errors.append(float((x_next - exact_ode(x_ref, sigma_ref, sigma_next)).abs()))
    assert slope([1 / h for h in hs], errors) == pytest.approx(expected_local_order, abs=0.1)


# Relative error of the final std at the recommended step count and default schedule (seed 1, 30000
# dims). Data std 0.3 is small next to SD's sigma range, which makes the low-noise end decisive: the
# reference's time-uniform DPM-Solver schedule takes its last step from t=50 straight to t=0.
PINNED_STD_ERRORS = {"ddim": 0.0775, "plms": 0.0208, "dpm": 0.1501, "dpm3": 0.1713, "euler": 0.1073,
                     "euler_a": 0.2165, "heun": 0.0344, "dpm2": 0.0983, "dpmpp_2m": 0.0097, "dpmpp_2m_sde": 0.0204}


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
def test_every_sampler_reaches_the_data_law(sampler):
    """Default schedule: the pinned std error at the recommended steps, and the right mean and std with
    8x as many steps (the mean's statistical noise is about 0.006)."""
    steps = samplers.SAMPLERS[sampler].steps
    result = run_analytic(sampler, steps, dims=30_000, seed=1)
    assert result["std_error"] == pytest.approx(PINNED_STD_ERRORS[sampler], rel=0.02)
    assert result["mean_error"] < 0.025
    fine = run_analytic(sampler, 8 * steps, dims=30_000, seed=1)
    assert fine["std_error"] < 0.06 and fine["std_error"] < result["std_error"] / 2
    assert fine["mean_error"] < 0.025


def test_stochastic_samplers_converge_in_law():
    """Karras schedule, 15 to 120 steps: euler_a's std bias falls as 1 / steps, dpmpp_2m_sde's faster,
    down to the statistical noise (about 0.004 at 30000 dims)."""
    steps = [15, 30, 60, 120]
    euler_a = [run_analytic("euler_a", n, schedule="karras", dims=30_000, seed=2)["std_error"] for n in steps]
    assert slope(steps, euler_a) == pytest.approx(0.92, abs=0.1)
    sde = [run_analytic("dpmpp_2m_sde", n, schedule="karras", dims=30_000, seed=2)["std_error"] for n in steps]
    assert sde[0] > 0.04 and sde[1] > 0.015 and max(sde[2:]) < 0.008


def test_ddim_inversion_round_trip():
    denoise = gaussian_denoiser()
    model_sigmas = sd_model_sigmas()
    x0 = MU + S * torch.randn((1, 4096), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = {}
    for steps in (25, 50, 100):
        sigmas = samplers.make_sigmas("ddim", model_sigmas, steps)
        for refine in (0, 3):
            x_T = samplers.encode_ddim(denoise, x0, sigmas, None, refine=refine)
            back = samplers.sample(denoise, x_T, sigmas, None, "ddim")
            errors[steps, refine] = float((back - x0).abs().max()) / S
    # One call per step: the round trip error falls as 1 / steps. With 3 fixed-point refinements
    # each decoding step is inverted almost exactly.
    assert slope([25, 50, 100], [errors[n, 0] for n in (25, 50, 100)]) == pytest.approx(0.9, abs=0.15)
    assert errors[100, 0] < 0.3
    assert errors[50, 3] < 1e-3 and errors[100, 3] < 1e-4


# -- seeds, noise and the entry points --------------------------------------------------------------------

def test_batched_noise_sampler_continues_each_images_stream():
    shape = (2, 4, 4)
    generators = [torch.Generator("cpu").manual_seed(s) for s in (11, 12)]
    start = torch.stack([torch.randn(shape, generator=g) for g in generators])
    fresh = samplers.BatchedNoiseSampler(generators, shape)(1.0, 0.5)
    solo = torch.Generator("cpu").manual_seed(12)
    assert torch.equal(start[1], torch.randn(shape, generator=solo))
    assert torch.equal(fresh[1], torch.randn(shape, generator=solo))
    by_seed = samplers.BatchedNoiseSampler([12], shape)
    assert torch.equal(by_seed.draw()[0], start[1])


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_sde", "ddim"])
def test_an_image_is_reproducible_alone_whatever_the_batch(sampler):
    model = FakeModel("v")
    denoise = CFGDenoiser(DiscreteDenoiser(model), 5.0)
    seeds = [7, 8, 9]

    def batch_run(items):
        generators = [torch.Generator("cpu").manual_seed(s) for s in items]
        noise = torch.stack([torch.randn((2, 4, 4), generator=g) for g in generators])
        c = make_cond(1, seed=20)["c_crossattn"].expand(len(items), -1, -1)
        u = torch.zeros_like(c)
        cond = {"cond": {"c_crossattn": c}, "uncond": {"c_crossattn": u}}
        return samplers.run(denoise, noise, cond, sampler, steps=8, eta=0.8 if sampler == "ddim" else None,
                            generators=generators)

    together, alone = batch_run(seeds), batch_run(seeds[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-6)
    assert float((together[0] - together[1]).abs().max()) > 0.1


def test_run_img2img_strength_trims_the_schedule_and_noises_to_its_start():
    model = FakeModel("eps")
    denoise = DiscreteDenoiser(model)
    cond = make_cond(2)
    noise, x0 = start_noise(2, seed=1), start_noise(2, seed=2)
    out = samplers.run(denoise, noise, cond, "dpmpp_2m", steps=10, start_latents=x0, strength=0.5)
    sigmas = samplers.make_sigmas("dpmpp_2m", denoise.sigmas, 10)[5:]
    s = float(sigmas[0])
    expected = samplers.sample(denoise, (x0 + s * noise) / math.sqrt(1 + s ** 2), sigmas, cond, "dpmpp_2m")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert len(model.calls) == 10 and len({float(t[0]) for _, t in model.calls}) == 5  # 5 steps per run
    # strength 0: no step; strength 1: the full schedule from x0 + sigma_max * noise
    assert torch.equal(samplers.run(denoise, noise, cond, "euler", steps=10, start_latents=x0, strength=0.0), x0)


def test_callback_sees_every_step():
    denoise = DiscreteDenoiser(FakeModel())
    seen = []
    samplers.run(denoise, start_noise(2), make_cond(2), "heun", steps=6, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(6))
    assert seen[0]["sigma"] == pytest.approx(float(denoise.sigmas[-1])) and seen[-1]["sigma_next"] == 0.0


def test_user_errors_are_one_line_sd_errors():
    with pytest.raises(SDError, match="unknown sampler 'lms'"):
        samplers.check_sampler("lms")
    with pytest.raises(SDError, match="unknown schedule"):
        samplers.check_sampler("euler", "cosine")
    with pytest.raises(SDError, match="deterministic"):
        samplers.check_sampler("plms", eta=0.5)
    assert samplers.check_sampler("plms", eta=0.0) is samplers.SAMPLERS["plms"]
    with pytest.raises(SDError):
        samplers.make_sigmas("nope", sd_model_sigmas(), 10)
    with pytest.raises(SDError):
        samplers.encode_ddim(gaussian_denoiser(), torch.zeros(1, 3), karras(5, 0.1, 10.0), None)


def test_registry_describes_every_sampler():
    for name, spec in samplers.SAMPLERS.items():
        assert spec.schedule in SCHEDULES and len(spec.description) > 20 and 10 <= spec.steps <= 50, name
        sigmas = samplers.make_sigmas(name, sd_model_sigmas(), spec.steps)
        assert len(sigmas) == spec.steps + 1
