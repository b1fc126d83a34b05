"""One model, one job at a time: the server's queue in front of a Pipeline.

Every request that touches the model (a generation from the page or the API, a model switch) is a job
run by the one worker thread, in arrival order. `progress()` reports the running job and how many wait;
`interrupt()` stops the running job after its current step (the pipeline raises Cancelled, with the
images of the batches already done).
"""
from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
import time
from typing import Any, Callable, Optional

from ldm.pipeline import Pipeline, Progress
from ldm.serve.jobs import Job, JobState, run_job


WATCH_SECONDS = 3.0  # previews are made this long after the last want_preview


class Worker:
    """Runs jobs `fn(pipeline, progress)` one after the other on one thread."""

    def __init__(self, pipeline: Pipeline, before: Optional[Callable[[Pipeline], None]] = None, preview_every: int = 0):
        self.pipeline, self.before = pipeline, before  # before(pipeline): run ahead of every job but "unload"
        # make a live preview every this many steps (0: never; every step for the cheap previews), while someone
        # watches (want_preview): a full VAE decode costs about two UNet steps at 512 on a CPU, TAESD's much less,
        # and no unwatched job should pay either
        self.preview_every = preview_every
        # how previews are made (Pipeline.preview): "cheap" costs next to nothing, so it shows every step
        self.preview_method = "cheap"
        self._watched = float("-inf")  # time.monotonic() of the last want_preview
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._numbers = itertools.count(1)
        self.state: Optional[JobState] = None
        threading.Thread(target=self._loop, name="sd-worker", daemon=True).start()

    def submit(self, name: str, fn: Callable[[Pipeline, Callable[[Progress], None]], Any],
               job: Optional[Job] = None) -> concurrent.futures.Future:
        """Queue a job; its future gives fn's result or raises its exception. A table's Job (`job`) is its own
        state while it runs (its steps, preview and flags), its future the job's."""
        future = job.future if job is not None else concurrent.futures.Future()
        with self._lock:
            self._waiting += 1
        self._jobs.put((name, fn, future, job))
        return future

    def run(self, name: str, fn) -> Any:
        """Queue a job and wait for it."""
        return self.submit(name, fn).result()

    def _loop(self) -> None:
        while True:
            name, fn, future, job = self._jobs.get()
            with self._lock:
                self._waiting -= 1
                self.state = job if job is not None else JobState(job=name, job_no=next(self._numbers))
                self.state.started = time.time()

            def execute():
                if self.before is not None and name not in ("unload", "reload"):
                    self.before(self.pipeline)
                return fn(self.pipeline, self._on_step)

            if job is not None:
                run_job(job, execute)
            elif future.set_running_or_notify_cancel():
                try:
                    future.set_result(execute())
                except BaseException as exc:  # the job's error is its caller's, never the worker's
                    future.set_exception(exc)
            with self._lock:
                self.state = None

    def _on_step(self, progress: Progress) -> None:
        state = self.state
        if state is None:
            return
        state.step, state.steps, state.denoised = progress.step, progress.total, progress.denoised
        if isinstance(state, Job):
            state.stepped()
        if state.interrupted:  # an interrupt that came before the job's sampling started
            self.pipeline.cancel()
        method = state.preview_method or self.preview_method
        every = min(self.preview_every, 1) if method == "cheap" else self.preview_every
        watched = time.monotonic() - self._watched < WATCH_SECONDS
        if every and watched and progress.step % every == 0 and progress.step < progress.total:
            # the current x0 shown as A1111's live preview (unwatermarked)
            state.preview, state.preview_step = self.pipeline.preview(progress.denoised, method), progress.step

    def want_preview(self) -> None:
        """Someone shows the live preview (the page's poll, /progress without skip_current_image): decode them
        for the next WATCH_SECONDS."""
        self._watched = time.monotonic()

    def interrupt(self) -> bool:
        """Stop the running job after its current step; False when nothing runs."""
        return self._tell("interrupted", self.pipeline.cancel)

    def skip(self) -> bool:
        """End the running job's current batch after its step (its partial images kept, the next batch runs);
        False when nothing runs."""
        return self._tell("skipped", self.pipeline.skip)

    def _tell(self, flag: str, act: Callable[[], None]) -> bool:
        state = self.state
        if state is None:
            return False
        setattr(state, flag, True)
        act()
        return True

    def progress(self) -> tuple[Optional[JobState], int]:
        """(the running job's state or None, how many jobs wait)."""
        with self._lock:
            return self.state, self._waiting
