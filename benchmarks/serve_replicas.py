"""Throughput of `sd serve` with the local worker and with 1 and 2 replica processes (the pool backend), on
the demo model, under N concurrent A1111 clients: images per minute, p50/p95 latency, memory per replica.

    .venv/bin/python benchmarks/serve_replicas.py [--clients 8] [--requests 3] [--steps 20] [--configs 0,1,2]

Each configuration starts its own server (uvicorn on a loopback port, in this process) and is measured
after one warm-up request per replica; configurations run one after the other, then again in reverse order
(A B C C B A), and both runs are printed, for a noisy shared machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def measure(replicas: int, clients: int, per_client: int, steps: int) -> dict:
    import requests

    from ldm.pipeline import Pipeline
    from ldm.serve.app import Server
    from tests.serving import serving

    pipe = Pipeline.load(device="cpu", precision="full", quiet=True)  # the demo model
    server = Server(pipe, replicas=replicas)
    if replicas:
        server.jobs.backend.wait_up(600)
    body = {"prompt": "a red circle at the top left", "steps": steps, "width": 256, "height": 256,
            "sampler_name": "DDIM", "cfg_scale": 5}
    latencies: list[float] = []
    errors: list[str] = []
    with serving(server) as (url, _):
        warm = [threading.Thread(target=lambda: requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600))
                for _ in range(max(1, replicas))]
        for t in warm:
            t.start()
        for t in warm:
            t.join()

        def client(k: int) -> None:
            for j in range(per_client):
                start = time.perf_counter()
                reply = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "seed": 100 * k + j}, timeout=1200)
                latencies.append(time.perf_counter() - start)
                if reply.status_code != 200:
                    errors.append(reply.text[:200])

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        memory = [rss_mib(r["pid"]) for r in server.jobs.backend.replicas() if r.get("pid")]
    front = rss_mib(os.getpid())
    server.jobs.close()
    latencies.sort()
    return {"replicas": replicas, "images": len(latencies), "errors": len(errors), "wall_s": wall,
            "images_per_min": 60 * len(latencies) / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
            "replica_rss_mib": memory, "front_rss_mib": front}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--configs", default="0,1,2", help="replica counts (0: the local worker thread)")
    args = parser.parse_args()
    configs = [int(c) for c in args.configs.split(",")]
    print(f"cpu: {os.cpu_count()} cores visible, {len(os.sched_getaffinity(0))} usable; {args.clients} clients x "
          f"{args.requests} requests, demo model 256x256, DDIM {args.steps} steps", flush=True)
    for replicas in configs + configs[::-1]:
        r = measure(replicas, args.clients, args.requests, args.steps)
        name = "local worker" if replicas == 0 else f"{replicas} replica(s)"
        print(f"{name:>14}: {r['images_per_min']:6.1f} images/min  p50 {r['p50_s']:6.2f} s  p95 {r['p95_s']:6.2f} s  "
              f"({r['images']} images, {r['errors']} errors, {r['wall_s']:.1f} s)  replica RSS MiB "
              f"{[round(m) for m in r['replica_rss_mib']]}  front RSS {r['front_rss_mib']:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
