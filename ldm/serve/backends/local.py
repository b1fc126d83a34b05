"""The local backend: the server's worker thread runs every job on the front's own pipeline, after the jobs
and model switches queued before it (one FIFO: ldm.serve.worker)."""
from __future__ import annotations

from pathlib import Path

from ldm.serve.jobs import Job


class LocalBackend:
    def __init__(self, server):
        self.server = server

    @property
    def worker(self):
        return self.server.worker

    def submit(self, job: Job) -> None:
        self.worker.submit(job.job, lambda pipe, progress: self._run(job, pipe, progress), job=job)

    def _run(self, job: Job, pipe, progress):
        """The job on the worker's pipeline; a checkpoint the request named is loaded for it (put back after
        it unless the request asked to keep it, as A1111's override_settings_restore_afterwards)."""
        server, previous = self.server, None
        job.replica = 0
        if job.override and not server.is_loaded(job.checkpoint):
            previous = (pipe.ckpt, pipe.config)
            server.load_into(pipe, job.checkpoint, serve=not job.restore)
        job.ran_on = Path(pipe.ckpt)
        try:
            return job.call(pipe, progress)
        finally:
            if previous is not None and job.restore:
                pipe.load_model(*previous, quiet=True)

    def tell(self, job: Job, flag: str) -> None:
        if self.worker.state is job:
            (self.worker.pipeline.cancel if flag == "interrupted" else self.worker.pipeline.skip)()

    def want_preview(self) -> None:
        self.worker.want_preview()

    def replicas(self) -> list[dict]:
        state = self.worker.state
        return [{"replica": 0, "kind": "local", "up": True, "pid": None,
                 "checkpoint": self.server.title(self.server.pipeline.ckpt) if self.server.pipeline.model else None,
                 "job": getattr(state, "id", None) or (state.job if state is not None else None)}]

    def close(self) -> None:
        self.worker.interrupt()
