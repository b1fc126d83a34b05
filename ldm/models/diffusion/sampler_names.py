"""The samplers' and schedules' names and what each is for: a table without torch.

The command line's help, `sd samplers` and the checks made before a model loads read this table, so they
never import torch; ldm.models.diffusion.samplers and .schedules attach the functions to these names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ldm.errors import SDError


@dataclass(frozen=True)
class SamplerInfo:
    schedule: str  # default schedule name (SCHEDULE_INFO)
    description: str  # what it is good for, one line
    steps: int  # recommended number of steps
    eta: Optional[float] = None  # default eta for samplers that take one; None: deterministic
    options: Mapping[str, Any] = field(default_factory=dict)


SAMPLER_INFO: dict[str, SamplerInfo] = {
    "ddim": SamplerInfo("ddim_uniform", "the reference's default; first order, deterministic at "
                        "eta 0 (eta > 0 adds noise); needs about 50 steps", 50, eta=0.0),
    "plms": SamplerInfo("ddim_uniform", "the reference's --plms: multistep, one model call per "
                        "step, better than DDIM at 25-50 steps; also for v models", 30),
    "dpm": SamplerInfo("time_uniform", "the reference's --dpm: DPM-Solver++ 2M, "
                       "time-uniform; good images in 15-25 steps, robust with guidance", 20, options={"order": 2}),
    "dpm3": SamplerInfo("time_uniform", "DPM-Solver++ 3M: more accurate than dpm without "
                        "guidance; prefer dpm at high guidance scales", 20, options={"order": 3}),
    "euler": SamplerInfo("uniform", "Euler on the probability-flow ODE: simple and "
                         "deterministic, first order; 30-50 steps", 40),
    "euler_a": SamplerInfo("uniform", "Euler ancestral: fresh noise each step, "
                           "varied soft images; does not settle on one image as steps grow", 30, eta=1.0),
    "heun": SamplerInfo("uniform", "Heun: second order, two model calls per step; accurate "
                        "but slow", 20),
    "dpm2": SamplerInfo("uniform", "DPM2: second order, two model calls per step (midpoint "
                        "in log sigma)", 20),
    "dpmpp_2m": SamplerInfo("karras", "DPM++ 2M: second order multistep, one call per "
                            "step; the usual choice for 20-30 steps", 25),
    "dpmpp_2m_sde": SamplerInfo("karras", "DPM++ 2M SDE: second order with fresh "
                                "noise; detailed images in 25-30 steps", 25, eta=1.0),
}

# schedule name -> one-line description
SCHEDULE_INFO: dict[str, str] = {
    "ddim_uniform": "the reference's DDIM/PLMS timesteps (every T/steps-th), ending at timestep 0",
    "time_uniform": "DPM-Solver's uniform-in-time spacing (the reference's --dpm), ending at timestep 0",
    "logsnr": "DPM-Solver's uniform-in-logSNR spacing, ending at timestep 0",
    "karras": "Karras et al. rho=7 spacing, dense at low noise, ending at 0",
    "exponential": "uniform in log(sigma), ending at 0",
    "uniform": "uniform in timestep (A1111/ComfyUI \"normal\"), ending at 0",
}


def check_sampler(sampler: str, schedule: Optional[str] = None, eta: Optional[float] = None) -> SamplerInfo:
    """The sampler's spec, after checking the names and that eta fits it (SDError otherwise)."""
    if sampler not in SAMPLER_INFO:
        raise SDError(f"unknown sampler '{sampler}' (one of {', '.join(SAMPLER_INFO)}; `sd samplers` describes them)")
    if schedule is not None and schedule not in SCHEDULE_INFO:
        raise SDError(f"unknown schedule '{schedule}' (one of {', '.join(SCHEDULE_INFO)})")
    spec = SAMPLER_INFO[sampler]
    if eta and spec.eta is None:
        stochastic = ", ".join(name for name, s in SAMPLER_INFO.items() if s.eta is not None)
        raise SDError(f"sampler '{sampler}' is deterministic and takes no eta (got {eta}); eta applies to {stochastic}")
    return spec
