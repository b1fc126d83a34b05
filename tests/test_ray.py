"""The Ray backend (`sd serve --ray`): Ray Serve's local testing mode in `make test` (where ray is installed),
and a real local Ray cluster with two replicas in a slow test run by

    SD_RAY_CLUSTER=1 .venv/bin/python -m pytest tests/test_ray.py -k cluster

(docs/scale-out.md)."""
from __future__ import annotations

import os
import signal

import pytest
import requests

from tests.serving import serving
from tests.test_replicas import BODY, post, wait_for

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'sd[ray]')")


def demo_server(**ray):
    from ldm.pipeline import Pipeline
    from ldm.serve.app import Server

    pipe = Pipeline.load(device="cpu", precision="full", quiet=True)
    return Server(pipe, replicas=ray.pop("replicas", 1), preview_every=1, ray=ray)


@pytest.fixture(scope="module")
def local_ray():
    server = demo_server(local_testing=True)
    with serving(server) as (url, _):
        yield server, url
    server.jobs.close()


def test_a_ray_replica_draws_the_local_workers_picture(local_ray):
    from ldm.serve import api
    from ldm.serve.a1111 import Txt2ImgRequest
    from ldm.serve.app import Server

    server, url = local_ray
    reply = requests.post(f"{url}/sdapi/v1/txt2img", json={**BODY, "force_task_id": "r1"}, timeout=300)
    assert reply.status_code == 200, reply.text
    here = api.txt2img(Server(server.pipeline), Txt2ImgRequest(**BODY))
    assert reply.json()["images"] == here["images"] and reply.json()["info"] == here["info"]
    job = server.jobs.find("r1")
    assert job.status == "done" and job.step == job.steps == 4 and job.replica == "local"
    replicas = requests.get(f"{url}/sd/v1/replicas", timeout=10).json()
    assert [(r["kind"], r["checkpoint"]) for r in replicas] == [("ray", "demo.safetensors")]


def test_ray_jobs_keep_queue_order_progress_and_interrupt_by_id(local_ray):
    server, url = local_ray
    answers: dict = {}
    long = post(url, {**BODY, "steps": 400, "force_task_id": "r-long"}, answers, "long")
    wait_for(lambda: server.jobs.find("r-long") is not None and server.jobs.find("r-long").step >= 2)
    queued = post(url, {**BODY, "steps": 5, "force_task_id": "r-next"}, answers, "next")
    wait_for(lambda: server.jobs.find("r-next") is not None)
    seen = requests.post(f"{url}/internal/progress", json={"id_task": "r-next"}, timeout=10).json()
    assert seen["queued"] is True and seen["active"] is False  # one replica: behind the long job
    wait_for(lambda: requests.post(f"{url}/internal/progress", json={"id_task": "r-long"}, timeout=10).json()
             ["live_preview"] is not None)  # previews made by the replica while someone watches
    mine = requests.post(f"{url}/internal/progress", json={"id_task": "r-long"}, timeout=10).json()
    assert mine["active"] is True and mine["textinfo"].endswith("of 400")
    assert requests.post(f"{url}/sdapi/v1/interrupt", params={"id_task": "r-long"}, timeout=10).ok
    long.join(120)
    queued.join(120)
    first, second = server.jobs.find("r-long"), server.jobs.find("r-next")
    assert first.status == "interrupted" and first.step < 400 and len(answers["long"].json()["images"]) == 1
    assert second.status == "done" and second.step == 5 and second.started >= first.started


def test_ray_skip_ends_the_batch_and_the_next_runs(local_ray):
    server, url = local_ray
    answers: dict = {}
    job = post(url, {**BODY, "steps": 300, "n_iter": 2, "force_task_id": "r-skip"}, answers, "skip")
    wait_for(lambda: server.jobs.find("r-skip") is not None and server.jobs.find("r-skip").step >= 2)
    at = server.jobs.find("r-skip").step
    assert requests.post(f"{url}/sdapi/v1/skip", params={"id_task": "r-skip"}, timeout=10).ok
    wait_for(lambda: server.jobs.find("r-skip").step >= at + 5, 60)  # going on (in the second batch)
    assert requests.post(f"{url}/sdapi/v1/interrupt", params={"id_task": "r-skip"}, timeout=10).ok
    job.join(120)
    assert server.jobs.find("r-skip").status == "interrupted"
    assert len(answers["skip"].json()["images"]) == 2  # the skipped batch's partial image, then the second's


@pytest.mark.skipif(os.environ.get("SD_RAY_CLUSTER") != "1", reason="a real local Ray cluster takes a minute and "
                    "two cores: SD_RAY_CLUSTER=1 .venv/bin/python -m pytest tests/test_ray.py -k cluster")
def test_two_replicas_on_a_local_ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    server = demo_server(replicas=2)
    try:
        with serving(server) as (url, _):
            answers: dict = {}
            threads = [post(url, {**BODY, "steps": 300 if k == 0 else 10, "seed": k, "force_task_id": f"c{k}"},
                            answers, k) for k in range(4)]
            wait_for(lambda: server.jobs.find("c0") is not None and server.jobs.find("c0").step >= 2, 300)
            assert requests.post(f"{url}/sdapi/v1/interrupt", params={"id_task": "c0"}, timeout=10).ok
            for thread in threads:
                thread.join(300)
            jobs = [server.jobs.find(f"c{k}") for k in range(4)]
            assert [job.status for job in jobs] == ["interrupted", "done", "done", "done"]
            assert len({job.replica for job in jobs}) == 2  # both replicas ran jobs
            # a replica killed mid-job fails that job with one line; Serve starts another, and jobs go on
            doomed = post(url, {**BODY, "steps": 400, "force_task_id": "doomed"}, answers, "doomed")
            wait_for(lambda: server.jobs.find("doomed") is not None and server.jobs.find("doomed").step >= 2, 300)
            os.kill(server.jobs.find("doomed").replica_pid, signal.SIGKILL)
            doomed.join(120)
            assert answers["doomed"].status_code == 500
            assert "the Ray replica running it stopped" in answers["doomed"].json()["detail"]
            for k in range(3):
                assert requests.post(f"{url}/sdapi/v1/txt2img", json=BODY, timeout=300).status_code == 200
    finally:
        server.jobs.close()
        ray.shutdown()
