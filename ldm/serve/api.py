"""The /sdapi/v1 routes: AUTOMATIC1111's API on the server's one model (see a1111.py for the fields)."""
from __future__ import annotations

import io
import time

from fastapi import APIRouter
from PIL import Image

from ldm.files import imageio

from ldm.files import metadata
from ldm.errors import SDError
from ldm.pipeline import Cancelled, GeneratedImage
from ldm.serve import a1111, masks
from ldm.serve.a1111 import Img2ImgRequest, RequestError, Txt2ImgRequest

A1111_MASK_BLUR = 4  # A1111's mask_blur when a request leaves it out


def generate(server, job) -> tuple[list[GeneratedImage], bool]:
    """Run a generating job on the worker: (images, interrupted). An interrupt returns the batches done."""
    try:
        return server.worker.run("generate", job), False
    except Cancelled as stop:
        return stop.images, True
    except SDError as exc:
        raise RequestError(str(exc)) from None


def respond(server, request: Txt2ImgRequest, images: list[GeneratedImage], interrupted: bool, task: str) -> dict:
    """A1111's response: base64 PNGs (the bytes sd writes), the request echoed, `info` as a JSON string."""
    if request.save_images:
        server.save(images, task)
    title = server.current_title()
    return {"images": [a1111.encode_png(image.png()) for image in images] if request.send_images else [],
            "parameters": request.model_dump(), "info": a1111.info_of(request, images, server.current_hash(), title,
                                                                       interrupted)}


def checked(server, request: Txt2ImgRequest) -> dict:
    """The request's pipeline settings after the A1111 fields sd cannot honour were refused."""
    a1111.refuse_unsupported(request, server.current_title())
    if request.save_images and server.outdir is None:
        raise RequestError("save_images needs a folder: start the server with sd serve --outdir DIR")
    return {**a1111.settings_of(request), "limits": server.limits, "embeddings": server.embeddings,
            "lora_dir": server.lora_dir}


def txt2img(server, request: Txt2ImgRequest) -> dict:
    settings = checked(server, request)

    def job(pipe, progress):
        return pipe.txt2img(request.prompt, width=request.width, height=request.height, progress=progress, **settings)

    return respond(server, request, *generate(server, job), task="txt2img")


def img2img(server, request: Img2ImgRequest) -> dict:
    settings = checked(server, request)
    if len(request.init_images) != 1:
        raise RequestError(f"init_images must hold one image (got {len(request.init_images)})")
    if request.resize_mode != 0:
        raise RequestError(f"sd cannot honour resize_mode {request.resize_mode}; only 0 (just resize)")
    for name in ("width", "height"):  # bounded before any resize: a 2**40 side must not reach PIL
        value = getattr(request, name)
        if value is not None and value != 0 and not 1 <= value <= server.limits.max_side:
            raise RequestError(f"{name} must be from 1 to {server.limits.max_side} (got {value})")
    image = a1111.decode_image(request.init_images[0], "init_images[0]", server.max_pixels)
    size = (request.width or image.width, request.height or image.height)
    if request.mask is None:
        image = image.resize(size, Image.LANCZOS) if size != image.size else image

        def job(pipe, progress):
            return pipe.img2img(image, request.prompt, strength=request.denoising_strength, progress=progress,
                                **settings)

        return respond(server, request, *generate(server, job), task="img2img")
    return respond(server, request, *inpaint(server, request, image, size, settings), task="inpaint")


def inpaint(server, request: Img2ImgRequest, image: Image.Image, size: tuple[int, int], settings: dict):
    """img2img with a mask: A1111's mask options (masks.py), then the pipeline's inpaint."""
    if request.inpainting_fill not in (0, 1):
        raise RequestError(f"sd cannot honour inpainting_fill {request.inpainting_fill}; 0 (fill) or 1 (original)")
    blur = A1111_MASK_BLUR if request.mask_blur is None else request.mask_blur
    if not 0 <= blur <= 64:
        raise RequestError(f"mask_blur must be from 0 to 64 (got {blur})")
    mask = masks.shape_mask(a1111.decode_image(request.mask, "mask", server.max_pixels), image.size, blur,
                            bool(request.inpainting_mask_invert))
    start = masks.fill_masked(image, mask) if request.inpainting_fill == 0 else image
    strength = request.denoising_strength
    if not request.inpaint_full_res:
        picture, repaint = start.resize(size, Image.LANCZOS), mask.resize(size, Image.BILINEAR)

        def job(pipe, progress):
            return pipe.inpaint(picture, repaint, request.prompt, strength=strength, progress=progress, **settings)

        return generate(server, job)
    box = masks.crop_box(mask, max(0, request.inpaint_full_res_padding), size[0] / size[1])
    crop, crop_mask = start.crop(box).resize(size, Image.LANCZOS), mask.crop(box).resize(size, Image.BILINEAR)

    def job(pipe, progress):
        return pipe.inpaint(crop, crop_mask, request.prompt, strength=strength, progress=progress, **settings)

    images, interrupted = generate(server, job)
    return [only_masked(image, mask, box, result, request.inpaint_full_res_padding) for result in images], interrupted


