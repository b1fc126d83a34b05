"""Jobs as data, and the one table of them.

A generating job is a Job: a pipeline call written as data (Call: a Pipeline method and its arguments, which
pickle, so a job can run in another process or on another machine), the checkpoint it runs on (fixed when it
is queued: POST /options changes the default of later jobs only), who asked (its owner), and its state as it
runs (step, preview, interrupt and skip flags: JobState). Every front end (the A1111 routes, the extras, the
page) makes Jobs and hands them to the server's JobTable, which gives each an id, keeps the queue's order and
the recent ones, and passes them to the backend (ldm.serve.backends) that runs them: the local worker thread,
or replica processes. /progress, /interrupt and /skip find the caller's job here.
"""
from __future__ import annotations

import concurrent.futures
import contextvars
import itertools
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ldm.errors import SDError
from ldm.pipeline import Cancelled, GeneratedImage
from ldm.serve.a1111 import RequestError

# who the running request is (set per HTTP request by the server's middleware: its Basic-auth user and its
# client address), so /progress and /interrupt act on the caller's own job
caller: contextvars.ContextVar[str] = contextvars.ContextVar("sd_caller", default="")
KEPT_ENDED = 256  # ended jobs kept for /internal/progress (by id)


@dataclass(eq=False)
class JobState:
    """What /progress and the page's bar show of a running job."""
    job: str = ""  # its kind: "txt2img", "page", "load"...
    job_no: int = 0  # the job's number since the server started
    step: int = 0
    steps: int = 0
    started: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    denoised: Any = field(default=None, repr=False)  # the last step's x0 latents (local worker only)
    preview: Any = field(default=None, repr=False)  # the latest live preview: PIL images of the running batch
    preview_step: int = 0  # the step it shows
    preview_method: Optional[str] = None  # this job's own (override_settings.show_progress_type); None: the server's


@dataclass(eq=False)
class Call:
    """A pipeline call as data: Pipeline.<method>(*args, progress=..., **kwargs). "generate" takes a Request
    (args[0]) and names; `keep` names attributes of its task to bring back beside the images (depth2img's
    depth map, which the page shows)."""
    method: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    keep: tuple = ()

    def __call__(self, pipe, progress) -> tuple[list[GeneratedImage], dict]:
        if self.method == "generate":
            request = self.args[0]
            images = pipe.generate(request, progress, **self.kwargs)
            return images, {name: getattr(request.task, name, None) for name in self.keep}
        if self.method not in CALLS:
            raise SDError(f"no pipeline call '{self.method}'")
        return getattr(pipe, self.method)(*self.args, progress=progress, **self.kwargs), {}


CALLS = ("txt2img", "img2img", "inpaint", "upscale", "depth2img", "variations")


@dataclass(eq=False)
class Job(JobState):
    """A generating job: its call, the checkpoint it runs on, whose it is, where it stands, and its outcome."""
    call: Optional[Call] = None
    id: str = ""
    checkpoint: Optional[Path] = None  # the file it runs on (None: whatever the local worker serves then)
    override: bool = False  # the request named its checkpoint (override_settings.sd_model_checkpoint)
    restore: bool = True  # the local worker puts its previous model back after an override
    owner: str = ""
    status: str = "queued"  # queued, running, done, interrupted, failed
    queued_at: float = 0.0
    ended_at: float = 0.0
    replica: Optional[int | str] = None  # which replica runs or ran it (a number; Ray's replica id)
    replica_pid: Optional[int] = None  # that replica's process, where the backend says
    ran_on: Optional[Path] = None  # the checkpoint it ran on (read while it held the model)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future, repr=False)
    on_step: Optional[Callable[["Job"], None]] = field(default=None, repr=False)  # told after every step

    def stepped(self) -> None:
        """The backend has recorded a step: tell whoever follows the job (ComfyUI's progress messages)."""
        if self.on_step is not None:
            self.on_step(self)

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")


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
    task_id: Optional[str] = None  # A1111's force_task_id: the id /internal/progress follows the job by


@dataclass
class Ran:
    """A generating job's outcome: its images, whether it was interrupted, the checkpoint it ran on (read
    while the job held the model, so a switch queued behind it cannot change the answer), and the task
    attributes its Call kept."""
    images: list[GeneratedImage]
    interrupted: bool
    ckpt: Path
    kept: dict = field(default_factory=dict)
    stopped: str = ""  # how an interrupt stopped it ("cancelled after step 3 of 150")


