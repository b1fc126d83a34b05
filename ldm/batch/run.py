"""A generating command's run: plan, load, sample every batch and save it under the reference layout.

`run_job(job, task)` is what `sd txt2img|img2img|inpaint|depth2img|upscale` call once their flags are
parsed. With --from-image the job is first rebuilt from the image; with --devices/--num-nodes/--accelerator
the plan runs through Lightning's DDP predict loop (ldm.batch.distributed), else in this process. The
model is loaded once per process through ldm.pipeline; everything a user can get wrong is checked
before it is.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ldm.errors import SDError
from ldm.plan import STAND_IN_SIZE, Job, make_plan
from ldm.tasks import Task, Txt2Img, task_sets_size


def check_launch(job: Job) -> None:
    """Refuse to be one of several processes a launcher started without being told to share the run."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not job.distributed and world != "1":  # torchrun/SLURM started several of us: share, do not repeat
        raise SDError(f"this is one of {world} processes started by a launcher (WORLD_SIZE={world}): pass --devices "
                      "(processes per node) and --num-nodes so that they share the run")


def run_job(job: Job, task: Optional[Task] = None) -> list[Path]:
    """Plan, sample, decode and save a run of any generating command; returns the sample paths written."""
    from ldm.batch import outputs

    task = task or Txt2Img()
    if job.from_image is not None:
        from ldm.batch.reproduce import job_from_image

        job = job_from_image(job, task.name, sized=not task_sets_size(task), mode_fields=task.reproduce)
    job.check()
    check_launch(job)
    task.check(job)
    sized = [line for line in job.prompt_lines() if line.size is not None]
    if sized and task_sets_size(task):
        raise SDError(f"{sized[0].where}: \"size\" cannot be set for `sd {task.name}`: the input image gives the size")
    make_plan(job.sized(STAND_IN_SIZE))  # image counts and seeds, checked before the model loads
    if job.distributed:
        from ldm.batch.distributed import run_distributed

        return run_distributed(job, task)
    outputs.prepare_outdir(job.outdir)
    from ldm.pipeline import Pipeline

    session = Pipeline.open_session(job, task)
    outputs.write_side_outputs(session)
    return outputs.run_plan(session, make_plan(session.job))


