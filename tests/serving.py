"""A real `sd serve` app (uvicorn on a free loopback port, in a thread) for the server tests."""
from __future__ import annotations

import contextlib
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(server, *, auth=None, page=False):
    """Serve `server` (ldm.serve.app.Server) until the block ends; yields the base URL."""
    import uvicorn

    from ldm.serve.app import build_app, configure_logging

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
