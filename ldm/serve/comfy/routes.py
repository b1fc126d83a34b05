"""ComfyUI's routes and websocket on sd's server (served under / and /api, as ComfyUI does).

A prompt becomes one Job of the server's table (graph.reduce, then the Request of that generation); a thread
follows it and tells the client's websockets what ComfyUI would (execution_start, executing, progress, binary
preview frames, executed, execution_success / _error / _interrupted, and the `executing` end marker after the
history entry is written). Outputs, uploads and temp files live in folders of their own (`--outdir`/comfyui,
else a temporary folder); /view and /upload never reach outside them.
"""
from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import re
import struct
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response

from ldm.errors import SDError
from ldm.files import imageio
from ldm.serve.a1111 import RequestError
from ldm.serve.comfy import graph
from ldm.serve.jobs import Call, Job, JobFailed, outcome

KEPT_HISTORY = 1000
SOCKET_BACKLOG = 1024  # messages held for a socket that does not read; more are dropped, not kept
FOLLOW_SECONDS = 0.05
COMFY_NAMES = {"scale": "cfg", "sampler": "sampler_name", "schedule": "scheduler", "strength": "denoise",
               "batch_size": "batch_size", "seed": "seed", "steps": "steps", "width": "width", "height": "height"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SAFE_NAME = re.compile(r"^[^/\\\x00]{1,200}$")
RESAMPLE = {"nearest-exact": 0, "bilinear": 2, "area": 4, "bicubic": 3, "lanczos": 1}  # PIL's numbers (BOX: area)


class Comfy:
    """The ComfyUI side of one server: folders, history, the websockets, prompt numbers."""

    def __init__(self, server):
        self.server = server
        root = Path(server.outdir) / "comfyui" if server.outdir is not None else \
            Path(tempfile.mkdtemp(prefix="sd-comfyui-"))
        self.dirs = {kind: root / kind for kind in ("output", "input", "temp")}
        for folder in self.dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.history: OrderedDict[str, dict] = OrderedDict()
        self.queued: dict[str, list] = {}  # prompt_id -> [number, prompt_id, prompt, extra_data, outputs]
        self.sockets: dict[str, list] = {}  # client id -> [(loop, asyncio.Queue)]
        self.numbers = itertools.count()
        self.lock = threading.Lock()

    # -- websockets ------------------------------------------------------------------------------------------
    def emit(self, client: Optional[str], kind: Optional[str], data: Any = None, raw: Optional[bytes] = None) -> None:
        """Send a message to a client's sockets (all sockets when client is None)."""
        message = raw if raw is not None else json.dumps({"type": kind, "data": data})
        with self.lock:
            targets = [pair for key, pairs in self.sockets.items() if client is None or key == client for pair in pairs]
        for loop, queue in targets:
            loop.call_soon_threadsafe(_offer, queue, message)

    def watched(self, client: Optional[str]) -> bool:
        with self.lock:
            return bool(client and self.sockets.get(client))

    def status(self, sid: Optional[str] = None) -> dict:
        data = {"status": {"exec_info": {"queue_remaining": self.remaining()}}}
        return {**data, "sid": sid} if sid else data

    def remaining(self) -> int:
        return len(self.server.jobs.active())

    # -- files -----------------------------------------------------------------------------------------------
    def folder(self, kind: str, subfolder: str = "") -> Path:
        """A folder of `kind` (output, input, temp) and its subfolder; RequestError for one outside it."""
        if kind not in self.dirs:
            raise RequestError(f"type must be output, input or temp (got '{kind}')")
        base = self.dirs[kind].resolve()
        folder = (base / subfolder).resolve() if subfolder else base
        if folder != base and base not in folder.parents:
            raise PermissionError(subfolder)
        return folder

    def file(self, name: str, kind: str, subfolder: str = "") -> Path:
        if not name or name.startswith("/") or ".." in Path(name).parts or not SAFE_NAME.match(name):
            raise RequestError(f"a plain file name, please (got '{name[:80]}')")
        folder = self.folder(kind, subfolder)
        path = (folder / name).resolve()
        if folder not in path.parents:
            raise PermissionError(name)
        return path

    def inputs(self) -> list[str]:
        folder = self.dirs["input"]
        return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)[:1000]

    def save(self, images: list, prefix: str, kind: str) -> list[dict]:
        """Images as ComfyUI names them: PREFIX_00001_.png, numbered after the files already there."""
        sub, _, stem = prefix.replace("\\", "/").rpartition("/")
        if not stem or not SAFE_NAME.match(stem) or (sub and not all(SAFE_NAME.match(p) and p != ".." for p in sub.split("/"))):
            raise RequestError(f"filename_prefix '{prefix[:80]}' is not a plain name (subfolders with /)")
        folder = self.folder(kind, sub)
        folder.mkdir(parents=True, exist_ok=True)
        with self.lock:  # numbered after the highest there (from 1, as ComfyUI counts)
            counter = max(1, imageio.next_index(folder, 5, f"{stem}_", "_.png"))
            written = []
            for image in images:
                name = f"{stem}_{counter:05}_.png"
                (folder / name).write_bytes(image.png())
                written.append({"filename": name, "subfolder": sub, "type": kind})
                counter += 1
        return written

    def picture(self, name: str, size: Optional[tuple]):
        """LoadImage's picture (ImageScale's size applied), read as the commands read a file."""
        from PIL import Image, ImageOps

        from ldm.files.imageio import decode_picture

        path = self.file(name.split(" [")[0], "input")
        if not path.is_file():
            raise RequestError(f"Invalid image file: {name}")
        with open(path, "rb") as f:
            try:
                image = decode_picture(f, name, "RGB", self.server.max_pixels, bound="the server's max_pixels")
            except SDError as exc:
                raise RequestError(str(exc)) from None
        if size is None:
            return image
        method, width, height, crop = size
        width = width or round(image.width * height / image.height)
        height = height or round(image.height * width / image.width)
        if not (1 <= width <= self.server.limits.max_side and 1 <= height <= self.server.limits.max_side):
            raise RequestError(f"ImageScale's size must be 1 to {self.server.limits.max_side} per side")
        if crop == "center":
            return ImageOps.fit(image, (width, height), RESAMPLE[method])
        return image.resize((width, height), Image.Resampling(RESAMPLE[method]))


