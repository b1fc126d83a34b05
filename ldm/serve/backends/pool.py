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
from ldm.serve.backends import JobQueue
from ldm.serve.backends.replica import follow, main as replica_main
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
        ours, theirs = self.pool.context.Pipe()
        self.process = self.pool.context.Process(
            target=replica_main, args=(theirs, self.pool.spec, self.interrupt, self.skip, self.watched),
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
                said = str(exc) or "it stopped while loading"
                log.warning("replica %d did not start (%s); trying again in 5 s", self.number, said)
                self._stop_process()
                self.pool.fail_waiting(f"no replica is up: replica {self.number} did not start ({said})")
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

        def reports():
            while True:
                yield conn.recv()

        try:
            conn.send(("run", str(job.checkpoint) if job.checkpoint else None, job.call, method))
            return follow(job, reports(), self._holding)
        except (EOFError, OSError):
            code = self.process.exitcode if self.process is not None else None
            if code is None and self.process is not None:
                self.process.join(2)
                code = self.process.exitcode
            self.died = True
            raise JobFailed(f"replica {self.number} stopped mid-job (exit code {code}); the job failed, the other "
                            "replicas go on") from None

    def _holding(self, path: Optional[Path]) -> None:
        self.holds = path

    def _stop_process(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(5)

    def describe(self) -> dict:
        return {"replica": self.number, "kind": "process", "up": self.up,
                "pid": self.process.pid if self.process is not None and self.process.is_alive() else None,
                "checkpoint": self.pool.server.title(self.holds) if self.holds else None,
                "job": self.job.id if self.job is not None else None, "starts": self.starts}


def _fail(why: str):
    raise JobFailed(why)


class PoolBackend:
    def __init__(self, server, spec: ReplicaSpec, replicas: int):
        self.server, self.spec = server, spec
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks inherited
        self.queue = JobQueue()
        self.cond = self.queue.cond
        self.members = [Replica(k, self) for k in range(replicas)]

    @property
    def closed(self) -> bool:
        return self.queue.closed

    def submit(self, job: Job) -> None:
        self.queue.submit(job)

    def take(self, replica: Replica) -> Optional[Job]:
        """The next job for a free replica (blocks until there is one; None once closed): the first queued one
        unless another free replica holds its checkpoint."""
        def choose(pending: list[Job]) -> Optional[Job]:
            for job in pending:
                if job.interrupted or job.checkpoint == replica.holds or not any(
                        r is not replica and r.up and r.job is None and r.holds == job.checkpoint
                        for r in self.members):
                    replica.job, job.replica = job, replica.number
                    return job
            return None

        return self.queue.take(choose)

    def fail_waiting(self, why: str) -> None:
        """While no replica is up, the queued jobs fail with `why` rather than wait for ever."""
        with self.cond:
            if any(r.up for r in self.members):
                return
            waiting, self.queue.pending = self.queue.pending, []
        for job in waiting:
            run_job(job, lambda: _fail(why))

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
        self.queue.close()
        for replica in self.members:
            replica.interrupt.value = 1
        for replica in self.members:
            replica._stop_process()
