"""A generating command's run: plan, load, sample every batch and save it under the reference layout.

`run_job(job)` is what `sd txt2img|img2img|inpaint|depth2img|upscale|variations` call once their flags are
parsed into a BatchJob (ldm.batch.job). With --from-image the request is first rebuilt from the image; with
--devices/--num-nodes/--accelerator the plan runs through Lightning's DDP predict loop
(ldm.batch.distributed), else in this process. The model is loaded once per process through ldm.pipeline;
everything a user can get wrong is checked before it is.
"""
from __future__ import annotations

import os
from pathlib import Path

from ldm.batch.job import BatchJob
from ldm.errors import SDError
from ldm.plan import make_plan
from ldm.tasks import task_sets_size


def check_launch(job: BatchJob) -> None:
    """Refuse to be one of several processes a launcher started without being told to share the run."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not job.distributed and world != "1":  # torchrun/SLURM started several of us: share, do not repeat
        raise SDError(f"this is one of {world} processes started by a launcher (WORLD_SIZE={world}): pass --devices "
                      "(processes per node) and --num-nodes so that they share the run")


def run_job(job: BatchJob) -> list[Path]:
    """Plan, sample, decode and save a run of any generating command; returns the sample paths written."""
    from ldm.batch import outputs

    task = job.request.task
    if job.from_image is not None:
        from ldm.batch.reproduce import job_from_image

        job = job_from_image(job)
    job = job.with_prompt_file()
    job.check()
    check_launch(job)
    sized = [line for line in job.request.lines if line.size is not None]
    if sized and task_sets_size(task):
        raise SDError(f"{sized[0].where}: \"size\" cannot be set for `sd {task.name}`: the input image gives the size")
    make_plan(job.request, job.names)  # image counts and seeds, checked before the model loads
    if job.distributed:
        from ldm.batch.distributed import run_distributed

        return run_distributed(job)
    outputs.prepare_outdir(job.outdir)
    session = job.open_session()
    outputs.write_side_outputs(job, session)
    return outputs.run_plan(job, session, make_plan(session.request, job.names))