# -- a prompt -------------------------------------------------------------------------------------------------

def node_error(exc: graph.NodeError) -> dict:
    return {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": "", "extra_info": {}},
            "node_errors": {exc.node: {"errors": [{"type": exc.kind, "message": str(exc), "details": str(exc),
                                                   "extra_info": {}}],
                                       "dependent_outputs": [], "class_type": exc.class_type}}}


def prompt_error(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message, "details": "", "extra_info": {}}, "node_errors": {}}


def queue_prompt(comfy: Comfy, body: Any) -> JSONResponse:
    """POST /prompt: the prompt reduced and queued; ComfyUI's 400 shape for what does not reduce."""
    server = comfy.server
    if not isinstance(body, dict):
        return JSONResponse(prompt_error("invalid_prompt", "the body must be a JSON object"), 400)
    prompt, client = body.get("prompt"), body.get("client_id")
    extra = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
    client = client if isinstance(client, str) else extra.get("client_id")
    prompt_id = body.get("prompt_id") if isinstance(body.get("prompt_id"), str) and body.get("prompt_id") else \
        str(uuid.uuid4())
    if len(prompt_id) > 128:
        return JSONResponse(prompt_error("invalid_prompt", "prompt_id is at most 128 characters"), 400)
    from ldm.adapters.lora import list_loras

    plan = None
    try:
        plan = graph.reduce(prompt, lambda: list_loras(server.lora_folder()))
        job = job_of(comfy, plan, prompt_id, client)
    except graph.PromptError as exc:
        return JSONResponse(prompt_error(exc.kind, str(exc)), 400)
    except graph.NodeError as exc:
        return JSONResponse(node_error(exc), 400)
    except (RequestError, SDError, PermissionError) as exc:
        node = plan.sampler_node if plan is not None else next(iter(prompt))
        return JSONResponse(node_error(graph.NodeError(node, prompt[node]["class_type"], str(exc) or "not allowed")), 400)
    number = next(comfy.numbers)
    if isinstance(body.get("number"), (int, float)) and not isinstance(body.get("number"), bool):
        number = body["number"]
    outputs = list(plan.outputs)
    comfy.queued[prompt_id] = [number, prompt_id, prompt, {**extra, "client_id": client}, outputs]
    server.jobs.submit(job)
    comfy.emit(None, "status", comfy.status())
    threading.Thread(target=follow, args=(comfy, job, plan, client), name="sd-comfy-follow", daemon=True).start()
    return JSONResponse({"prompt_id": prompt_id, "number": number, "node_errors": {}})


