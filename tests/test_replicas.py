"""The pool backend (`sd serve --replicas N`): two demo-model replica processes behind one front, one queue.

Global queue order, per-job progress and interrupt by id (A1111's force_task_id and /internal/progress),
checkpoint affinity, a replica killed mid-job, and the same pixels as the local worker."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.serving import serving

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "demo" / "demo.safetensors"
CONFIG = ROOT / "configs" / "demo" / "demo-inference.yaml"
BODY = {"prompt": "a red circle", "seed": 3, "steps": 4, "width": 256, "height": 256, "sampler_name": "DDIM"}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from ldm.pipeline import Pipeline
    from ldm.serve.app import Server

    models = tmp_path_factory.mktemp("models")
    for name in ("demo", "second"):  # the same weights under another title: affinity is by file
        shutil.copy(DEMO, models / f"{name}.safetensors")
        shutil.copy(CONFIG, models / f"{name}.yaml")  # its config beside it, as A1111 reads it
    pipe = Pipeline.load(models / "demo.safetensors", device="cpu", precision="full", quiet=True)
    server = Server(pipe, models_dir=models, replicas=2, preview_every=1)
    server.jobs.backend.wait_up(300)
    with serving(server) as (url, _):
        yield server, url
    server.jobs.close()


def post(url: str, body: dict, answers: dict, key: str) -> threading.Thread:
    thread = threading.Thread(target=lambda: answers.__setitem__(
        key, requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300)))
    thread.start()
    return thread


def wait_for(condition, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_two_replicas_come_up_with_the_served_checkpoint(pool):
    server, url = pool
    replicas = requests.get(f"{url}/sd/v1/replicas", timeout=10).json()
    assert [(r["replica"], r["up"], r["checkpoint"], r["job"]) for r in replicas] == \
        [(0, True, "demo.safetensors", None), (1, True, "demo.safetensors", None)]
    assert len({r["pid"] for r in replicas} | {os.getpid()}) == 3  # two processes of their own


def test_a_replica_draws_the_local_workers_pixels(pool):
    from ldm.serve import api
    from ldm.serve.a1111 import Txt2ImgRequest
    from ldm.serve.app import Server

    server, url = pool
    reply = requests.post(f"{url}/sdapi/v1/txt2img", json=BODY, timeout=300)
    assert reply.status_code == 200, reply.text
    import torch

    local = Server(server.pipeline, models_dir=server.models_dir)  # the front's own model, its worker thread
    threads = torch.get_num_threads()
    torch.set_num_threads(server.jobs.backend.spec.threads)  # each replica's share of the cores (1 of 2 here)
    try:
        here = api.txt2img(local, Txt2ImgRequest(**BODY))
    finally:
        torch.set_num_threads(threads)
    assert reply.json()["info"] == here["info"]
    assert reply.json()["images"] == here["images"]  # the same PNG bytes (watermark and parameters included)


def test_the_queue_is_global_and_both_replicas_work(pool):
    server, url = pool
    answers: dict = {}
    threads = []
    for k in range(5):  # queued one after the other: they start in that order, two at a time
        threads.append(post(url, {**BODY, "seed": k, "steps": 6, "force_task_id": f"order-{k}"}, answers, k))
        wait_for(lambda: server.jobs.find(f"order-{k}") is not None)
    for thread in threads:
        thread.join(300)
    assert all(answers[k].status_code == 200 for k in range(5)), [answers[k].text for k in range(5)]
    jobs = [server.jobs.find(f"order-{k}") for k in range(5)]
    starts = [job.started for job in jobs]
    assert starts == sorted(starts)
    assert {job.replica for job in jobs} == {0, 1}
    assert [job.status for job in jobs] == ["done"] * 5


def test_progress_and_interrupt_follow_the_job_by_id(pool):
    server, url = pool
    answers: dict = {}
    long = post(url, {**BODY, "steps": 400, "force_task_id": "long"}, answers, "long")
    short = post(url, {**BODY, "steps": 30, "force_task_id": "short", "seed": 9}, answers, "short")
    wait_for(lambda: (server.jobs.find("long") or server.jobs.find("short")) is not None
             and all(server.jobs.find(i) is not None and server.jobs.find(i).step >= 2 for i in ("long", "short")))
    mine = requests.post(f"{url}/internal/progress", json={"id_task": "long", "id_live_preview": -1},
                         timeout=10).json()
    assert mine["active"] is True and mine["queued"] is False and mine["textinfo"].endswith("of 400")
    wait_for(lambda: requests.post(f"{url}/internal/progress", json={"id_task": "long"}, timeout=10).json()
             ["live_preview"] is not None)
    preview = requests.post(f"{url}/internal/progress", json={"id_task": "long"}, timeout=10).json()
    assert preview["live_preview"].startswith("data:image/png;base64,") and preview["id_live_preview"] >= 1
    assert requests.post(f"{url}/sdapi/v1/interrupt", params={"id_task": "long"}, timeout=10).json() == {}
    long.join(120)
    short.join(120)
    assert answers["long"].status_code == 200 and '"Interrupted"' not in answers["short"].text
    long_job, short_job = server.jobs.find("long"), server.jobs.find("short")
    assert long_job.status == "interrupted" and long_job.step < 400
    assert short_job.status == "done" and short_job.step == 30  # the other client's job ran to its end
    assert len(answers["short"].json()["images"]) == 1
    ended = requests.post(f"{url}/internal/progress", json={"id_task": "short"}, timeout=10).json()
    assert ended["completed"] is True and ended["active"] is False
    unknown = requests.post(f"{url}/sdapi/v1/interrupt", params={"id_task": "nobody"}, timeout=10)
    assert unknown.status_code == 404 and "no job 'nobody'" in unknown.json()["detail"]


def test_a_jobs_checkpoint_is_fixed_when_queued_and_replicas_keep_theirs(pool):
    server, url = pool
    second = {**BODY, "override_settings": {"sd_model_checkpoint": "second"}}
    assert requests.post(f"{url}/sdapi/v1/txt2img", json={**second, "force_task_id": "s1"}, timeout=300).ok
    holder = server.jobs.find("s1").replica
    assert requests.get(f"{url}/sd/v1/replicas", timeout=10).json()[holder]["checkpoint"] == "second.safetensors"
    for k in range(3):  # both replicas free each time: the one that holds "second" takes it
        reply = requests.post(f"{url}/sdapi/v1/txt2img", json={**second, "force_task_id": f"s{k + 2}"}, timeout=300)
        assert reply.ok and "Model: second" in reply.json()["info"]
        assert server.jobs.find(f"s{k + 2}").replica == holder
    reply = requests.post(f"{url}/sdapi/v1/txt2img", json={**BODY, "force_task_id": "d1"}, timeout=300)
    assert server.jobs.find("d1").replica == 1 - holder and "Model: demo" in reply.json()["info"]
    # POST /options changes the default of later jobs; the replicas load it when a job needs it
    assert requests.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "second"}, timeout=300).ok
    try:
        reply = requests.post(f"{url}/sdapi/v1/txt2img", json={**BODY, "force_task_id": "d2"}, timeout=300)
        assert "Model: second" in reply.json()["info"] and server.jobs.find("d2").checkpoint.name == "second.safetensors"
    finally:
        assert requests.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "demo"}, timeout=300).ok


def test_a_killed_replica_fails_its_job_and_comes_back(pool):
    server, url = pool
    answers: dict = {}
    doomed = post(url, {**BODY, "steps": 400, "force_task_id": "doomed"}, answers, "doomed")
    wait_for(lambda: server.jobs.find("doomed") is not None and server.jobs.find("doomed").step >= 1)
    number = server.jobs.find("doomed").replica
    replica = server.jobs.backend.members[number]
    starts = replica.starts
    os.kill(replica.process.pid, signal.SIGKILL)
    doomed.join(60)
    reply = answers["doomed"]
    assert reply.status_code == 500
    assert reply.json()["detail"] == (f"replica {number} stopped mid-job (exit code -9); the job failed, the "
                                      "other replicas go on")
    # the other replica serves meanwhile, and the killed one rejoins
    assert requests.post(f"{url}/sdapi/v1/txt2img", json=BODY, timeout=300).status_code == 200
    wait_for(lambda: replica.up and replica.starts == starts + 1, 300)
    assert requests.get(f"{url}/sd/v1/replicas", timeout=10).json()[number]["up"] is True


def get_from(address: str, port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """A request from another loopback address (127.0.0.2: another client machine, as the server sees it)."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300, source_address=(address, 0))
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    return reply.status, json.loads(reply.read())


