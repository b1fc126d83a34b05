"""The server: one Pipeline behind the worker, the /sdapi/v1 routes and the page on one FastAPI app.

Every request gets one log line; request bodies are bounded; with credentials set, every route (page
included) needs HTTP Basic auth. Errors a client causes are 4xx with a one-line JSON body
{"error", "detail"}; the server and the jobs queued behind a bad request carry on.
"""
from __future__ import annotations

import base64
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Optional

from ldm.files import imageio, metadata
from ldm.errors import SDError
from ldm.limits import Limits
from ldm.pipeline import Pipeline
from ldm.serve import PREVIEW_EVERY
from ldm.serve.a1111 import RequestError, ServerFileError
from ldm.serve.options import KEPT_DEFAULTS, PREVIEW_TYPES, Settings
from ldm.serve.jobs import caller as caller_var
from ldm.serve.worker import Worker

log = logging.getLogger("sd.serve")
MODEL_SUFFIXES = (".safetensors", ".ckpt")
MAX_LISTED_MODELS = 1000


class Server:
    """What the routes and the page share: the worker (and its pipeline), the models folder, the bounds."""

    def __init__(self, pipeline: Pipeline, *, models_dir: Optional[Path] = None, outdir: Optional[Path] = None,
                 limits: Limits = Limits(), max_pixels: int = 16_000_000, max_body: int = 64 * 2 ** 20,
                 embeddings: Optional[Path] = None, lora_dir: Optional[Path] = None, styles: Optional[Path] = None,
                 hypernetwork_dir: Optional[Path] = None, controlnet_dir: Optional[Path] = None,
                 control_midas: Optional[Path] = None, preview_every: int = PREVIEW_EVERY, replicas: int = 0,
                 ray: Optional[dict] = None):
        from ldm.serve.jobs import JobTable

        # the front's own worker: the local backend's jobs, and model switches, unloads and extras under any
        self.worker = Worker(pipeline, before=self.ensure_loaded, preview_every=preview_every)
        self.preview_every = preview_every
        # the A1111 options POST /options keeps (VAE methods, preview type, token merging); with TAESD loaded
        # its previews are the default, as A1111's TAESD choice
        self.kept_options = {**KEPT_DEFAULTS, **({"show_progress_type": "TAESD"} if pipeline.taesd is not None else {})}
        self.worker.preview_method = PREVIEW_TYPES[self.kept_options["show_progress_type"]]
        self._unloaded: Optional[tuple] = None  # (ckpt, config) while /unload-checkpoint has freed the model
        self._kinds: dict = {}  # (path, size, mtime) -> the checkpoint's family (kind_of)
        self._served = Path(pipeline.ckpt)  # see ckpt; set by the worker's jobs only, once a load has finished
        # A1111's styles.csv (None: styles.csv beside the models folder)
        self.styles_file = Path(styles) if styles is not None else None
        self._styles: tuple = (None, {})
        # textual-inversion and LoRA folders for every request (None: beside the checkpoints folder)
        self.embeddings, self.lora_dir = embeddings, lora_dir
        # A1111's hypernetworks folder: listed for the clients that read it (sd applies none; a prompt naming
        # one is refused in one line); None: hypernetworks/ beside the checkpoints folder
        self.hypernetwork_dir = hypernetwork_dir
        # the ControlNet files units name (None: controlnet/ beside the checkpoints folder); MiDaS for the depth
        # preprocessor, loaded into the pipeline once (--control-midas)
        self.controlnet_dir, self.control_midas = controlnet_dir, control_midas
        if control_midas is not None:
            pipeline.load_midas(control_midas)
        self.models_dir = Path(models_dir) if models_dir is not None else Path(pipeline.ckpt).parent
        if self.styles_file is None:
            self.styles_file = self.models_dir.parent / "styles.csv"
        self.outdir, self.limits, self.max_pixels, self.max_body = outdir, limits, max_pixels, max_body
        try:  # a wrong styles file is said at startup, as the server's own error
            self.styles()
        except ServerFileError as exc:
            raise SDError(str(exc)) from None
        self.jobs = JobTable(self._backend(replicas, ray))

    def _backend(self, replicas: int, ray: Optional[dict]):
        """The local worker (replicas 0), that many replica processes (--replicas), or a Ray Serve deployment
        of them (`ray`: RayBackend's options: address, min_replicas, max_replicas, local_testing)."""
        if not replicas and ray is None:
            from ldm.serve.backends.local import LocalBackend

            return LocalBackend(self)
        from ldm.serve.backends.pool import PoolBackend, ReplicaSpec

        replicas = replicas or 1
        if not 1 <= replicas <= 64:
            raise SDError(f"--replicas must be from 1 to 64 (got {replicas})")
        spec = ReplicaSpec.of(self.pipeline, replicas, self.preview_every, self.control_midas)
        if ray is not None:
            from ldm.serve.backends.rayserve import RayBackend

            return RayBackend(self, spec, replicas, **ray)
        return PoolBackend(self, spec, replicas)

    def want_preview(self) -> None:
        """Someone shows the live previews (the page's poll, /progress): the backend makes them for a while."""
        self.worker.want_preview()
        self.jobs.backend.want_preview()

    @property
    def pipeline(self) -> Pipeline:
        return self.worker.pipeline

    @property
    def ckpt(self) -> Path:
        """The checkpoint served: the one the worker last finished loading for every request (also while it is
        unloaded: the next job loads it again). Kept here, not read from the pipeline, which holds no model
        while a switch loads the next one: readers during a switch see the model that serves until it is done."""
        return self._served

    def unload(self) -> None:
        """POST /unload-checkpoint: free the model's memory; the next job loads it again."""
        def unload(pipe: Pipeline, progress) -> None:
            if self._unloaded is None:
                self._unloaded = (pipe.ckpt, pipe.config)
                pipe.close()
        self.worker.run("unload", unload)

    def reload(self) -> None:
        """POST /reload-checkpoint: read the served checkpoint from disk again."""
        def reload(pipe: Pipeline, progress) -> None:
            ckpt, config = self._unloaded if self._unloaded is not None else (pipe.ckpt, pipe.config)
            pipe.load_model(ckpt, config, quiet=True)
            self._unloaded = None
        self.worker.run("reload", reload)

    def ensure_loaded(self, pipe: Pipeline) -> None:
        """Before a job: the model back in memory if /unload-checkpoint freed it (as A1111 reloads it)."""
        if self._unloaded is not None:
            pipe.load_model(*self._unloaded, quiet=True)
            self._unloaded = None

    def lora_folder(self) -> Optional[Path]:
        from ldm.adapters.lora import default_folder

        return self.lora_dir if self.lora_dir is not None else default_folder(self.ckpt)

    def loras(self) -> list[dict]:
        """A1111's /loras: the LoRA files tags can name, with their safetensors metadata."""
        from ldm.adapters.lora import list_loras, lora_metadata

        return [{"name": name, "alias": name, "path": str(path), "metadata": lora_metadata(path)}
                for name, path in list_loras(self.lora_folder()).items()]

    def beside_checkpoints(self, name: str) -> Path:
        """A folder named `name` beside the folder that holds the served checkpoint (A1111's models/ layout)."""
        return Path(self.ckpt).resolve().parent.parent / name

    def controlnet_folder(self) -> Path:
        return self.controlnet_dir if self.controlnet_dir is not None else self.beside_checkpoints("controlnet")

    def hypernetworks(self) -> list[dict]:
        """A1111's /hypernetworks: {"name", "path"} of the hypernetwork files in the folder ([] without one)."""
        from ldm.files.reading import model_files

        folder = self.hypernetwork_dir if self.hypernetwork_dir is not None else self.beside_checkpoints("hypernetworks")
        return [{"name": name, "path": str(path)}
                for name, path in model_files(folder, (".pt", ".safetensors", ".ckpt"), MAX_LISTED_MODELS).items()]

    def embedding_list(self) -> dict:
        """A1111's /embeddings: {"loaded": {name: {...}}, "skipped": {name: {...}}} for the embeddings folder."""
        from ldm.adapters.textual_inversion import default_folder, files_in, load_embedding

        folder = self.embeddings if self.embeddings is not None else default_folder(self.ckpt)
        model = self.pipeline.model  # None while unloaded or while a switch loads the next model
        width = None if model is None else model.cond_stage_model.model.token_embedding.weight.shape[1]
        out: dict = {"loaded": {}, "skipped": {}}
        for path in files_in(folder) if folder is not None and Path(folder).is_dir() else []:
            entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width, "vectors": None}
            try:
                embedding = load_embedding(path, width) if width is not None else None
            except SDError:
                embedding = None
            if embedding is None:
                out["skipped"][path.stem] = entry
            else:
                out["loaded"][path.stem] = {**entry, "vectors": int(embedding.vectors.shape[0])}
        return out

    def flags(self) -> dict:
        """A1111's /cmd-flags, for what sd serve has of them."""
        return {"api": True, "nowebui": False, "ckpt_dir": str(self.models_dir),
                "lora_dir": str(self.lora_folder()) if self.lora_folder() else None,
                "embeddings_dir": str(self.embeddings) if self.embeddings else None,
                "styles_file": str(self.styles_file) if self.styles_file else None,
                "outdir": str(self.outdir) if self.outdir else None, "max_pixels": self.max_pixels}

    # -- models ------------------------------------------------------------------------------------
    def checkpoint_files(self) -> list[Path]:
        """The checkpoints of the models folder (at most MAX_LISTED_MODELS), sorted."""
        found = sorted(p for p in self.models_dir.rglob("*") if p.suffix in MODEL_SUFFIXES and p.is_file())
        return found[:MAX_LISTED_MODELS]

    def title(self, path: Path) -> str:
        try:
            return Path(path).resolve().relative_to(self.models_dir.resolve()).as_posix()
        except ValueError:
            return Path(path).name

    def current_title(self) -> str:
        return self.title(self.ckpt)

    def current_hash(self) -> str:
        return metadata.model_hash(self.ckpt)

    def kind_of(self, path: Path) -> str:
        """A checkpoint's family from its keys and shapes (ldm.loading.keys; memory-mapped, no weights read),
        cached per file, size and time: "x4" for the upscaler, "unreadable" for a file that is no checkpoint."""
        from ldm.loading.checkpoint import read_state_dict
        from ldm.loading.keys import checkpoint_kind

        from ldm.files.reading import file_stamp

        key = file_stamp(path)
        if key not in self._kinds:
            try:
                self._kinds[key] = checkpoint_kind(read_state_dict(path))
            except SDError:
                self._kinds[key] = "unreadable"
        return self._kinds[key]

    def models(self) -> list[dict]:
        """A1111's /sd-models: every checkpoint in the models folder (and the loaded one) but the x4 upscalers,
        which GET /upscalers lists (A1111 keeps them in a folder of their own)."""
        files = [f for f in self.checkpoint_files() if self.kind_of(f) != "x4"]
        if Path(self.ckpt).resolve() not in {f.resolve() for f in files}:
            files.append(Path(self.ckpt))
        loaded = Path(self.ckpt).resolve()
        return [{"title": self.title(f), "model_name": f.stem, "filename": str(f), "config": None,
                 "hash": self.current_hash() if f.resolve() == loaded else None, "sha256": None} for f in files]

    def current_sha256(self) -> str:
        return metadata.model_hash(self.ckpt, length=64)

    def options(self) -> dict:
        from ldm.serve import options

        return options.current(self)

    def set_options(self, body: dict) -> list[str]:
        """POST /options (ldm.serve.options): the checkpoint switches the model; returns the keys taken without
        effect."""
        taken = Settings(kept=self.kept_options).take(body, "options")
        if taken.checkpoint is not None:
            self.switch(taken.checkpoint)
        self.kept_options = dict(taken.kept)
        self.worker.preview_method = taken.preview
        return taken.ignored

    def resolve(self, title: str) -> Path:
        """The listed checkpoint a client names: its title, file name or stem ("name [hash]" too), or its hash
        (A1111's 10 digits or the full SHA-256). Only listed files can be named: a request never makes the
        server open a path of its choosing."""
        wanted = title.split(" [")[0].strip()
        files = self.checkpoint_files()
        listed = {key: f for f in files for key in (self.title(f), f.name, f.stem)}
        if wanted in listed:
            return listed[wanted]
        if len(wanted) in (10, 64) and all(c in "0123456789abcdef" for c in wanted.lower()):
            for f in files:
                if metadata.model_hash(f, length=len(wanted)) == wanted.lower():
                    return f
        raise RequestError(f"no checkpoint '{wanted}' in the models folder (GET /sdapi/v1/sd-models lists them)")

    def is_loaded(self, path: Path) -> bool:
        return self._unloaded is None and Path(path).resolve() == Path(self.ckpt).resolve()

    def load_into(self, pipe: Pipeline, path: Path, serve: bool = False) -> None:
        """Load a listed checkpoint on the worker's pipeline (a worker job only); on failure keep serving the
        model that worked. `serve`: it serves every request from now on (ckpt says so once it is loaded)."""
        try:
            pipe.switch_model(path)
        except SDError as exc:
            raise RequestError(str(exc)) from None
        if serve:
            self._served = Path(pipe.ckpt)

    def switch(self, title: str) -> None:
        """Load the listed checkpoint named by `title` (see resolve) for every request from now on: a job of the
        worker's queue, after the jobs queued before it (which run on the model they were sent to)."""
        path = self.resolve(title)

        def load(pipe: Pipeline, progress) -> None:
            if not self.is_loaded(path):
                self.load_into(pipe, path, serve=True)

        self.worker.run("load", load)

    def kept_settings(self, task: str) -> dict:
        """The Request fields the kept A1111 options give a job of `task` that names none (the page's)."""
        return Settings(kept=self.kept_options).request_fields(task)

    def styles(self) -> dict:
        """The prompt styles of --styles (A1111's styles.csv), read when the file changes (a wrong file too:
        its error is kept until it changes). A wrong file is the server's fault: ServerFileError (a 500 that
        names the file), raised only for the requests that name a style."""
        from ldm.serve.styles import read_styles

        try:
            st = os.stat(self.styles_file) if self.styles_file is not None else None
        except OSError:
            st = None
        stamp = None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode)
        if self._styles[0] != stamp:
            try:
                self._styles = (stamp, {} if st is None else read_styles(self.styles_file))
            except SDError as exc:
                self._styles = (stamp, ServerFileError(f"the server's styles file (--styles): {exc}"))
        if isinstance(self._styles[1], ServerFileError):
            raise self._styles[1]
        return self._styles[1]

    def save(self, images: list, task: str) -> None:
        """Write images to OUTDIR/<task>-samples/samples/NNNNN.png, as the commands do."""
        folder = imageio.ensure_writable_dir(Path(self.outdir) / f"{task}-samples" / "samples")
        for image in images:
            path = imageio.save_numbered(image.image, folder, imageio.SAMPLE_DIGITS,
                                         metadata={metadata.PARAMETERS_KEY: image.parameters}, watermark=False)
            if image.first_pass is not None:  # A1111's save_images_before_highres_fix
                imageio.save_png(image.first_pass, path.with_name(f"{path.stem}-before-highres-fix.png"),
                                 {metadata.PARAMETERS_KEY: image.parameters}, watermark=False, overwrite=False)