def job_of(comfy: Comfy, plan: graph.Plan, prompt_id: str, client: Optional[str]) -> Job:
    """The Job of a plan: its Request built as the other front ends build theirs."""
    from ldm.tasks import Img2Img, Txt2Img

    server = comfy.server
    try:
        path = server.resolve(plan.checkpoint) if plan.checkpoint else server.ckpt
    except RequestError as exc:
        raise graph.NodeError(plan.checkpoint_node, "CheckpointLoaderSimple", f"Value not in list: ckpt_name: {exc}")
    if plan.init_image is not None:
        try:
            picture = comfy.picture(plan.init_image, plan.init_size)
        except (RequestError, PermissionError) as exc:
            raise graph.NodeError(plan.image_node, "LoadImage", str(exc) or "not in the input folder") from None
        task, size = Img2Img(picture, plan.strength), {}
    else:
        task, size = Txt2Img(), {"width": plan.width, "height": plan.height}
    tags = "".join(f" <lora:{name}:{weight:g}>" for name, weight in plan.loras)
    settings = {**size, "negative_prompt": plan.negative, "seed": plan.sampling["seed"],
                "batch_size": plan.batch_size, "limits": server.limits, "embeddings": server.embeddings,
                "lora_dir": server.lora_dir, **server.kept_settings("img2img" if plan.init_image is not None else "txt2img")}
    if plan.clip_skip is not None:
        settings["clip_skip"] = plan.clip_skip
    if plan.controls:
        settings["control"] = tuple(control_unit(comfy, control) for control in plan.controls)
    request = server.pipeline.request(task, plan.prompt + tags, steps=plan.sampling["steps"],
                                      sampler=plan.sampling["sampler"], schedule=plan.sampling["schedule"],
                                      scale=plan.sampling["scale"], **settings)
    override = Path(path).resolve() != Path(server.ckpt).resolve()
    return Job(job="comfyui", call=Call("generate", (request,), {"names": COMFY_NAMES}), id=prompt_id,
               checkpoint=Path(path), override=override, restore=True, owner=client or "")


def control_unit(comfy: Comfy, control: graph.Control):
    """A ControlNetApply node's unit: the named file of the ControlNet folder, its hint as given (no preprocessor),
    cropped to the picture's shape as ComfyUI's centre crop does, on both halves of guidance."""
    import numpy as np

    from ldm.control.units import ControlUnit
    from ldm.serve import controlnet

    name = control.net.rsplit(".", 1)[0] if control.net.endswith(controlnet.SUFFIXES) else control.net
    try:
        path = controlnet.find_model(comfy.server, name, "control_net_name")
    except RequestError as exc:
        raise graph.NodeError(control.net_node, "ControlNetLoader", f"Value not in list: {exc}") from None
    try:
        hint = comfy.picture(control.image, control.size)
    except (RequestError, PermissionError) as exc:
        raise graph.NodeError(control.image_node, "LoadImage", str(exc) or "not in the input folder") from None
    return ControlUnit(model=str(path), image=np.asarray(hint), module="none", weight=control.strength,
                       start=control.start, end=control.end, mode="balanced", resize="crop")