def test_progress_and_interrupt_without_an_id_act_on_the_callers_job(pool):
    server, url = pool
    port = int(url.rsplit(":", 1)[1])
    answers: dict = {}
    mine = threading.Thread(target=lambda: answers.__setitem__("mine", get_from(
        "127.0.0.2", port, "POST", "/sdapi/v1/txt2img", {**BODY, "steps": 300, "force_task_id": "theirs-b"})))
    mine.start()
    theirs = post(url, {**BODY, "steps": 200, "force_task_id": "theirs-a"}, answers, "theirs")
    wait_for(lambda: all(server.jobs.find(i) is not None and server.jobs.find(i).step >= 1
                         for i in ("theirs-a", "theirs-b")))
    status, seen = get_from("127.0.0.2", port, "GET", "/sdapi/v1/progress?skip_current_image=true")
    assert status == 200 and seen["state"]["sampling_steps"] == 300 and seen["state"]["job_count"] == 2
    seen = requests.get(f"{url}/sdapi/v1/progress", params={"skip_current_image": True}, timeout=10).json()
    assert seen["state"]["sampling_steps"] == 200
    assert get_from("127.0.0.2", port, "POST", "/sdapi/v1/interrupt") == (200, {})
    mine.join(120)
    theirs.join(300)
    assert server.jobs.find("theirs-b").status == "interrupted"
    assert server.jobs.find("theirs-a").status == "done" and server.jobs.find("theirs-a").step == 200
    assert answers["mine"][0] == 200 and answers["theirs"].status_code == 200


