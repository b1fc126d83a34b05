"""The pool backend: N replica processes on this machine (`sd serve --replicas N`), each with its own model
and threads, fed from one queue held in the front process.

Order: a free replica takes the first queued job, unless another free replica already holds that job's
checkpoint (then that one takes it: checkpoint affinity) and it looks further down the queue. Each replica
loads the job's checkpoint when it holds another (a job's checkpoint is fixed when it was queued).

Between the front and a replica: a pipe (the job out; its steps, previews and result back) and three shared
values (interrupt and skip flags the replica reads every step, and when someone last watched the previews).
A replica that dies mid-job fails that job (JobFailed, a 500 naming the replica) and is started again; the
others go on meanwhile.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ldm.errors import SDError
from ldm.pipeline import Cancelled
from ldm.serve.jobs import Job, JobFailed, run_job

log = logging.getLogger("sd.serve")
START_SECONDS = 600  # a replica that has not loaded its model by then is taken for dead


@dataclass(frozen=True)
class ReplicaSpec:
    """How each replica loads its model: the front's pipeline's files and runtime settings."""
    ckpt: Optional[str]
    config: Optional[str]
    device: str = "auto"
    precision: str = "auto"
    threads: Optional[int] = None
    backend: str = "torch"
    trust_config: bool = False
    taesd: Optional[str] = None
    midas: Optional[str] = None
    preview_every: int = 0

    @classmethod
    def of(cls, pipeline, replicas: int, preview_every: int, midas=None) -> "ReplicaSpec":
        """The front's pipeline as loaded, its threads shared out between the replicas (--threads: each's)."""
        options = pipeline.options
        threads = options.threads or max(1, len(os.sched_getaffinity(0)) // replicas)
        taesd = str(pipeline.taesd.files[0]) if pipeline.taesd is not None else None
        return cls(str(pipeline.ckpt) if pipeline.ckpt else None, str(pipeline.config) if pipeline.config else None,
                   options.device, options.precision, threads, options.backend, options.trust_config, taesd,
                   str(midas) if midas else None, preview_every)


class Replica:
    """The front's side of one replica process: starts it (again after it died) and feeds it jobs."""

    def __init__(self, number: int, pool: "PoolBackend"):
        self.number, self.pool = number, pool
        self.holds: Optional[Path] = None  # the checkpoint its model is
        self.job: Optional[Job] = None
        self.up = False  # started and its model loaded
        self.process = None
        self.starts = 0
        self.died = False  # its process went away during the last job
        ctx = pool.context
        self.interrupt, self.skip, self.watched = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("d", 0.0)
        self.thread = threading.Thread(target=self._serve, name=f"sd-replica-{number}", daemon=True)
        self.thread.start()

    def _start(self):
        from ldm.serve.backends import replica

        ours, theirs = self.pool.context.Pipe()
        self.process = self.pool.context.Process(
            target=replica.main, args=(theirs, self.pool.spec, self.interrupt, self.skip, self.watched),
            name=f"sd-replica-{self.number}", daemon=True)
        self.process.start()
        theirs.close()
        self.starts += 1
        if not ours.poll(START_SECONDS):
            raise EOFError
        kind, *said = ours.recv()
        if kind != "ready":
            raise SDError(f"replica {self.number} could not load its model: {said[0]}")
        self.holds, self.up = Path(said[0]) if said[0] else None, True
        return ours

    def _serve(self) -> None:
        while not self.pool.closed:
            try:
                conn = self._start()
            except (EOFError, OSError, SDError) as exc:
                log.warning("replica %d did not start (%s); trying again in 5 s", self.number, exc or "it stopped")
                self._stop_process()
                time.sleep(5)
                continue
            self.died = False
            while not self.pool.closed and not self.died:
                job = self.pool.take(self)
                if job is None:
                    break
                run_job(job, lambda: self._run(conn, job))
                with self.pool.cond:
                    self.job = None
                    self.pool.cond.notify_all()
            self.up = False
            self._stop_process()
            if not self.pool.closed:
                log.warning("replica %d stopped; starting it again", self.number)

    def _run(self, conn, job: Job):
        """Send the job, follow its steps, return its (images, kept)."""
        with self.pool.cond:  # flags cleared before the job goes out (a late interrupt of the last job is dropped)
            self.interrupt.value = 1 if job.interrupted else 0
            self.skip.value = 0
        method = job.preview_method or self.pool.server.worker.preview_method
        try:
            conn.send(("run", str(job.checkpoint) if job.checkpoint else None, job.call, method))
            while True:
                kind, *said = conn.recv()
                if kind == "step":
                    job.step, job.steps = said[0], said[1]
                    if said[2] is not None:
                        job.preview, job.preview_step = said[2], said[0]
                    continue
                if kind == "loaded":
                    self.holds = Path(said[0]) if said[0] else None
                    job.ran_on = self.holds
                    continue
                if kind == "done":
                    return said[0]
                if kind == "cancelled":
                    stop = Cancelled(said[1])
                    stop.images = said[0]
                    raise stop
                raise SDError(said[0])  # "error": one line from the replica
        except (EOFError, OSError, BrokenPipeError):
            code = self.process.exitcode if self.process is not None else None
            if code is None and self.process is not None:
                self.process.join(2)
                code = self.process.exitcode
            self.died = True
            raise JobFailed(f"replica {self.number} stopped mid-job (exit code {code}); the job failed, the other "
                            "replicas go on") from None

    def _stop_process(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(5)

    def describe(self) -> dict:
        return {"replica": self.number, "kind": "process", "up": self.up,
                "pid": self.process.pid if self.process is not None and self.process.is_alive() else None,
                "checkpoint": self.pool.server.title(self.holds) if self.holds else None,
                "job": self.job.id if self.job is not None else None, "starts": self.starts}


class PoolBackend:
    def __init__(self, server, spec: ReplicaSpec, replicas: int):
        self.server, self.spec = server, spec
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks inherited
        self.cond = threading.Condition()
        self.pending: list[Job] = []
        self.closed = False
        self.members = [Replica(k, self) for k in range(replicas)]

    def submit(self, job: Job) -> None:
        with self.cond:
            self.pending.append(job)
            self.cond.notify_all()

    def take(self, replica: Replica) -> Optional[Job]:
        """The next job for a free replica (blocks until there is one; None once closed)."""
        with self.cond:
            while not self.closed:
                for job in self.pending:
                    if job.interrupted or job.checkpoint == replica.holds or not any(
                            r is not replica and r.up and r.job is None and r.holds == job.checkpoint
                            for r in self.members):
                        self.pending.remove(job)
                        replica.job, job.replica = job, replica.number
                        return job
                self.cond.wait(1.0)
            return None

    def tell(self, job: Job, flag: str) -> None:
        with self.cond:
            for replica in self.members:
                if replica.job is job:
                    (replica.interrupt if flag == "interrupted" else replica.skip).value = 1

    def want_preview(self) -> None:
        now = time.time()
        for replica in self.members:
            replica.watched.value = now

    def replicas(self) -> list[dict]:
        return [replica.describe() for replica in self.members]

    def wait_up(self, timeout: float = START_SECONDS) -> None:
        """Until every replica has loaded its model (tests, benchmarks)."""
        end = time.monotonic() + timeout
        while not all(r.up for r in self.members):
            if time.monotonic() > end:
                raise SDError(f"the replicas did not start within {timeout:.0f} s")
            time.sleep(0.05)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            pending, self.pending = self.pending, []
            self.cond.notify_all()
        for job in pending:
            job.interrupted = True
            run_job(job, lambda: ([], {}))
        for replica in self.members:
            replica.interrupt.value = 1
        for replica in self.members:
            replica._stop_process()