def follow(comfy: Comfy, job: Job, plan: graph.Plan, client: Optional[str]) -> None:
    """Tell the client's websockets how its job goes, then write its outputs and history."""
    pid, shown, begun = job.id, 0, threading.Lock()
    messages: list = []

    def event(kind: str, data: dict, keep: bool = False) -> None:
        data = {**data, "prompt_id": pid}
        if keep:
            data["timestamp"] = int(time.time() * 1000)
            messages.append([kind, data])
        comfy.emit(client, kind, data)

    def start() -> None:  # once, from whichever thread sees the job running first
        if begun.acquire(blocking=False):
            event("execution_start", {}, keep=True)
            event("execution_cached", {"nodes": []}, keep=True)
            event("executing", {"node": plan.sampler_node, "display_node": plan.sampler_node})

    def stepped(job: Job) -> None:  # every step, from the backend's thread
        start()
        event("progress", {"value": job.step, "max": job.steps, "node": plan.sampler_node})

    job.on_step = stepped
    while not job.future.done():
        if job.status == "running":
            start()
        if comfy.watched(client):
            comfy.server.want_preview()
            if job.preview is not None and job.preview_step > shown:
                shown = job.preview_step
                from ldm.files.imageio import png_bytes

                comfy.emit(client, None, raw=struct.pack(">II", 1, 2) + png_bytes(job.preview[0]))
        time.sleep(FOLLOW_SECONDS)
    if job.status != "interrupted":
        start()
    outputs: dict = {}
    try:
        ran = outcome(job)
        if ran.interrupted:
            event("execution_interrupted", {"node_id": plan.sampler_node, "node_type": "KSampler", "executed": []},
                  keep=True)
            status = "error"
        else:
            for node, (class_type, prefix) in plan.outputs.items():
                kind = "output" if class_type == "SaveImage" else "temp"
                images = comfy.save(ran.images, prefix if kind == "output" else f"ComfyUI_temp_{uuid.uuid4().hex[:5]}",
                                    kind)
                outputs[node] = {"images": images}
            status = "success"
    except (RequestError, SDError, JobFailed, OSError) as exc:
        event("execution_error", {"node_id": plan.sampler_node, "node_type": "KSampler", "executed": [],
                                  "exception_message": str(exc), "exception_type": type(exc).__name__,
                                  "traceback": [], "current_inputs": {}, "current_outputs": {}}, keep=True)
        status = "error"
    if status == "success":
        messages.append(["execution_success", {"prompt_id": pid, "timestamp": int(time.time() * 1000)}])
    queued = comfy.queued.pop(pid, None) or [0, pid, {}, {}, list(plan.outputs)]
    with comfy.lock:
        comfy.history[pid] = {"prompt": queued, "outputs": outputs,
                              "status": {"status_str": status, "completed": status == "success", "messages": messages},
                              "meta": {node: {"node_id": node, "display_node": node, "parent_node": None,
                                              "real_node_id": node} for node in outputs}}
        while len(comfy.history) > KEPT_HISTORY:
            comfy.history.popitem(last=False)
    for node, output in outputs.items():  # after the history: a client reading it on "executed" finds it
        event("executing", {"node": node, "display_node": node})
        event("executed", {"node": node, "display_node": node, "output": output})
    if status == "success":
        comfy.emit(client, "execution_success", messages[-1][1])
    event("executing", {"node": None, "display_node": None})  # the end marker
    comfy.emit(None, "status", comfy.status())


# -- routes ---------------------------------------------------------------------------------------------------

