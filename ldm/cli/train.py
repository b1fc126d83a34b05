"""`sd train`: train what a training config describes (the demo model's stages, configs/demo/)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.cli.app import app


@app.command("train", help="Train a model stage from a training config (e.g. configs/demo/demo-autoencoder.yaml); "
             "writes a safetensors checkpoint in the original key layout.")
def train(
    config: Annotated[Path, typer.Option("--config", help="Training config: model, data and trainer sections.")],
    max_minutes: Annotated[Optional[float], typer.Option("--max-minutes", help="Stop after this long (overrides the config).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many optimizer steps.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", help="Checkpoint to write (overrides trainer.output).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the run (overrides trainer.seed).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (overrides trainer.threads).")] = None,
    init_from: Annotated[Optional[Path], typer.Option("--init-from", help="Continue from this checkpoint of the same model.")] = None,
    log: Annotated[Optional[Path], typer.Option("--log", help="Loss log CSV to write (overrides trainer.log).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a cut-off run from the training state beside "
                                         "its output (NAME.train-state.safetensors); without one, start.")] = False,
) -> None:
    from ldm.cli.entry import ready_for_interrupts
    from ldm.training.trainers import train as run

    ready_for_interrupts()
    path = run(config, max_minutes=max_minutes, max_steps=max_steps, output=output, seed=seed, threads=threads,
               init_from=init_from, resume=resume, log=log)
    print(f"wrote {path}")