def only_masked(original: Image.Image, mask: Image.Image, box, result: GeneratedImage, padding: int) -> GeneratedImage:
    """The full picture with a crop's result pasted into its masked part, watermarked as a whole, and the
    parameters text of the whole picture (its size, A1111's "Inpaint area" fields)."""
    pasted = imageio.apply_watermark(masks.paste_back(original, result.image, box, mask))
    info = metadata.Infotext.read(result.parameters)
    info.fields.update({"Size": f"{original.width}x{original.height}", "Inpaint area": "Only masked",
                        "Masked area padding": padding})
    return GeneratedImage(pasted, result.seed, info.text(), result.index, result.batch_size, result.position)


def png_info(server, body: dict) -> dict:
    data = body.get("image") if isinstance(body, dict) else None
    try:
        texts = metadata.png_text_chunks(io.BytesIO(a1111.decode_base64(data, "image")))
    except SDError as exc:
        raise RequestError(str(exc)) from None
    text = texts.get(metadata.PARAMETERS_KEY, "")
    parameters = {}
    if text:
        info = metadata.Infotext.read(text)
        parameters = {"Prompt": info.prompt, "Negative prompt": info.negative_prompt, **info.fields}
    return {"info": text, "items": {k: v for k, v in texts.items() if k != metadata.PARAMETERS_KEY},
            "parameters": parameters}


def progress(server) -> dict:
    state, waiting = server.worker.progress()
    if state is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": {"skipped": False, "interrupted": False, "job": "",
                "job_count": waiting, "job_timestamp": "", "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
                "current_image": None, "textinfo": None}
    done = state.step / state.steps if state.steps else 0.0
    elapsed = time.time() - state.started
    return {"progress": done, "eta_relative": elapsed / done - elapsed if done else 0.0,
            "state": {"skipped": False, "interrupted": state.interrupted, "job": state.job, "job_count": waiting + 1,
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(state.started)),
                      "job_no": state.job_no, "sampling_step": state.step, "sampling_steps": state.steps},
            "current_image": None, "textinfo": f"step {state.step} of {state.steps}" if state.steps else None}


def samplers() -> list[dict]:
    from ldm.models.diffusion.sampler_names import SAMPLER_INFO

    return [{"name": info.label, "aliases": [name, *a1111.SAMPLER_ALIASES.get(info.label, [])], "options": {}}
            for name, info in SAMPLER_INFO.items()]


def schedulers() -> list[dict]:
    from ldm.models.diffusion.sampler_names import SCHEDULE_LABELS

    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}] + [
        {"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for name, label in SCHEDULE_LABELS.items()]


def router(server) -> APIRouter:
    """The /sdapi/v1 routes bound to `server` (ldm.serve.app.Server)."""
    return _bind(APIRouter(prefix="/sdapi/v1"), server)


def _bind(api: APIRouter, server) -> APIRouter:
    @api.post("/txt2img")
    def post_txt2img(request: Txt2ImgRequest) -> dict:
        return txt2img(server, request)

    @api.post("/img2img")
    def post_img2img(request: Img2ImgRequest) -> dict:
        return img2img(server, request)

    @api.post("/png-info")
    def post_png_info(body: dict) -> dict:
        return png_info(server, body)

    @api.get("/progress")
    def get_progress() -> dict:
        return progress(server)

    @api.post("/interrupt")
    def post_interrupt() -> dict:
        server.worker.interrupt()
        return {}

    @api.get("/sd-models")
    def get_models() -> list[dict]:
        return server.models()

    @api.post("/refresh-checkpoints")
    def post_refresh() -> dict:
        return {}

    @api.get("/options")
    def get_options() -> dict:
        return server.options()

    @api.post("/options")
    def post_options(body: dict) -> dict:
        server.set_options(body)
        return {}

    @api.get("/samplers")
    def get_samplers() -> list[dict]:
        return samplers()

    @api.get("/schedulers")
    def get_schedulers() -> list[dict]:
        return schedulers()

    @api.get("/upscalers")
    def get_upscalers() -> list:
        return []

    @api.get("/scripts")
    def get_scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    return api
