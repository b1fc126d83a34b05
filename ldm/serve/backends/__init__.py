"""Where the server's jobs run: one small interface, two backends.

A backend takes the JobTable's jobs (ldm.serve.jobs.Job) and runs each one on a model:

    submit(job)        run it (in queue order); set its status, steps, preview and future as it goes
    tell(job, flag)    "interrupted" or "skipped": the running job stops after its step / ends its batch
    want_preview()     someone watches the live previews: make them for the next few seconds
    replicas()         each replica: its number, whether it is up, the checkpoint it holds, its job
    close()            stop: queued jobs never start

- local.py: the server's one worker thread in this process (the default);
- pool.py: N replica processes on this machine (`sd serve --replicas N`), each with its own model and threads,
  fed from one queue in the front process, preferring a replica that holds the job's checkpoint.
"""
from __future__ import annotations

from typing import Protocol

from ldm.serve.jobs import Job


class Backend(Protocol):
    def submit(self, job: Job) -> None: ...

    def tell(self, job: Job, flag: str) -> None: ...

    def want_preview(self) -> None: ...

    def replicas(self) -> list[dict]: ...

    def close(self) -> None: ...
