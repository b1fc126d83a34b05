"""Throughput of `sd serve` with the local worker and with 1 and 2 replica processes (the pool backend), on
the demo model, under N concurrent A1111 clients: images per minute, p50/p95 latency, memory per replica.

    .venv/bin/python benchmarks/serve_replicas.py [--clients 8] [--requests 3] [--steps 20] [--configs 0,1,2]
        [--threads T]

Each configuration starts its own `sd serve` process, as a user would, and is measured from this process's
client threads after one warm-up request per replica; configurations run one after the other, then again in reverse order
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


def measure(replicas: int, clients: int, per_client: int, steps: int, threads: int = 0,
            ray: bool = False) -> dict:
    """Start `sd serve` (the demo model) with `--replicas replicas` in its own process, as a user would, and
    time `clients` concurrent clients from this one."""
    import signal
    import subprocess

    import requests

    from tests.serving import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(ROOT / ".venv" / "bin" / "sd"), "serve", "--port", str(port), "--device", "cpu",
                               "--precision", "full", "--replicas", str(replicas)]
                              + (["--threads", str(threads)] if threads else []) + (["--ray", "auto"] if ray else []),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                up = requests.get(f"{url}/sd/v1/replicas", timeout=5).json()
                if all(r["up"] for r in up):  # (Ray: the server listens once its deployment is up)
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"sd serve --replicas {replicas} did not come up")
            time.sleep(0.2)
        body = {"prompt": "a red circle at the top left", "steps": steps, "width": 256, "height": 256,
                "sampler_name": "DDIM", "cfg_scale": 5}
        latencies: list[float] = []
        errors: list[str] = []
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
        memory = [rss_mib(r["pid"]) for r in requests.get(f"{url}/sd/v1/replicas", timeout=5).json() if r.get("pid")]
        front = rss_mib(server.pid)
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C: the front stops its replicas and exits
        try:
            code = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = "killed after 60 s"
    latencies.sort()
    return {"replicas": replicas, "images": len(latencies), "errors": len(errors), "wall_s": wall,
            "images_per_min": 60 * len(latencies) / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
            "replica_rss_mib": memory, "front_rss_mib": front, "exit": code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--configs", default="0,1,2", help="replica counts (0: the local worker thread)")
    parser.add_argument("--ray", action="store_true", help="the replicas on Ray Serve (sd serve --ray auto: a local "
                        "Ray instance started by the server)")
    parser.add_argument("--threads", type=int, default=0, help="--threads of sd serve (each replica's; 0: its default, "
                        "the usable cores shared out)")
    args = parser.parse_args()
    configs = [int(c) for c in args.configs.split(",")]
    print(f"cpu: {os.cpu_count()} cores visible, {len(os.sched_getaffinity(0))} usable; {args.clients} clients x "
          f"{args.requests} requests, demo model 256x256, DDIM {args.steps} steps", flush=True)
    for replicas in configs + configs[::-1]:
        r = measure(replicas, args.clients, args.requests, args.steps, args.threads, args.ray)
        name = "local worker" if replicas == 0 else f"{replicas} {'Ray ' if args.ray else ''}replica(s)"
        print(f"{name:>14}: {r['images_per_min']:6.1f} images/min  p50 {r['p50_s']:6.2f} s  p95 {r['p95_s']:6.2f} s  "
              f"({r['images']} images, {r['errors']} errors, {r['wall_s']:.1f} s)  replica RSS MiB "
              f"{[round(m) for m in r['replica_rss_mib']]}  front RSS {r['front_rss_mib']:.0f} MiB  exit {r['exit']}",
              flush=True)


if __name__ == "__main__":
    main()
