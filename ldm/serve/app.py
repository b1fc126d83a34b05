"""The server: one Pipeline behind the worker, the /sdapi/v1 routes and the page on one FastAPI app.

Every request gets one log line; request bodies are bounded; with credentials set, every route (page
included) needs HTTP Basic auth. Errors a client causes are 4xx with a one-line JSON body
{"error", "detail"}; the server and the jobs queued behind a bad request carry on.
"""
from __future__ import annotations

import base64
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Optional

from ldm.files import imageio

from ldm.files import metadata
from ldm.errors import SDError
from ldm.limits import Limits
from ldm.pipeline import Pipeline
from ldm.serve.a1111 import RequestError
from ldm.serve.worker import Worker

log = logging.getLogger("sd.serve")
MODEL_SUFFIXES = (".safetensors", ".ckpt")
MAX_LISTED_MODELS = 1000


class Server:
    """What the routes and the page share: the worker (and its pipeline), the models folder, the bounds."""

    def __init__(self, pipeline: Pipeline, *, models_dir: Optional[Path] = None, outdir: Optional[Path] = None,
                 limits: Limits = Limits(), max_pixels: int = 16_000_000, max_body: int = 64 * 2 ** 20,
                 embeddings: Optional[Path] = None, lora_dir: Optional[Path] = None):
        self.worker = Worker(pipeline)
        # textual-inversion and LoRA folders for every request (None: beside the checkpoints folder)
        self.embeddings, self.lora_dir = embeddings, lora_dir
        self.models_dir = Path(models_dir) if models_dir is not None else Path(pipeline.ckpt).parent
        self.outdir, self.limits, self.max_pixels, self.max_body = outdir, limits, max_pixels, max_body

    @property
    def pipeline(self) -> Pipeline:
        return self.worker.pipeline

    # -- models ------------------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        found = sorted(p for p in self.models_dir.rglob("*") if p.suffix in MODEL_SUFFIXES and p.is_file())
        return found[:MAX_LISTED_MODELS]

    def _title(self, path: Path) -> str:
        try:
            return Path(path).resolve().relative_to(self.models_dir.resolve()).as_posix()
        except ValueError:
            return Path(path).name

    def current_title(self) -> str:
        return self._title(self.pipeline.ckpt)

    def current_hash(self) -> str:
        return metadata.model_hash(self.pipeline.ckpt)

    def models(self) -> list[dict]:
        """A1111's /sd-models: every checkpoint in the models folder (and the loaded one)."""
        files = self._files()
        if Path(self.pipeline.ckpt).resolve() not in {f.resolve() for f in files}:
            files.append(Path(self.pipeline.ckpt))
        loaded = Path(self.pipeline.ckpt).resolve()
        return [{"title": self._title(f), "model_name": f.stem, "filename": str(f), "config": None,
                 "hash": self.current_hash() if f.resolve() == loaded else None, "sha256": None} for f in files]

    def options(self) -> dict:
        return {"sd_model_checkpoint": self.current_title(), "sd_checkpoint_hash": None, "samples_format": "png"}

    def set_options(self, body: dict) -> None:
        """POST /options: only sd_model_checkpoint (switching models among the listed ones) is kept."""
        if not isinstance(body, dict):
            raise RequestError("options must be a JSON object")
        others = sorted(k for k in body if k != "sd_model_checkpoint")
        if others:
            raise RequestError(f"sd serve keeps no option but sd_model_checkpoint (got {', '.join(others)})")
        if "sd_model_checkpoint" in body:
            self.switch(str(body["sd_model_checkpoint"]))

    def switch(self, title: str) -> None:
        """Load the listed checkpoint named by `title` (a title, file name or stem; " [hash]" ignored).
        Only listed files can be named: a request never makes the server open a path of its choosing."""
        wanted = title.split(" [")[0]
        listed = {key: f for f in self._files() for key in (self._title(f), f.name, f.stem)}
        if wanted not in listed:
            raise RequestError(f"no checkpoint '{wanted}' in the models folder (GET /sdapi/v1/sd-models lists them)")
        path = listed[wanted]
        if Path(path).resolve() == Path(self.pipeline.ckpt).resolve():
            return

        def load(pipe: Pipeline, progress) -> None:
            previous = (pipe.ckpt, pipe.config)
            try:
                pipe.load_model(path, quiet=True)
            except SDError as exc:  # keep serving the model that worked
                pipe.load_model(*previous, quiet=True)
                raise RequestError(f"cannot load {wanted}: {exc}") from None

        self.worker.run("load", load)

    def save(self, images: list, task: str) -> None:
        """Write images to OUTDIR/<task>-samples/samples/NNNNN.png, as the commands do."""
        folder = imageio.ensure_writable_dir(Path(self.outdir) / f"{task}-samples" / "samples")
        for image in images:
            imageio.save_numbered(image.image, folder, imageio.SAMPLE_DIGITS,
                                  metadata={metadata.PARAMETERS_KEY: image.parameters}, watermark=False)


