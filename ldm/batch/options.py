"""The batch-job flags as Typer option types, for every generating command to declare once.

A command adds them as parameters (`skip_existing: bopt.SkipExisting = False`, ...) and passes them to
its ldm.plan.Job under the same names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

SkipExisting = Annotated[bool, typer.Option(
    "--skip-existing", "--skip_existing",
    help="Resume: skip images whose file already exists with the same parameters. Images are then named "
         "base + k (base fixed by the run's manifest), so the same command finishes an interrupted run.")]
Devices = Annotated[Optional[int], typer.Option(
    "--devices", help="Processes per node (Lightning DDP); each takes whole batches and writes its own files.")]
NumNodes = Annotated[int, typer.Option(
    "--num-nodes", "--num_nodes", help="Machines taking part (launch with torchrun or SLURM; see README).")]
Accelerator = Annotated[Optional[str], typer.Option(
    "--accelerator", help="cpu or gpu for the Lightning processes (default: from --device).")]
FromImage = Annotated[Optional[Path], typer.Option(
    "--from-image", "--from_image", help="Reproduce a PNG written by sd from its stored parameters (same pixels).")]