# -- the HTTP layer ------------------------------------------------------------------------------------

def error_body(status: int, detail: str) -> tuple[int, bytes]:
    import json

    names = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 413: "PayloadTooLarge", 422: "Unprocessable", 500: "ServerError"}
    return status, json.dumps({"error": names.get(status, "Error"), "detail": detail, "body": "", "errors": ""}).encode()


async def _send_json(send, status: int, body: bytes, headers: tuple = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _active_file(path: str) -> bool:
    """A gradio file route asked for an SVG or HTML file: gradio serves some files inline (an uploaded SVG a
    call has named becomes a "static" file), and an SVG or HTML file can carry script that would run with
    the page's origin. sd's page shows only PNG results and uploaded pictures, so these are refused."""
    from urllib.parse import unquote

    name = unquote(path).lower()
    return "file=" in name and name.rstrip("/").endswith((".svg", ".svgz", ".html", ".htm", ".xhtml", ".xml"))


class _TooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: one log line per request, HTTP Basic auth when set, bounded request bodies."""

    def __init__(self, app, *, max_body: int, auth: Optional[tuple[str, str]] = None):
        self.app, self.max_body = app, max_body
        self.token = None if auth is None else base64.b64encode(f"{auth[0]}:{auth[1]}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        token = caller_var.set(self._caller(scope))  # whose job /progress, /interrupt and the socket mean
        try:
            if scope["type"] == "websocket":  # ComfyUI's /ws: the same credentials, or closed before it opens
                headers = dict(scope.get("headers") or [])
                if self.token is not None and not self._authorised(headers.get(b"authorization", b"")):
                    return await send({"type": "websocket.close", "code": 1008})
                return await self.app(scope, receive, send)
            await self._logged(scope, receive, send)
        finally:
            caller_var.reset(token)

    async def _logged(self, scope, receive, send) -> None:
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
        if _active_file(scope.get("path", "")):
            return await _send_json(send, *error_body(403, "the page serves no SVG or HTML files"))
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

    def _caller(self, scope) -> str:
        """Who asks: the Basic-auth user where credentials are set (each client its own user), else the client's
        address; /progress and /interrupt act on this caller's job."""
        client = (scope.get("client") or ("-", 0))[0]
        if self.token is None:
            return client
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        try:
            user = base64.b64decode(header.partition(b" ")[2].strip(), validate=True).partition(b":")[0]
            return f"{user.decode('utf-8', 'replace')}@{client}"
        except ValueError:
            return client

    def _authorised(self, header: bytes) -> bool:
        """HTTP Basic credentials equal to the server's; the scheme's case does not matter (RFC 7617), and
        the header is compared as bytes, so no character in it can raise."""
        scheme, _, given = header.strip().partition(b" ")
        return scheme.lower() == b"basic" and secrets.compare_digest(given.strip(), self.token)


def _text_safe_json_response():
    from fastapi.responses import JSONResponse

    class TextSafeJSONResponse(JSONResponse):
        """JSON as FastAPI sends it (UTF-8), but a reply holding a string that UTF-8 cannot encode (a lone
        surrogate: requests holding one are refused, this is the backstop) goes out with \\u escapes
        instead of failing after its job ran."""

        def render(self, content) -> bytes:
            try:
                return super().render(content)
            except UnicodeEncodeError:
                import json

                return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")

    return TextSafeJSONResponse


def build_app(server: Server, *, auth: Optional[tuple[str, str]] = None, page: bool = True,
              first_tab: str = "txt2img"):
    """The ASGI app: API routes, OpenAPI at /docs, the page at /, all behind Guard."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response

    from ldm.serve import api, controlnet
    from ldm.serve.a1111 import NotFound
    from ldm.serve.jobs import JobFailed

    TextSafeJSONResponse = _text_safe_json_response()
    app = FastAPI(title="sd", description="Stable Diffusion 2.x: AUTOMATIC1111's /sdapi/v1 on one loaded model",
                  default_response_class=TextSafeJSONResponse)
    app.include_router(api.router(server))
    app.include_router(api.internal_router(server))
    app.include_router(controlnet.router(server))
    from ldm.serve.comfy.routes import Comfy, router as comfy_router

    comfy = Comfy(server)
    for prefix in ("", "/api"):  # ComfyUI serves every route under both
        app.include_router(comfy_router(server, comfy, prefix))

    def one_line(status: int, detail: str) -> Response:
        return Response(error_body(status, detail)[1], status_code=status, media_type="application/json")

    # the client's errors are 422 (404 for a job id it names), the server's files' and replicas' 500: one line each
    for error, status in ((RequestError, 422), (SDError, 422), (NotFound, 404), (ServerFileError, 500),
                          (JobFailed, 500)):
        app.add_exception_handler(error, lambda request, exc, status=status: one_line(status, str(exc)))

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
        # gradio checks the paths that a call's file arguments name (only its upload folder may be read) only
        # once its app "has launched", which mount_gradio_app never sets: without this a call naming /etc/passwd
        # got it copied into the cache, from where /gradio_api/file= served it. (is_running stays as gradio
        # leaves it under a mount: set, it keeps every event stream's heartbeat alive.)
        blocks.has_launched = True
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
        first_tab: str = "txt2img", **options) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM); `options` are the Server's."""
    import uvicorn

    configure_logging()
    server = Server(pipeline, **options)
    app = build_app(server, auth=auth, first_tab=first_tab)

    class Stopping(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Ctrl-C or SIGTERM: the running jobs stop after their step and answer with the batches done,
            # so the graceful shutdown does not wait for a long generation; queued jobs never start; replica
            # processes end.
            server.worker.interrupt()
            server.jobs.close()
            super().handle_exit(sig, frame)

    try:
        Stopping(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)).run()
    except OSError as exc:
        raise SDError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
