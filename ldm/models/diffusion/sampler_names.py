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
    label: str = ""  # AUTOMATIC1111's name (what infotexts and its API say); sd's own name where A1111 has none


SAMPLER_INFO: dict[str, SamplerInfo] = {
    "ddim": SamplerInfo("ddim_uniform", "the reference's default; first order, deterministic at "
                        "eta 0 (eta > 0 adds noise); needs about 50 steps", 50, eta=0.0, label="DDIM"),
    "plms": SamplerInfo("ddim_uniform", "the reference's --plms: multistep, one model call per "
                        "step, better than DDIM at 25-50 steps; also for v models", 30, label="PLMS"),
    "dpm": SamplerInfo("time_uniform", "the reference's --dpm: DPM-Solver++ 2M, "
                       "time-uniform; good images in 15-25 steps, robust with guidance", 20, options={"order": 2},
                       label="DPM-Solver"),
    "dpm3": SamplerInfo("time_uniform", "DPM-Solver++ 3M: more accurate than dpm without "
                        "guidance; prefer dpm at high guidance scales", 20, options={"order": 3},
                        label="DPM-Solver 3"),
    "euler": SamplerInfo("uniform", "Euler on the probability-flow ODE: simple and "
                         "deterministic, first order; 30-50 steps", 40, label="Euler"),
    "euler_a": SamplerInfo("uniform", "Euler ancestral: fresh noise each step, "
                           "varied soft images; does not settle on one image as steps grow", 30, eta=1.0,
                           label="Euler a"),
    "heun": SamplerInfo("uniform", "Heun: second order, two model calls per step; accurate "
                        "but slow", 20, label="Heun"),
    "dpm2": SamplerInfo("uniform", "DPM2: second order, two model calls per step (midpoint "
                        "in log sigma)", 20, label="DPM2"),
    "dpmpp_2m": SamplerInfo("karras", "DPM++ 2M: second order multistep, one call per "
                            "step; the usual choice for 20-30 steps", 25, label="DPM++ 2M"),
    "dpmpp_2m_sde": SamplerInfo("karras", "DPM++ 2M SDE: second order with fresh "
                                "noise; detailed images in 25-30 steps", 25, eta=1.0,
                                label="DPM++ 2M SDE"),
}

# schedule name -> one-line description
SCHEDULE_INFO: dict[str, str] = {
    "ddim_uniform": "the reference's DDIM/PLMS timesteps (every T/steps-th), ending at timestep 0",
    "time_uniform": "DPM-Solver's uniform-in-time spacing (the reference's --dpm), ending at timestep 0",
    "logsnr": "DPM-Solver's uniform-in-logSNR spacing, ending at timestep 0",
    "karras": "Karras et al. rho=7 spacing, dense at low noise, ending at 0",
    "exponential": "uniform in log(sigma), ending at 0",
    "uniform": "uniform in timestep (A1111/ComfyUI \"normal\"), ending at 0",
    "trailing": "diffusers' trailing timesteps from T-1 (how SD-Turbo runs: 1 step [999], 4 [999, 749, 499, 249]), "
                "ending at 0",
    "sgm_uniform": "A1111's SGM Uniform: n timesteps evenly from T-1, leaving out t = 0, then 0",
    "turbo": "ComfyUI's SDTurboScheduler: n of the timesteps 999, 899, ..., 99 from the top (img2img starts at "
             "10 - int(10 x strength)), then 0; at most 10 steps",
}


# AUTOMATIC1111's schedule type labels for sd's schedules; schedules it has no name for keep sd's. Its
# "Normal" (uniform timesteps) is read as uniform, "Automatic" as the sampler's own.
SCHEDULE_LABELS: dict[str, str] = {"ddim_uniform": "DDIM", "karras": "Karras", "exponential": "Exponential",
                                   "uniform": "Uniform", "time_uniform": "time_uniform", "logsnr": "logsnr",
                                   "sgm_uniform": "SGM Uniform", "trailing": "Trailing", "turbo": "Turbo"}
SCHEDULE_READ_ALSO: dict[str, Optional[str]] = {"normal": "uniform", "automatic": None}


def sampler_label(sampler: str) -> str:
    """AUTOMATIC1111's name of an sd sampler ("dpmpp_2m" -> "DPM++ 2M")."""
    return SAMPLER_INFO[sampler].label


def schedule_label(schedule: Optional[str]) -> Optional[str]:
    """AUTOMATIC1111's schedule type of an sd schedule ("karras" -> "Karras"); None stays None."""
    return None if schedule is None else SCHEDULE_LABELS[schedule]


def sampler_of_name(name: str, schedule: Optional[str] = None) -> tuple[str, Optional[str]]:
    """(sd's sampler, sd's schedule or None) from names in either spelling: sd's ("dpmpp_2m", "karras")
    or A1111's ("DPM++ 2M", "Karras"), its older combined names too ("DPM++ 2M Karras"); SDError naming
    an unknown one."""
    labels = {info.label: key for key, info in SAMPLER_INFO.items()}
    sampler, schedule = (name if name in SAMPLER_INFO else labels.get(name)), schedule_of_name(schedule)
    if sampler is None and name.endswith(" Karras") and name[:-len(" Karras")] in labels:
        sampler, schedule = labels[name[:-len(" Karras")]], schedule or "karras"  # "Automatic" keeps Karras
    if sampler is None:
        raise SDError(f"unknown sampler '{name}' (one of {', '.join(SAMPLER_INFO)}, or A1111's "
                      f"{', '.join(labels)})")
    return sampler, schedule


def schedule_of_name(name: Optional[str]) -> Optional[str]:
    """sd's schedule (None: the sampler's own) from a schedule type in either spelling."""
    if name in (None, "") or name in SCHEDULE_INFO:
        return name or None
    by_label = {label.lower(): key for key, label in SCHEDULE_LABELS.items()}
    found = by_label.get(name.lower(), SCHEDULE_READ_ALSO.get(name.lower(), ""))
    if found == "":
        raise SDError(f"unknown schedule type '{name}' (one of {', '.join(SCHEDULE_INFO)}, or A1111's "
                      f"{', '.join(dict.fromkeys(SCHEDULE_LABELS.values()))})")
    return found


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
