"""A real `sd serve` app (uvicorn on a free loopback port, in a thread) for the server tests."""
from __future__ import annotations

import contextlib
import socket
import threading
import time


def loopback_works() -> bool:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        try:
            socket.create_connection(server.getsockname(), timeout=2).close()
            return True
        except OSError:
            return False


def ensure_loopback() -> None:
    """Skip unless 127.0.0.1 is reachable. A fresh network namespace (`unshare -n make test`) has its
    loopback interface down; as root we may bring it up there, which touches nothing outside it."""
    import shutil
    import subprocess

    import pytest

    if loopback_works():
        return
    if shutil.which("ip"):
        subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True, check=False)
    if not loopback_works():
        pytest.skip("127.0.0.1 is unreachable in this network namespace (its loopback interface is down)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(server, *, auth=None, page=False):
    """Serve `server` (ldm.serve.app.Server) until the block ends; yields the base URL."""
    import uvicorn

    from ldm.serve.app import build_app, configure_logging

    ensure_loopback()
    configure_logging()
    port = free_port()
    config = uvicorn.Config(build_app(server, auth=auth, page=page), host="127.0.0.1", port=port,
                            log_level="warning", access_log=False)
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not instance.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        instance.should_exit = True
        thread.join(15)