def test_replicas_that_cannot_load_fail_the_queued_jobs_instead_of_hanging(tmp_path):
    from types import SimpleNamespace

    from ldm.serve.backends.pool import PoolBackend, ReplicaSpec
    from ldm.serve.jobs import Call, Job, JobFailed, JobTable

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}              ")  # a header, no tensors
    front = SimpleNamespace(worker=SimpleNamespace(preview_method="cheap"), title=lambda path: Path(path).name)
    pool = PoolBackend(front, ReplicaSpec(str(broken), str(CONFIG), device="cpu", precision="full", threads=1), 1)
    try:
        job = JobTable(pool).submit(Job(job="txt2img", call=Call("txt2img", ("a red circle",)), checkpoint=broken))
        with pytest.raises(JobFailed, match=r"^no replica is up: replica 0 did not start \(.*broken.safetensors"):
            job.future.result(timeout=120)
        assert job.status == "failed"
    finally:
        pool.close()


def test_two_comfyui_clients_on_two_replicas_get_their_own_messages(pool):
    import json

    import websocket

    from tests.test_comfy import DEFAULT, messages_until_done

    server, url = pool
    port = int(url.rsplit(":", 1)[1])
    sockets = {name: websocket.create_connection(f"ws://127.0.0.1:{port}/ws?clientId={name}") for name in ("a", "b")}
    ids = {}
    for name, steps in (("a", 300), ("b", 12)):
        prompt = json.loads(json.dumps(DEFAULT))
        prompt["3"]["inputs"]["steps"] = steps
        ids[name] = requests.post(f"{url}/prompt", json={"prompt": prompt, "client_id": name}, timeout=30).json()["prompt_id"]
    wait_for(lambda: all(server.jobs.find(i).step >= 2 for i in ids.values()))
    assert {server.jobs.find(i).replica for i in ids.values()} == {0, 1}  # both run at once
    assert requests.post(f"{url}/interrupt", json={"prompt_id": ids["a"]}, timeout=10).status_code == 200
    seen = {name: messages_until_done(sockets[name], ids[name]) for name in ("a", "b")}
    for name, other in (("a", "b"), ("b", "a")):
        assert all(data.get("prompt_id") in (ids[name], None) for kind, data in seen[name] if kind not in ("status", "binary"))
    assert "execution_interrupted" in [kind for kind, _ in seen["a"]]
    assert [data["value"] for kind, data in seen["b"] if kind == "progress"] == list(range(1, 13))
    assert requests.get(f"{url}/history/{ids['b']}", timeout=10).json()[ids["b"]]["status"]["status_str"] == "success"
    for socket in sockets.values():
        socket.close()
