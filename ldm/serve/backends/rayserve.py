"""The Ray backend: the replicas as a Ray Serve deployment (`sd serve --ray auto|ADDRESS --replicas N`;
`pip install 'sd[ray]'`), on this machine or across a Ray cluster.

The front keeps the job table and the queue's order: it sends at most as many jobs as there can be replicas,
in queue order, each as a streaming call whose reports (ldm.serve.backends.replica) come back step by step.
Each replica takes one job at a time (max_ongoing_requests=1); the job's checkpoint is its Serve multiplexed
model id, so Serve routes it to a replica that holds that checkpoint where one is free, and the replica loads it
otherwise (one model per replica). Interrupt and skip flags and the preview watch go through a small Ray actor
(the Board) that the replica reads every step; in Serve's local testing mode (tests) the Board is an object in
this process. A replica that dies fails its job (a 500 naming it); Serve starts another.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Optional

from ldm.errors import SDError
from ldm.serve.backends import JobQueue, replica
from ldm.serve.jobs import Job, JobFailed, run_job

log = logging.getLogger("sd.serve")
APP_NAME = "sd"


def need_ray():
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        raise SDError("sd serve --ray needs Ray Serve: pip install 'sd[ray]' (or pip install 'ray[serve]')") from None
    return ray


class Board:
    """Flags per job id, and when someone last watched the previews; a Ray actor in a cluster."""

    def __init__(self):
        self.flags: dict = {}
        self.seen = 0.0

    def set(self, job_id: str, flag: str) -> None:
        self.flags.setdefault(job_id, set()).add(flag)

    def take(self, job_id: str) -> tuple[bool, bool, float]:
        """(interrupted, skip (taken: once), watched)."""
        flags = self.flags.get(job_id, set())
        skip = "skipped" in flags
        flags.discard("skipped")
        return "interrupted" in flags, skip, self.seen

    def watch(self, when: float) -> None:
        self.seen = when

    def forget(self, job_id: str) -> None:
        self.flags.pop(job_id, None)


# Boards of Serve's local testing mode, by key: it copies a deployment's arguments, so the replica (in this
# process) is given the key and finds the front's Board here
LOCAL_BOARDS: dict[str, Board] = {}


def board_call(board, name: str, *args, wait: bool = True):
    """Board.<name>(*args) on a Ray actor's handle (waited for unless `wait` is off), or on the LOCAL_BOARDS
    Board of a key."""
    if isinstance(board, str):
        return getattr(LOCAL_BOARDS[board], name)(*args)
    pending = getattr(board, name).remote(*args)
    if wait:
        import ray

        return ray.get(pending)
    return None


class BoardFlags(replica.Flags):
    """A job's flags read from the Board (one call a step)."""

    def __init__(self, board, job_id: str):
        self.board, self.job_id, self.state = board, job_id, (False, False, 0.0)

    def interrupted(self) -> bool:
        self.state = board_call(self.board, "take", self.job_id)  # read once per step: interrupted comes first in on_step
        return self.state[0]

    def take_skip(self) -> bool:
        return self.state[1]

    def watched(self) -> float:
        return self.state[2]


def deployment(spec, *, replicas: int, min_replicas: Optional[int], max_replicas: Optional[int], gpus: float,
               multiplexed: bool = True):
    """The Serve deployment of sd's replicas (`multiplexed` off: Serve's local testing mode, which has no
    model multiplexing; the replica then loads the job's checkpoint itself)."""
    from ray import serve

    options: dict = {"name": "sd-replica", "max_ongoing_requests": 1,
                     "ray_actor_options": {"num_cpus": spec.threads or 1, "num_gpus": gpus}}
    if min_replicas is not None or max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": min_replicas if min_replicas is not None else 1,
                                         "max_replicas": max_replicas if max_replicas is not None else replicas,
                                         "target_ongoing_requests": 1}
    else:
        options["num_replicas"] = replicas

    @serve.deployment(**options)
    class SDReplica:
        def __init__(self, spec, board):
            self.spec, self.board = spec, board
            self.pipe = replica.load(spec)
            self.name = _replica_name()

        @serve.multiplexed(max_num_models_per_replica=1)
        async def model(self, ckpt: str):
            """The job's checkpoint in this replica's one pipeline (Serve routes by what each replica holds)."""
            await asyncio.to_thread(self._switch, ckpt)
            return self.pipe

        def _switch(self, ckpt: str) -> None:
            replica.hold(self.pipe, ckpt)

        async def run(self, job_id: str, ckpt: str, call, method: str):
            yield ("replica", self.name, os.getpid())
            try:
                if multiplexed:
                    pipe = await self.model(serve.get_multiplexed_model_id())
                else:
                    await asyncio.to_thread(self._switch, ckpt)
                    pipe = self.pipe
            except SDError as exc:
                yield ("error", str(exc))
                return
            loop, reports = asyncio.get_running_loop(), asyncio.Queue()
            flags = BoardFlags(self.board, job_id)
            running = loop.run_in_executor(None, replica.run, pipe, None, call, method, self.spec.preview_every,
                                           flags, lambda report: loop.call_soon_threadsafe(reports.put_nowait, report))
            while True:
                report = await reports.get()
                yield report
                if report[0] in ("done", "cancelled", "error"):
                    break
            await running

    return SDReplica


