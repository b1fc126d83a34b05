"""Scale-out: a run's plan through PyTorch Lightning's predict loop with the DDP strategy.

Every process loads the model once (LightningModule.setup), rank 0 fixes the run (base, manifest, what
is left: outputs.begin_run) and broadcasts it, and each process then samples whole batches, rank r the
batches todo[r::world], writing its images itself under names from the global index, so nothing
collides and nothing passes through rank 0. After a barrier rank 0 merges the manifest and makes the
grid. No gradients flow, so Lightning does not wrap anything in DistributedDataParallel; the process
group (gloo on CPU, NCCL on GPUs) is used for the broadcast and the barriers only.

Launchers. On one machine Lightning's own launcher starts processes 1..N-1 by running the current
command line again (`sys.argv`, i.e. `sd txt2img ...` from the console script) with LOCAL_RANK set; the
new processes see that and join instead of launching. Under torchrun or SLURM the processes are started
by the cluster and Lightning only joins them (pass --devices = processes per node and --num-nodes =
nodes). Because the relaunch re-runs sys.argv, a Python caller that calls run_job (or ldm.cli.main with
its own argv) from inside another program must set the job's devices to None (one process) or start
its processes itself with torchrun.

Byte identity. A process computes each image in the batch the plan gave it, as a one-process run does.
On CPU the float results also depend on the number of intra-op threads; Lightning gives each of N local
processes cores/N threads unless OMP_NUM_THREADS is set, so runs that must match byte for byte set
OMP_NUM_THREADS to the same value.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.errors import SDError

if TYPE_CHECKING:
    from ldm.batch.job import BatchJob

# How long a process waits for the others at a barrier or broadcast. Loading a large checkpoint on a
# slow shared file system can take minutes; sampling never happens inside a collective.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def lightning_accelerator(job: "BatchJob") -> str:
    """--accelerator, or the one --device implies (cpu -> cpu, cuda -> gpu, auto -> auto)."""
    chosen = job.accelerator
    if chosen is None:
        device = job.runtime.device
        chosen = "cpu" if device == "cpu" else "gpu" if str(device).startswith("cuda") else "auto"
    return "gpu" if chosen == "cuda" else chosen


def check_relaunch(job: "BatchJob", command: str) -> None:
    """Refuse a run whose other processes Lightning would start by re-running a foreign command line.

    Lightning's launcher starts processes 1..N-1 by running sys.argv again; from inside another program
    (a notebook, a test runner) that would start copies of that program instead of `sd`.
    """
    launched_outside = any(name in os.environ for name in ("LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"))
    if launched_outside or (job.devices or 1) * job.num_nodes == 1:
        return
    if not any(command in Path(arg).name for arg in sys.argv[:2]):
        raise SDError(f"--devices {job.devices} starts the other processes by running this program's command line "
                      f"again, which is not `sd {command}` here ({Path(sys.argv[0]).name}); run sd from a shell, "
                      "or start the processes with torchrun")


def run_distributed(job: "BatchJob") -> list[Path]:
    """Run `job` with `job.devices` processes on each of `job.num_nodes` nodes; returns this process's files.
    Each process plans the job after loading its model (the plan may need the model's native size)."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DDPStrategy

    from ldm.lightning import quiet_lightning

    check_relaunch(job, job.request.task.name)
    # Lightning's hints about workers and predict's return value are noise here: the files are the output.
    quiet_lightning(".*does not have many workers.*", ".*predict_dataloader.*", ".*predict returned None.*")
    accelerator = lightning_accelerator(job)
    module = _plan_module(pl)(job)
    strategy = DDPStrategy(process_group_backend="gloo" if accelerator == "cpu" else None, timeout=COLLECTIVE_TIMEOUT)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=job.devices or ("auto" if accelerator != "cpu" else 1),
        num_nodes=job.num_nodes, strategy=strategy, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[_interrupt_callback(pl)(module)],
    )
    try:
        trainer.predict(module, return_predictions=False)
    except SystemExit:  # Lightning's answer to Ctrl-C is sys.exit(1): make it the interrupt it was
        if module.interrupted:
            raise KeyboardInterrupt from None
        raise
    runner = module.runner
    if runner is None:  # predict never reached setup (nothing to do cannot happen: setup always runs)
        raise SDError("the distributed run did not start")
    trainer.strategy.barrier("sd-run-finished")  # every process has written its images
    if trainer.global_rank == 0:
        runner.finish(processes=trainer.world_size)
    return runner.written


def _plan_module(pl):
    """The LightningModule class (built here so importing this module does not import Lightning)."""
    from torch.utils.data import DataLoader

    from ldm.batch import outputs
    from ldm.plan import make_plan

    class PlanModule(pl.LightningModule):
        """predict_step(b) samples batch b of the plan and writes its images; no nn parameters of its own."""

        # Some processes may have no batch left (more processes than batches, or a resumed run).
        allow_zero_length_dataloader_with_multiple_devices = True

        def __init__(self, job):
            super().__init__()
            self.job, self.plan = job, None
            self.runner = None
            self.interrupted = False

        def setup(self, stage: str) -> None:
            strategy = self.trainer.strategy
            # The session holds the model outside the module's children, so Lightning neither moves nor
            # broadcasts its weights: each process loads the checkpoint itself onto its own device.
            session = self.job.open_session(device=strategy.root_device)
            self.plan = make_plan(session.request, self.job.names)
            decided = None
            if self.global_rank == 0:
                try:
                    outputs.write_side_outputs(self.job, session)
                    decided = outputs.begin_run(self.job, session, self.plan, processes=self.trainer.world_size)
                except SDError as exc:  # tell the other processes instead of leaving them at the broadcast
                    decided = str(exc)
            decided = strategy.broadcast(decided, src=0)
            if isinstance(decided, str):
                raise SDError(decided)
            self.runner = outputs.PlanRunner(self.job, session, self.plan, decided, rank=self.global_rank,
                                             world=self.trainer.world_size)

        def predict_dataloader(self):
            # Each process iterates its own share of batch numbers; nothing is collated or moved.
            return DataLoader(self.runner.share, batch_size=None, shuffle=False, num_workers=0)

        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            self.runner.run_batch(int(batch))

    return PlanModule


def _interrupt_callback(pl):
    class NoteInterrupt(pl.Callback):
        def __init__(self, module):
            self.module = module

        def on_exception(self, trainer, pl_module, exception):
            if isinstance(exception, KeyboardInterrupt):
                self.module.interrupted = True
                if self.module.runner is not None:
                    self.module.runner.note_interrupted()

    return NoteInterrupt
