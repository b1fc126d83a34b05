"""A replica process of the pool backend (pool.py): loads the model once, then runs the jobs the front sends,
one at a time, reporting each step (and a preview while someone watches) and the result."""
from __future__ import annotations

import time
from pathlib import Path


def main(conn, spec, interrupt, skip, watched) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front's: it stops the replicas itself
    from ldm.errors import SDError
    from ldm.pipeline import Cancelled, Pipeline
    from ldm.serve.worker import WATCH_SECONDS

    try:
        pipe = Pipeline.load(spec.ckpt, spec.config, device=spec.device, precision=spec.precision,
                             threads=spec.threads, backend=spec.backend, trust_config=spec.trust_config,
                             taesd=spec.taesd, quiet=True)
        if spec.midas:
            pipe.load_midas(spec.midas)
    except SDError as exc:
        conn.send(("failed", str(exc)))
        return
    conn.send(("ready", str(pipe.ckpt) if pipe.ckpt else None))
    while True:
        try:
            kind, ckpt, call, method = conn.recv()
        except (EOFError, OSError):
            return  # the front has gone
        try:
            if ckpt is not None and (pipe.ckpt is None or Path(ckpt).resolve() != Path(pipe.ckpt).resolve()):
                pipe.switch_model(ckpt)
            conn.send(("loaded", str(pipe.ckpt) if pipe.ckpt else None))
            every = min(spec.preview_every, 1) if method == "cheap" else spec.preview_every

            def on_step(progress) -> None:
                if interrupt.value:  # every step: an interrupt that came before sampling began holds too
                    pipe.cancel()
                if skip.value:
                    skip.value = 0
                    pipe.skip()
                preview = None
                if every and time.time() - watched.value < WATCH_SECONDS and progress.step % every == 0 \
                        and progress.step < progress.total:
                    preview = pipe.preview(progress.denoised, method)
                conn.send(("step", progress.step, progress.total, preview))

            conn.send(("done", call(pipe, on_step)))
        except Cancelled as stop:
            conn.send(("cancelled", stop.images, str(stop)))
        except SDError as exc:
            conn.send(("error", str(exc)))
        except Exception as exc:  # a bug: the job fails with its name, the replica goes on
            import traceback

            traceback.print_exc()
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
