"""A generating job on the server's worker: a request made ready for the pipeline (Prepared), run on the checkpoint
it names (generate). What every front end of the server hands the worker (the A1111 routes, the extras)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ldm.errors import SDError
from ldm.pipeline import Cancelled, GeneratedImage
from ldm.serve.a1111 import RequestError


@dataclass
class Prepared:
    """A request made ready for the pipeline: its settings after the A1111 options, styles and sizes, and
    what the response's info reports (the styles applied, the settings taken without effect)."""
    prompt: str
    settings: dict
    styles: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    checkpoint: Optional[str] = None  # override_settings.sd_model_checkpoint
    restore: bool = True  # override_settings_restore_afterwards
    preview: Optional[str] = None  # override_settings.show_progress_type, as Pipeline.preview's method


@dataclass
class Ran:
    """A generating job's outcome: its images, whether it was interrupted, and the checkpoint it ran on (read
    on the worker while the job held the model, so a switch queued behind it cannot change the answer)."""
    images: list[GeneratedImage]
    interrupted: bool
    ckpt: Path


def generate(server, prepared: Prepared, job) -> Ran:
    """Run a generating job on the worker, on the request's checkpoint if it names another (put back afterwards
    unless asked not to). An interrupt returns the images finished and the partial images of the running batch."""
    target = server.resolve(prepared.checkpoint) if prepared.checkpoint else None
    ran: dict = {}

    def on_model(pipe, progress):
        state = server.worker.state
        if state is not None:
            state.preview_method = prepared.preview
        previous = None
        if target is not None and not server.is_loaded(target):
            previous = (pipe.ckpt, pipe.config)
            server.load_into(pipe, target, serve=not prepared.restore)
        ran["ckpt"] = Path(pipe.ckpt)
        try:
            return job(pipe, progress)
        finally:
            if previous is not None and prepared.restore:
                pipe.load_model(*previous, quiet=True)

    try:
        return Ran(server.worker.run("generate", on_model), False, ran.get("ckpt", server.ckpt))
    except Cancelled as stop:
        return Ran(stop.images, True, ran.get("ckpt", server.ckpt))
    except SDError as exc:
        raise RequestError(str(exc)) from None