def _replica_name() -> str:
    from ray import serve

    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # local testing mode has no replica id
        return "local"


class RayBackend:
    def __init__(self, server, spec, replicas: int, address: str = "auto", *, local_testing: bool = False,
                 min_replicas: Optional[int] = None, max_replicas: Optional[int] = None):
        ray = need_ray()
        from ray import serve

        self.server, self.spec = server, spec
        self.local_testing = local_testing
        if local_testing:  # the Board in this process, found by its key (see LOCAL_BOARDS)
            self.board = f"board-{id(self)}"
            LOCAL_BOARDS[self.board] = Board()
        else:
            if not ray.is_initialized():
                ray.init(address=None if address == "auto" else address, include_dashboard=False,
                         log_to_driver=False)
            self.board = ray.remote(num_cpus=0)(Board).remote()
        gpus = 1.0 if spec.device.startswith("cuda") or (
            spec.device == "auto" and not local_testing and ray.cluster_resources().get("GPU", 0) > 0) else 0.0
        app = deployment(spec, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                         gpus=gpus, multiplexed=not local_testing).bind(spec, self.board)
        self.handle = serve.run(app, name=APP_NAME, route_prefix=None, _local_testing_mode=local_testing)
        self.slots = 1 if local_testing else (max_replicas or replicas)
        self.queue = JobQueue()
        self.running: dict[int, Job] = {}
        self.seen: dict[str, dict] = {}  # replica name -> {"checkpoint", "job"}
        for slot in range(self.slots):
            threading.Thread(target=self._serve, args=(slot,), name=f"sd-ray-{slot}", daemon=True).start()

    def submit(self, job: Job) -> None:
        self.queue.submit(job)

    def _serve(self, slot: int) -> None:
        while True:  # the first queued job, sent as soon as a slot is free; Serve picks the replica
            job = self.queue.take(lambda pending: pending[0] if pending else None)
            if job is None:
                return
            self.running[slot] = job
            run_job(job, lambda: self._run(job))
            self.running.pop(slot, None)
            self._forget(job.id)

    def _run(self, job: Job):
        import ray

        method = job.preview_method or self.server.worker.preview_method
        ckpt = str(job.checkpoint) if job.checkpoint else ""
        reports = self.handle.options(stream=True, multiplexed_model_id=ckpt).run.remote(job.id, ckpt, job.call, method)

        def loaded(path):
            self.seen[str(job.replica)] = {"checkpoint": path, "job": job.id, "pid": job.replica_pid}

        try:
            return replica.follow(job, iter(reports), loaded)
        except (ray.exceptions.RayError, EOFError) as exc:
            raise JobFailed(f"the Ray replica running it stopped ({type(exc).__name__}); the job failed, the other "
                            "replicas go on") from None

    def _forget(self, job_id: str) -> None:
        board_call(self.board, "forget", job_id, wait=False)

    def tell(self, job: Job, flag: str) -> None:
        board_call(self.board, "set", job.id, flag, wait=False)

    def want_preview(self) -> None:
        board_call(self.board, "watch", time.time(), wait=False)

    def replicas(self) -> list[dict]:
        running = {job.id for job in self.running.values()}
        return [{"replica": name, "kind": "ray", "up": True, "pid": seen["pid"],
                 "checkpoint": self.server.title(seen["checkpoint"]) if seen["checkpoint"] else None,
                 "job": seen["job"] if seen["job"] in running else None}
                for name, seen in sorted(self.seen.items())]

    def close(self) -> None:
        from ray import serve

        self.queue.close()
        for job in list(self.running.values()):
            self.tell(job, "interrupted")
        if self.local_testing:
            LOCAL_BOARDS.pop(self.board, None)
        else:
            try:
                serve.delete(APP_NAME)
            except Exception as exc:  # a cluster already gone: nothing left to stop
                log.warning("stopping the Ray deployment: %s", exc)
