"""A replica: a model of its own that runs the front's jobs one at a time, reporting each step (and a preview
while someone watches) and the result. Both remote backends use these pieces: the pool's replica process
(main, below) and Ray Serve's deployment (rayserve.py).

Reports, in order: ("loaded", checkpoint), ("step", step, steps, preview or None)..., then one of ("done",
(images, kept)), ("cancelled", images, message), ("error", one line). The front reads them with `follow`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from ldm.pipeline import Cancelled


class Flags:
    """What the front tells a running job (read every step): interrupted, skip (taken once), and when someone
    last watched the previews (time.time())."""

    def interrupted(self) -> bool: ...

    def take_skip(self) -> bool: ...

    def watched(self) -> float: ...


def load(spec):
    """The replica's pipeline as the front's was loaded (ReplicaSpec)."""
    from ldm.pipeline import Pipeline

    pipe = Pipeline.load(spec.ckpt, spec.config, device=spec.device, precision=spec.precision, threads=spec.threads,
                         backend=spec.backend, trust_config=spec.trust_config, taesd=spec.taesd, quiet=True)
    if spec.midas:
        pipe.load_midas(spec.midas)
    return pipe


def hold(pipe, ckpt: Optional[str]) -> None:
    """The replica's pipeline on `ckpt` (loaded when it holds another; None or "": whatever it holds)."""
    if ckpt and (pipe.ckpt is None or Path(ckpt).resolve() != Path(pipe.ckpt).resolve()):
        pipe.switch_model(ckpt)


def run(pipe, ckpt, call, method: str, preview_every: int, flags: Flags, report: Callable[[tuple], None]) -> None:
    """One job on this replica: its checkpoint loaded when another is held, then the call; every report sent."""
    from ldm.errors import SDError
    from ldm.serve.worker import WATCH_SECONDS

    try:
        hold(pipe, ckpt)
        report(("loaded", str(pipe.ckpt) if pipe.ckpt else None))
        every = min(preview_every, 1) if method == "cheap" else preview_every

        def on_step(progress) -> None:
            if flags.interrupted():  # every step: an interrupt that came before sampling began holds too
                pipe.cancel()
            if flags.take_skip():
                pipe.skip()
            preview = None
            if every and time.time() - flags.watched() < WATCH_SECONDS and progress.step % every == 0 \
                    and progress.step < progress.total:
                preview = pipe.preview(progress.denoised, method)
            report(("step", progress.step, progress.total, preview))

        report(("done", call(pipe, on_step)))
    except Cancelled as stop:
        report(("cancelled", stop.images, str(stop)))
    except SDError as exc:
        report(("error", str(exc)))
    except Exception as exc:  # a bug: the job fails with its name, the replica goes on
        import traceback

        traceback.print_exc()
        report(("error", f"{type(exc).__name__}: {exc}"))


def follow(job, reports: Iterator[tuple], on_loaded: Callable[[Path], None] = lambda path: None):
    """The front reads a job's reports into the job (steps, preview, the checkpoint it ran on) and returns its
    (images, kept), raises Cancelled with the images kept, or SDError with the replica's one line."""
    from ldm.errors import SDError

    for kind, *said in reports:
        if kind == "step":
            job.step, job.steps = said[0], said[1]
            if said[2] is not None:
                job.preview, job.preview_step = said[2], said[0]
            job.stepped()
        elif kind == "replica":  # which replica runs it, and its process (Ray's; the pool knows its own)
            job.replica, job.replica_pid = said[0], said[1]
        elif kind == "loaded":
            job.ran_on = Path(said[0]) if said[0] else None
            on_loaded(job.ran_on)
        elif kind == "done":
            return said[0]
        elif kind == "cancelled":
            stop = Cancelled(said[1])
            stop.images = said[0]
            raise stop
        else:
            raise SDError(said[0])
    raise EOFError("the replica's reports ended without a result")


class SharedFlags(Flags):
    """The pool's flags: values shared with the front process."""

    def __init__(self, interrupt, skip, watched):
        self.interrupt, self.skip, self.seen = interrupt, skip, watched

    def interrupted(self) -> bool:
        return bool(self.interrupt.value)

    def take_skip(self) -> bool:
        if self.skip.value:
            self.skip.value = 0
            return True
        return False

    def watched(self) -> float:
        return self.seen.value


def main(conn, spec, interrupt, skip, watched) -> None:
    """A pool replica process: load, say ready, then run each job the front sends down the pipe."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front's: it stops the replicas itself
    from ldm.errors import SDError

    try:
        pipe = load(spec)
    except SDError as exc:
        conn.send(("failed", str(exc)))
        return
    conn.send(("ready", str(pipe.ckpt) if pipe.ckpt else None))
    flags = SharedFlags(interrupt, skip, watched)
    while True:
        try:
            kind, ckpt, call, method = conn.recv()
        except (EOFError, OSError):
            return  # the front has gone
        run(pipe, ckpt, call, method, spec.preview_every, flags, conn.send)