# -- the HTTP layer ------------------------------------------------------------------------------------

def error_body(status: int, detail: str) -> tuple[int, bytes]:
    import json

    names = {401: "Unauthorized", 404: "NotFound", 413: "PayloadTooLarge", 422: "Unprocessable"}
    return status, json.dumps({"error": names.get(status, "Error"), "detail": detail, "body": "", "errors": ""}).encode()


async def _send_json(send, status: int, body: bytes, headers: tuple = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: one log line per request, HTTP Basic auth when set, bounded request bodies."""

    def __init__(self, app, *, max_body: int, auth: Optional[tuple[str, str]] = None):
        self.app, self.max_body = app, max_body
        self.token = None if auth is None else base64.b64encode(f"{auth[0]}:{auth[1]}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, sending, status)
        finally:
            client = (scope.get("client") or ("-", 0))[0]
            log.info("%s %s %s %s %.0f ms", client, scope["method"], scope["path"], status[0] or "-",
                     1000 * (time.perf_counter() - start))

    async def _guarded(self, scope, receive, send, status) -> None:
        headers = dict(scope.get("headers") or [])
        if self.token is not None and not self._authorised(headers.get(b"authorization", b"")):
            return await _send_json(send, *error_body(401, "credentials needed (sd serve --api-auth)"),
                                    headers=((b"www-authenticate", b'Basic realm="sd"'),))
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await _send_json(send, *error_body(413, f"request body above {self.max_body} bytes (--max-body-mb)"))
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            if not status[0]:
                await _send_json(send, *error_body(413, f"request body above {self.max_body} bytes (--max-body-mb)"))

    def _authorised(self, header: bytes) -> bool:
        """HTTP Basic credentials equal to the server's; the scheme's case does not matter (RFC 7617), and
        the header is compared as bytes, so no character in it can raise."""
        scheme, _, given = header.strip().partition(b" ")
        return scheme.lower() == b"basic" and secrets.compare_digest(given.strip(), self.token)


def build_app(server: Server, *, auth: Optional[tuple[str, str]] = None, page: bool = True,
              first_tab: str = "txt2img"):
    """The ASGI app: API routes, OpenAPI at /docs, the page at /, all behind Guard."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response

    from ldm.serve import api

    app = FastAPI(title="sd", description="Stable Diffusion 2.x: AUTOMATIC1111's /sdapi/v1 on one loaded model")
    app.include_router(api.router(server))

    def one_line(status: int, detail: str) -> Response:
        return Response(error_body(status, detail)[1], status_code=status, media_type="application/json")

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return one_line(422, str(exc))

    @app.exception_handler(SDError)
    async def sd_error(request: Request, exc: SDError):
        return one_line(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return one_line(422, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    if page:
        import gradio as gr

        from ldm.serve.page import build_page, page_theme

        blocks = build_page(server, first_tab)
        app = gr.mount_gradio_app(app, blocks, path="/", show_error=True, theme=page_theme(),
                                  footer_links=["api"], max_file_size=server.max_body)
        # gradio checks the paths that a call's file arguments name (only its upload folder may be read) and
        # trusts no client-named SVG as a static file only once its app "has launched" and "is running";
        # mount_gradio_app sets neither, so without this a call naming /etc/passwd got it copied into the
        # cache, from where /gradio_api/file= served it.
        blocks.has_launched = blocks.is_running = True
    return Guard(app, max_body=server.max_body, auth=auth)


def configure_logging() -> None:
    """One line per request on stderr (set up once per process)."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run(pipeline: Pipeline, *, host: str, port: int, auth: Optional[tuple[str, str]] = None,
        models_dir: Optional[Path] = None, outdir: Optional[Path] = None, limits: Limits = Limits(),
        max_pixels: int = 16_000_000, max_body: int = 64 * 2 ** 20, first_tab: str = "txt2img",
        embeddings: Optional[Path] = None, lora_dir: Optional[Path] = None) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    configure_logging()
    server = Server(pipeline, models_dir=models_dir, outdir=outdir, limits=limits, max_pixels=max_pixels,
                    max_body=max_body, embeddings=embeddings, lora_dir=lora_dir)
    app = build_app(server, auth=auth, first_tab=first_tab)

    class Stopping(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Ctrl-C or SIGTERM: the running job stops after its step and answers with the batches done,
            # so the graceful shutdown does not wait for a long generation; queued jobs never start.
            server.worker.interrupt()
            super().handle_exit(sig, frame)

    try:
        Stopping(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)).run()
    except OSError as exc:
        raise SDError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