class JobTable:
    """The server's jobs: the ones queued and running in queue order, and the last KEPT_ENDED ended, by id.
    It numbers them, records who asked, and hands them to the backend; the backend sets their status."""

    def __init__(self, backend):
        self.backend = backend
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, Job] = OrderedDict()  # insertion = queue order
        self._numbers = itertools.count(1)

    def submit(self, job: Job) -> Job:
        """Queue a job (its id: the one given, unless a job of that id is still active; else a new one)."""
        with self._lock:
            if not job.id or job.id in self._jobs and self._jobs[job.id].active:  # a client's id, unless in use
                job.id = f"task({uuid.uuid4().hex[:15]})"
            self._jobs.pop(job.id, None)
            job.job_no, job.queued_at, job.owner = next(self._numbers), time.time(), job.owner or caller.get()
            self._jobs[job.id] = job
            self._forget()
        job.future.add_done_callback(lambda _: self._ended(job))
        self.backend.submit(job)
        return job

    def _ended(self, job: Job) -> None:
        job.ended_at = time.time()
        with self._lock:
            self._forget()

    def _forget(self) -> None:
        ended = [key for key, job in self._jobs.items() if not job.active]
        for key in ended[:max(0, len(ended) - KEPT_ENDED)]:
            del self._jobs[key]

    def find(self, job_id: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id)

    def active(self) -> list[Job]:
        """The queued and running jobs, in queue order."""
        with self._lock:
            return [job for job in self._jobs.values() if job.active]

    def running(self) -> list[Job]:
        return [job for job in self.active() if job.status == "running"]

    def position(self, job: Job) -> int:
        """How many queued jobs are ahead of this queued one (0: next)."""
        queued = [j for j in self.active() if j.status == "queued"]
        return queued.index(job) if job in queued else 0

    def of_caller(self, owner: Optional[str] = None) -> Optional[Job]:
        """The job a request without an id means: the caller's running job, else its first queued one, else
        the oldest running job (one machine's A1111 semantics: whatever runs)."""
        owner = caller.get() if owner is None else owner
        active = self.active()
        for wanted in (lambda j: j.owner == owner and j.status == "running",
                       lambda j: j.owner == owner, lambda j: j.status == "running"):
            mine = [job for job in active if wanted(job)]
            if mine:
                return mine[0]
        return None

    def interrupt(self, job: Optional[Job]) -> bool:
        """Stop a job: a queued one never starts (it answers with no images), a running one stops after its
        step. False when there is none."""
        return self._tell(job, "interrupted")

    def skip(self, job: Optional[Job]) -> bool:
        """End a running job's current batch after its step (its partial images kept)."""
        return self._tell(job, "skipped")

    def _tell(self, job: Optional[Job], flag: str) -> bool:
        if job is None or not job.active:
            return False
        setattr(job, flag, True)
        if job.status == "running":
            self.backend.tell(job, flag)
        return True

    def close(self) -> None:
        for job in self.active():
            self.interrupt(job)
        self.backend.close()


class JobFailed(Exception):
    """A job the server could not run through no fault of its request (its replica stopped mid-job): a 500."""


def run_job(job: Job, execute: Callable[[], tuple]) -> None:
    """A backend runs a job: execute() gives (images, kept); the status and the future are set here, the
    status first (whoever the future wakes reads the final one). A job interrupted while queued never starts."""
    if job.interrupted:
        job.status = "interrupted"
        job.future.set_result(([], {}))
        return
    job.status, job.started = "running", time.time()
    try:
        result = execute()
    except Cancelled as stop:
        job.status = "interrupted"
        job.future.set_exception(stop)
    except BaseException as exc:  # the job's error is its caller's, never the backend's
        job.status = "failed"
        job.future.set_exception(exc)
    else:
        job.status = "interrupted" if job.interrupted else "done"
        job.future.set_result(result)


def outcome(job: Job) -> Ran:
    """Wait for a job and read its outcome: the images (an interrupted job's too), or its one-line error."""
    try:
        images, kept = job.future.result()
        return Ran(images, job.interrupted, job.ran_on or job.checkpoint, kept)
    except Cancelled as stop:
        return Ran(stop.images, True, job.ran_on or job.checkpoint, stopped=str(stop))
    except RequestError:
        raise
    except SDError as exc:
        raise RequestError(str(exc)) from None


def generate(server, prepared: Prepared, call: Call, name: str = "generate") -> Ran:
    """Queue a generating job on the server's table, on the request's checkpoint if it names one (else the
    default the server serves now), and wait for it."""
    target = server.resolve(prepared.checkpoint) if prepared.checkpoint else None
    job = Job(job=name, call=call, id=prepared.task_id or "", checkpoint=target or server.ckpt,
              override=target is not None, restore=prepared.restore, preview_method=prepared.preview)
    return outcome(server.jobs.submit(job))
