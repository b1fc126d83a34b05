"""Where the server's jobs run: one small interface, three backends.

A backend takes the JobTable's jobs (ldm.serve.jobs.Job) and runs each one on a model:

    submit(job)        run it (in queue order); set its status, steps, preview and future as it goes
    tell(job, flag)    "interrupted" or "skipped": the running job stops after its step / ends its batch
    want_preview()     someone watches the live previews: make them for the next few seconds
    replicas()         each replica: its number, whether it is up, the checkpoint it holds, its job
    close()            stop: queued jobs never start

- local.py: the server's one worker thread in this process (the default);
- pool.py: N replica processes on this machine (`sd serve --replicas N`), each with its own model and threads,
  fed from one queue in the front process, preferring a replica that holds the job's checkpoint;
- rayserve.py: the replicas as a Ray Serve deployment (`sd serve --ray ...`), on this machine or a cluster.
Both remote ones run a job with replica.py and queue with JobQueue (below).
"""
from __future__ import annotations

import threading
from typing import Callable, Optional, Protocol

from ldm.serve.jobs import Job, run_job


class Backend(Protocol):
    def submit(self, job: Job) -> None: ...

    def tell(self, job: Job, flag: str) -> None: ...

    def want_preview(self) -> None: ...

    def replicas(self) -> list[dict]: ...

    def close(self) -> None: ...


class JobQueue:
    """The remote backends' queue in the front: jobs in queue order until a replica takes one."""

    def __init__(self):
        self.cond = threading.Condition()
        self.pending: list[Job] = []
        self.closed = False

    def submit(self, job: Job) -> None:
        with self.cond:
            self.pending.append(job)
            self.cond.notify_all()

    def take(self, choose: Callable[[list[Job]], Optional[Job]]) -> Optional[Job]:
        """The job `choose` picks from the queued ones (called under the queue's lock), once there is one;
        None once closed."""
        with self.cond:
            while not self.closed:
                job = choose(self.pending)
                if job is not None:
                    self.pending.remove(job)
                    return job
                self.cond.wait(1.0)
            return None

    def close(self) -> None:
        """No job starts any more: the queued ones end as interrupted, with no images."""
        with self.cond:
            self.closed = True
            pending, self.pending = self.pending, []
            self.cond.notify_all()
        for job in pending:
            job.interrupted = True
            run_job(job, lambda: ([], {}))