def router(server, comfy: Comfy, prefix: str = "") -> APIRouter:
    routes = APIRouter(prefix=prefix, strict_content_type=False)

    async def body_of(request: Request):
        try:
            return json.loads(await request.body() or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise RequestError("the body must be JSON") from None

    @routes.post("/prompt")
    async def post_prompt(request: Request):
        body = await body_of(request)
        return await asyncio.to_thread(queue_prompt, comfy, body)

    @routes.get("/prompt")
    def get_prompt() -> dict:
        return {"exec_info": {"queue_remaining": comfy.remaining()}}

    @routes.get("/history")
    def get_history(max_items: Optional[int] = None, offset: int = -1) -> dict:
        with comfy.lock:
            items = list(comfy.history.items())
        if offset >= 0:
            items = items[offset:]
        if max_items is not None:
            items = items[-max_items:] if max_items > 0 else []
        return dict(items)

    @routes.get("/history/{prompt_id}")
    def get_history_of(prompt_id: str) -> dict:
        with comfy.lock:
            entry = comfy.history.get(prompt_id)
        return {prompt_id: entry} if entry is not None else {}

    @routes.post("/history")
    async def post_history(request: Request) -> Response:
        body = await body_of(request)
        with comfy.lock:
            if isinstance(body, dict) and body.get("clear"):
                comfy.history.clear()
            for key in (body.get("delete") or []) if isinstance(body, dict) else []:
                comfy.history.pop(str(key), None)
        return Response(status_code=200)

    @routes.get("/queue")
    def get_queue() -> dict:
        running, pending = [], []
        for job in server.jobs.active():
            item = comfy.queued.get(job.id)
            if item is not None:
                (running if job.status == "running" else pending).append(item)
        return {"queue_running": running, "queue_pending": pending}

    @routes.post("/queue")
    async def post_queue(request: Request) -> Response:
        body = await body_of(request)
        wanted = None if isinstance(body, dict) and body.get("clear") else \
            {str(k) for k in (body.get("delete") or [])} if isinstance(body, dict) else set()
        for job in server.jobs.active():
            if job.status == "queued" and job.id in comfy.queued and (wanted is None or job.id in wanted):
                server.jobs.interrupt(job)  # a queued job never starts
        return Response(status_code=200)

    @routes.post("/interrupt")
    async def post_interrupt(request: Request) -> Response:
        body = await body_of(request)
        wanted = body.get("prompt_id") if isinstance(body, dict) else None
        if wanted:
            job = server.jobs.find(str(wanted))
            if job is not None and job.status == "running":
                server.jobs.interrupt(job)
        else:
            job = server.jobs.of_caller()
            if job is not None and job.status == "running":
                server.jobs.interrupt(job)
        return Response(status_code=200)

    @routes.post("/free")
    async def post_free(request: Request) -> Response:
        body = await body_of(request)
        if isinstance(body, dict) and body.get("unload_models"):
            await asyncio.to_thread(server.unload)
        return Response(status_code=200)

    @routes.get("/view")
    def get_view(filename: str, type: str = "output", subfolder: str = "", preview: Optional[str] = None,
                 channel: Optional[str] = None) -> Response:
        try:
            path = comfy.file(filename, type, subfolder)
        except PermissionError:
            return JSONResponse({"error": "Forbidden", "detail": "outside the folder"}, 403)
        if not path.is_file():
            return JSONResponse({"error": "NotFound", "detail": f"no file {filename}"}, 404)
        data = path.read_bytes()
        media = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(
            path.suffix.lower(), "application/octet-stream")
        if preview or channel:
            data, media = reencoded(data, preview, channel, server.max_pixels)
        # an upload named .png may hold anything: browsers must not sniff it into HTML
        return Response(data, media_type=media, headers={"Content-Disposition": f'filename="{path.name}"',
                                                         "X-Content-Type-Options": "nosniff"})

    async def upload(request: Request) -> dict:
        form = await request.form(max_files=1, max_fields=16)
        image = form.get("image")
        if not isinstance(image, UploadFile) and not hasattr(image, "read"):
            raise RequestError("image: a file is required (multipart form field 'image')")
        kind = str(form.get("type") or "input")
        subfolder = str(form.get("subfolder") or "")
        overwrite = str(form.get("overwrite") or "").lower() in ("true", "1")
        data = await image.read()
        name = os.path.basename(str(image.filename or "image.png").replace("\\", "/"))
        return await asyncio.to_thread(store_upload, comfy, data, name, kind, subfolder, overwrite)

    @routes.post("/upload/image")
    async def post_upload_image(request: Request) -> dict:
        return await upload(request)

    @routes.post("/upload/mask")
    async def post_upload_mask(request: Request) -> dict:
        return await upload(request)

    @routes.get("/object_info")
    def get_object_info() -> dict:
        return info(server, comfy)

    @routes.get("/object_info/{node_class}")
    def get_object_info_of(node_class: str) -> dict:
        everything = info(server, comfy)
        return {node_class: everything[node_class]} if node_class in everything else {}

    @routes.get("/system_stats")
    def get_system_stats() -> dict:
        return system_stats()

    @routes.get("/models")
    def get_models() -> list:
        return ["checkpoints", "loras"]

    @routes.get("/models/{folder}")
    def get_models_in(folder: str) -> list:
        from ldm.adapters.lora import list_loras

        if folder == "checkpoints":
            return checkpoint_names(server)
        if folder == "loras":
            return [f"{name}.safetensors" for name in list_loras(server.lora_folder())]
        return []

    @routes.get("/embeddings")
    def get_embeddings() -> list:
        return sorted(server.embedding_list()["loaded"])

    @routes.get("/features")
    def get_features() -> dict:
        return {"supports_preview_metadata": False}

    @routes.websocket("/ws")
    async def websocket(socket: WebSocket, clientId: Optional[str] = None):
        await socket.accept()
        sid = clientId if clientId and len(clientId) <= 128 else uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue(SOCKET_BACKLOG)
        pair = (asyncio.get_running_loop(), queue)
        with comfy.lock:
            comfy.sockets.setdefault(sid, []).append(pair)
        reader = asyncio.create_task(_drain(socket))
        try:
            await socket.send_text(json.dumps({"type": "status", "data": comfy.status(sid)}))
            while True:
                getting = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({getting, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getting not in done:
                    getting.cancel()
                    break
                message = getting.result()
                if isinstance(message, bytes):
                    await socket.send_bytes(message)
                else:
                    await socket.send_text(message)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            reader.cancel()
            with comfy.lock:
                pairs = comfy.sockets.get(sid, [])
                if pair in pairs:
                    pairs.remove(pair)
                if not pairs:
                    comfy.sockets.pop(sid, None)

    return routes


def _offer(queue: asyncio.Queue, message) -> None:
    try:
        queue.put_nowait(message)
    except asyncio.QueueFull:  # a client that stopped reading: its newest messages go
        pass


async def _drain(socket: WebSocket) -> None:
    """Read what the client sends (feature_flags; ignored) until it goes."""
    try:
        while True:
            message = await socket.receive()
            if message.get("type") == "websocket.disconnect":
                return
    except (WebSocketDisconnect, RuntimeError):
        return


def store_upload(comfy: Comfy, data: bytes, name: str, kind: str, subfolder: str, overwrite: bool) -> dict:
    """An upload kept under its name in the input folder ("name (1).ext" when another file has it)."""
    if kind not in ("input", "temp"):
        raise RequestError("type must be input or temp")
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        raise RequestError(f"uploads are pictures ({', '.join(IMAGE_SUFFIXES)}): got '{name[:80]}'")
    try:
        path = comfy.file(name, kind, subfolder)
    except PermissionError:
        raise RequestError("subfolder must stay inside the upload folder") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        stem, suffix, k = path.stem, path.suffix, 1
        while path.exists() and path.read_bytes() != data:
            path = path.with_name(f"{stem} ({k}){suffix}")
            k += 1
    path.write_bytes(data)
    return {"name": path.name, "subfolder": subfolder, "type": kind}


def reencoded(data: bytes, preview: Optional[str], channel: Optional[str], max_pixels: int) -> tuple[bytes, str]:
    """/view's preview=FORMAT;QUALITY and channel=rgb|a, as ComfyUI serves them."""
    from ldm.files.imageio import decode_picture

    image = decode_picture(io.BytesIO(data), "the file", "RGBA", max_pixels, bound="the server's max_pixels")
    if channel == "a":
        image = image.getchannel("A").convert("L")
    elif channel in ("rgb", None) and (channel == "rgb" or preview):
        image = image.convert("RGB")
    elif channel not in (None, "rgba"):
        raise RequestError("channel must be rgb, a or rgba")
    fmt, _, quality = (preview or "png").partition(";")
    if fmt not in ("webp", "jpeg", "png"):
        raise RequestError("preview must be webp, jpeg or png (with ;QUALITY)")
    out = io.BytesIO()
    image.save(out, format=fmt.upper(), quality=int(quality) if quality.isdigit() else 90)
    return out.getvalue(), f"image/{fmt}"


def checkpoint_names(server) -> list[str]:
    return [m["title"] for m in server.models()]


def info(server, comfy: Comfy) -> dict:
    from ldm.adapters.lora import list_loras

    from ldm.serve import controlnet

    return graph.object_info(checkpoint_names(server), [f"{n}.safetensors" for n in list_loras(server.lora_folder())],
                             comfy.inputs(), [path.name for path in controlnet.models(server).values()])


def system_stats() -> dict:
    import platform
    import sys

    import torch

    from ldm.serve.api import memory

    ram = memory()["ram"]
    devices = [{"name": "cpu", "type": "cpu", "index": None, "vram_total": ram.get("total", 0),
                "vram_free": ram.get("free", 0), "torch_vram_total": 0, "torch_vram_free": 0}]
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        devices = [{"name": torch.cuda.get_device_name(0), "type": "cuda", "index": 0, "vram_total": total,
                    "vram_free": free, "torch_vram_total": total, "torch_vram_free": free}]
    return {"system": {"os": os.name, "ram_total": ram.get("total", 0), "ram_free": ram.get("free", 0),
                       "comfyui_version": "0.3.64 (sd)", "required_frontend_version": "", "python_version": sys.version,
                       "pytorch_version": torch.__version__, "embedded_python": False, "argv": ["sd", "serve"],
                       "platform": platform.platform()},
            "devices": devices}
