"""`sd samplers`: the sampler names with what each is good for and how many steps it wants."""
from __future__ import annotations

from ldm.cli.app import app


@app.command("samplers", help="List the samplers (--sampler NAME) with their step-count advice.")
def samplers() -> None:
    from ldm.models.diffusion.sampler_names import SAMPLER_INFO as SAMPLERS, SCHEDULE_INFO as SCHEDULES

    width = max(len(name) for name in SAMPLERS)
    print(f"{'name':<{width}}  steps  schedule      what it is good for")
    for name, spec in SAMPLERS.items():
        print(f"{name:<{width}}  {spec.steps:>5}  {spec.schedule:<12}  {spec.description}")
    print(f"\n--schedule overrides the default schedule: {', '.join(SCHEDULES)}. "
          "--plms and --dpm are the reference's spellings of --sampler plms / dpm.")
