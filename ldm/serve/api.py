"""The /sdapi/v1 routes: AUTOMATIC1111's API on the server's one model (see a1111.py for the fields)."""
from __future__ import annotations

import io
import time
from typing import Optional

from fastapi import APIRouter
from PIL import Image

from ldm.files import imageio, metadata
from ldm.errors import SDError
from ldm.pipeline import GeneratedImage
from ldm.serve import a1111, masks
from ldm.serve.a1111 import Img2ImgRequest, RequestError, Txt2ImgRequest
from ldm.serve.jobs import Call, Job, Prepared, Ran, generate
from ldm.serve.options import Settings
from ldm.serve.styles import apply_styles

A1111_MASK_BLUR = 4  # A1111's mask_blur when a request leaves it out


def prepare(server, request: Txt2ImgRequest) -> Prepared:
    """The request's pipeline settings after the A1111 fields sd cannot honour were refused."""
    a1111.refuse_unsupported(request)
    taken = Settings(kept=server.kept_options).take(request.override_settings, "override_settings")
    task = "img2img" if isinstance(request, Img2ImgRequest) else "txt2img"
    styles = server.styles() if request.styles else {}  # a broken styles file fails only the requests naming one
    prompt, negative, applied, unknown = apply_styles(styles, request.styles, request.prompt, request.negative_prompt)
    prompt, missing = without_missing_loras(server, prompt)
    settings = {**a1111.settings_of(request), "negative_prompt": negative, "limits": server.limits,
                "embeddings": server.embeddings, "lora_dir": server.lora_dir, "clip_skip": taken.clip_skip,
                **taken.request_fields(task)}
    if settings["eta"] is None:
        settings["eta"] = taken.eta_for(settings["sampler"])
    ignored = taken.ignored + [f"styles: {name}" for name in unknown] + \
        [f"<lora:{name}> (no such LoRA in the LoRA folder: left out, as A1111 does)" for name in missing]
    if request.save_images and server.outdir is None:
        ignored.append("save_images (not saved: the server has no --outdir)")
    from ldm.serve import controlnet

    units, unit_names, unit_ignored = controlnet.units_of(server, request, (request.width, request.height))
    if units:
        settings.update(control=units, names={**settings["names"], **unit_names})
    ignored += unit_ignored
    hires = None
    if request.enable_hr:
        from ldm.serve.extras import x4_models

        hires = a1111.hires_of(request, taken.kept["token_merging_ratio_hr"],
                               taken.kept["save_images_before_highres_fix"] and request.save_images, x4_models(server))
    if hires is not None:
        settings["hires"] = hires
    preview = taken.preview if taken.kept["show_progress_type"] != server.kept_options["show_progress_type"] else None
    return Prepared(prompt, settings, applied, ignored, taken.checkpoint, request.override_settings_restore_afterwards,
                    preview, request.force_task_id or None)


def respond(server, request: Txt2ImgRequest, prepared: Prepared, ran: Ran, task: str) -> dict:
    """A1111's response: base64 PNGs (the bytes sd writes), the request echoed, `info` as a JSON string naming
    the model the images came from."""
    images = ran.images
    if request.save_images and server.outdir is not None:
        server.save(images, task)
    info = a1111.info_of(request, images, metadata.model_hash(ran.ckpt), server.title(ran.ckpt), ran.interrupted,
                         prepared.ignored, prepared.styles)
    return {"images": [a1111.encode_png(image.png()) for image in images] if request.send_images else [],
            "parameters": request.model_dump(), "info": info}


def without_missing_loras(server, prompt: str) -> tuple[str, list[str]]:
    """The prompt without its <lora:NAME> tags that name no LoRA of the server's folder, and those names: A1111
    warns and draws without them, and clients count on that (sd's commands refuse such a tag instead)."""
    from ldm.adapters.lora import list_loras
    from ldm.text.syntax import drop_lora_tags

    if "<lora:" not in prompt:
        return prompt, []
    listed = list_loras(server.lora_folder())
    return drop_lora_tags(prompt, lambda name: name in listed)


def rounded_size(request: Txt2ImgRequest, prepared: Prepared) -> tuple[Optional[int], Optional[int]]:
    """(width, height) rounded down to multiples of 8 where they are not, as A1111's latents round them;
    each rounding is reported in the info."""
    sizes = []
    for name in ("width", "height"):
        value = getattr(request, name)
        if value is not None and value % 8 and value > 8:
            prepared.ignored.append(f"{name} {value} rounded down to {value - value % 8} (a multiple of 8)")
            value -= value % 8
        sizes.append(value)
    return sizes[0], sizes[1]


def txt2img(server, request: Txt2ImgRequest) -> dict:
    prepared = prepare(server, request)
    width, height = rounded_size(request, prepared)

    call = Call("txt2img", (prepared.prompt,), dict(width=width, height=height, **prepared.settings))
    return respond(server, request, prepared, generate(server, prepared, call, "txt2img"), task="txt2img")


def img2img(server, request: Img2ImgRequest) -> dict:
    prepared = prepare(server, request)
    settings = prepared.settings
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
        call = Call("img2img", (image, prepared.prompt), dict(strength=request.denoising_strength, **settings))
        return respond(server, request, prepared, generate(server, prepared, call, "img2img"), task="img2img")
    return respond(server, request, prepared, inpaint(server, request, image, size, prepared), task="inpaint")


def inpaint(server, request: Img2ImgRequest, image: Image.Image, size: tuple[int, int], prepared: Prepared):
    """img2img with a mask: A1111's mask options (masks.py), then the pipeline's inpaint."""
    if request.inpainting_fill not in (0, 1):
        raise RequestError(f"sd cannot honour inpainting_fill {request.inpainting_fill}; 0 (fill) or 1 (original)")
    blur = A1111_MASK_BLUR if request.mask_blur is None else request.mask_blur
    if not 0 <= blur <= 64:
        raise RequestError(f"mask_blur must be from 0 to 64 (got {blur})")
    mask = masks.shape_mask(a1111.decode_image(request.mask, "mask", server.max_pixels, "RGBA"), image.size, blur,
                            bool(request.inpainting_mask_invert))
    start = masks.fill_masked(image, mask) if request.inpainting_fill == 0 else image
    strength, settings = request.denoising_strength, prepared.settings
    if not request.inpaint_full_res:
        picture, repaint = start.resize(size, Image.LANCZOS), mask.resize(size, Image.BILINEAR)
        return generate(server, prepared, Call("inpaint", (picture, repaint, prepared.prompt),
                                               dict(strength=strength, **settings)), "img2img")
    box = masks.crop_box(mask, max(0, request.inpaint_full_res_padding), size[0] / size[1])
    crop, crop_mask = start.crop(box).resize(size, Image.LANCZOS), mask.crop(box).resize(size, Image.BILINEAR)
    ran = generate(server, prepared, Call("inpaint", (crop, crop_mask, prepared.prompt),
                                          dict(strength=strength, **settings)), "img2img")
    return Ran([only_masked(image, mask, box, result, request.inpaint_full_res_padding) for result in ran.images],
               ran.interrupted, ran.ckpt)


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
    try:  # PNG text chunks, or a JPEG's or WebP's EXIF UserComment (where A1111 writes the parameters)
        texts = metadata.image_texts(io.BytesIO(a1111.decode_base64(data, "image")))
    except SDError as exc:
        raise RequestError(str(exc)) from None
    text = texts.get(metadata.PARAMETERS_KEY, "")
    parameters = {}
    if text:
        info = metadata.Infotext.read(text)
        parameters = {"Prompt": info.prompt, "Negative prompt": info.negative_prompt, **info.fields}
    return {"info": text, "items": {k: v for k, v in texts.items() if k != metadata.PARAMETERS_KEY},
            "parameters": parameters}


def progress(server, skip_current_image: bool = False) -> dict:
    """A1111's /progress, for the caller's job (its running one, else its queued one, else whatever runs: one
    machine's A1111 has one job at a time); current_image is the latest live preview (the running batch's first
    image, PNG), made while clients ask for it. job_count counts every queued and running job."""
    if not skip_current_image:
        server.want_preview()
    job = server.jobs.of_caller()
    state = job if job is not None and job.status == "running" else server.worker.state
    # a model switch or an extra on the front's worker is no table job, but one more job all the same
    count = len(server.jobs.active()) + (1 if state is not None and not isinstance(state, Job) else 0)
    if state is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": {"skipped": False, "interrupted": False,
                "stopping_generation": False, "job": "", "job_count": count, "job_timestamp": "", "job_no": 0,
                "sampling_step": 0, "sampling_steps": 0},
                "current_image": None, "textinfo": "In queue..." if job is not None else None}
    done = state.step / state.steps if state.steps else 0.0
    elapsed = time.time() - state.started
    return {"progress": done, "eta_relative": elapsed / done - elapsed if done else 0.0,
            "state": {"skipped": state.skipped, "interrupted": state.interrupted, "stopping_generation": False,
                      "job": state.job, "job_count": max(count, 1),
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(state.started)),
                      "job_no": state.job_no, "sampling_step": state.step, "sampling_steps": state.steps},
            "current_image": None if skip_current_image or not state.preview else
            a1111.encode_png(imageio.png_bytes(state.preview[0])),
            "textinfo": f"step {state.step} of {state.steps}" if state.steps else None}


def task_progress(server, body: a1111.TaskProgressRequest) -> dict:
    """A1111's POST /internal/progress: one job's progress by the id it was queued with (force_task_id): where
    it stands, and its live preview when one newer than id_live_preview exists."""
    if body.live_preview:
        server.want_preview()
    job = server.jobs.find(body.id_task) if body.id_task else None
    reply = {"active": False, "queued": False, "completed": False, "progress": None, "eta": None,
             "live_preview": None, "id_live_preview": body.id_live_preview, "textinfo": None}
    if job is None:
        return {**reply, "textinfo": "Unknown task"}
    if job.status == "queued":
        ahead = server.jobs.position(job)
        return {**reply, "queued": True, "textinfo": f"In queue: {ahead} job(s) ahead" if ahead else "Waiting..."}
    if job.status != "running":
        return {**reply, "completed": True, "progress": 1.0, "textinfo": job.status}
    done = job.step / job.steps if job.steps else 0.0
    elapsed = time.time() - job.started
    reply.update(active=True, progress=done, eta=elapsed / done - elapsed if done else None,
                 textinfo=f"step {job.step} of {job.steps}" if job.steps else "Starting...")
    if body.live_preview and job.preview and job.preview_step > body.id_live_preview:
        reply.update(live_preview="data:image/png;base64," + a1111.encode_png(imageio.png_bytes(job.preview[0])),
                     id_live_preview=job.preview_step)
    return reply


def addressed(server, id_task: Optional[str]):
    """The job /interrupt or /skip means: the one of `id_task` (sd's extension: a 404 when unknown), else the
    caller's (JobTable.of_caller)."""
    if id_task is None:
        return server.jobs.of_caller()
    job = server.jobs.find(id_task)
    if job is None:
        raise a1111.NotFound(f"no job '{id_task}' (an id from force_task_id or the reply's info)")
    return job


def memory() -> dict:
    """A1111's /memory: the machine's RAM (from /proc/meminfo) and this process's resident set, in bytes."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info[key] = int(value.split()[0]) * 1024
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * 4096
    except (OSError, ValueError, IndexError):
        return {"ram": {"error": "not on Linux"}, "cuda": {"error": "unavailable"}}
    total, free = info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemFree", 0))
    cuda = {"error": "unavailable"}
    import torch

    if torch.cuda.is_available():
        free_b, total_b = torch.cuda.mem_get_info()
        cuda = {"system": {"free": free_b, "used": total_b - free_b, "total": total_b}}
    return {"ram": {"free": free, "used": total - free, "total": total, "process": resident}, "cuda": cuda}


def samplers() -> list[dict]:
    from ldm.models.diffusion.sampler_names import SAMPLER_INFO

    return [{"name": info.label, "aliases": [name, *a1111.SAMPLER_ALIASES.get(info.label, [])], "options": {}}
            for name, info in SAMPLER_INFO.items()]


def schedulers() -> list[dict]:
    """A1111's /schedulers for the schedules sd runs: "automatic" and "normal" (uniform timesteps, which A1111
    calls Normal) as A1111 names them, then sd's schedules under their labels."""
    from ldm.models.diffusion.sampler_names import SCHEDULE_LABELS

    def entry(name: str, label: str) -> dict:
        return {"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}

    return [entry("automatic", "Automatic"), entry("normal", "Normal")] + [
        entry(name, label) for name, label in SCHEDULE_LABELS.items()]


def router(server) -> APIRouter:
    """The /sdapi/v1 routes bound to `server` (ldm.serve.app.Server)."""
    # strict_content_type off: a JSON body without a Content-Type header is read as JSON, as A1111's FastAPI
    # did (Dify's SD tool posts json.dumps(...) with none); a body sent as another type stays refused
    return _bind(APIRouter(prefix="/sdapi/v1", strict_content_type=False), server)


def internal_router(server) -> APIRouter:
    """A1111's POST /internal/progress (one job by id), and sd's GET /sd/v1/jobs and /sd/v1/replicas: the queue
    and the replicas as they stand."""
    routes = APIRouter(strict_content_type=False)

    @routes.post("/internal/progress")
    def post_task_progress(body: a1111.TaskProgressRequest) -> dict:
        return task_progress(server, body)

    @routes.get("/sd/v1/jobs")
    def get_jobs() -> list[dict]:
        return [{"id": job.id, "job": job.job, "status": job.status, "replica": job.replica,
                 "checkpoint": server.title(job.checkpoint) if job.checkpoint else None,
                 "step": job.step, "steps": job.steps} for job in server.jobs.active()]

    @routes.get("/sd/v1/replicas")
    def get_replicas() -> list[dict]:
        return server.jobs.backend.replicas()

    return routes


def _bind(api: APIRouter, server) -> APIRouter:
    @api.post("/txt2img")
    def post_txt2img(request: Txt2ImgRequest) -> dict:
        return txt2img(server, request)

    @api.post("/img2img")
    def post_img2img(request: Img2ImgRequest) -> dict:
        return img2img(server, request)

    @api.post("/png-info")
    def post_png_info(body: a1111.JSONObject) -> dict:
        return png_info(server, body)

    @api.get("/progress")
    def get_progress(skip_current_image: bool = False) -> dict:
        return progress(server, skip_current_image)

    @api.post("/interrupt")
    def post_interrupt(id_task: Optional[str] = None) -> dict:
        job = addressed(server, id_task)
        if job is None:  # a model switch or an extra running on the front's worker
            server.worker.interrupt()
        else:
            server.jobs.interrupt(job)
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
    def post_options(body: a1111.JSONObject) -> dict:
        return {"ignored": server.set_options(body)}

    @api.get("/samplers")
    def get_samplers() -> list[dict]:
        return samplers()

    @api.get("/schedulers")
    def get_schedulers() -> list[dict]:
        return schedulers()

    @api.get("/upscalers")
    def get_upscalers() -> list:
        from ldm.serve import extras

        return extras.upscalers(server)

    @api.get("/scripts")
    def get_scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @api.post("/skip")
    def post_skip(id_task: Optional[str] = None) -> dict:
        server.jobs.skip(addressed(server, id_task))
        return {}

    @api.get("/prompt-styles")
    def get_prompt_styles() -> list[dict]:
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in server.styles().values()]

    @api.get("/hypernetworks")
    def get_hypernetworks() -> list[dict]:
        return server.hypernetworks()

    @api.get("/face-restorers")
    def get_face_restorers() -> list:
        return []  # sd restores no faces (restore_faces is refused unless false)

    @api.get("/sd-vae")
    def get_sd_vae() -> list:
        return []  # the checkpoint's own VAE only: sd_vae "Automatic" or "None"

    @api.get("/latent-upscale-modes")
    def get_latent_upscale_modes() -> list:
        from ldm.hires import LATENT_MODES

        return [{"name": name} for name in LATENT_MODES]

    @api.get("/cmd-flags")
    def get_cmd_flags() -> dict:
        return server.flags()

    @api.get("/loras")
    def get_loras() -> list[dict]:
        return server.loras()

    @api.post("/refresh-loras")
    def post_refresh_loras() -> dict:
        return {}

    @api.get("/embeddings")
    def get_embeddings() -> dict:
        return server.embedding_list()

    @api.get("/memory")
    def get_memory() -> dict:
        return memory()

    @api.post("/unload-checkpoint")
    def post_unload() -> dict:
        server.unload()
        return {}

    @api.post("/reload-checkpoint")
    def post_reload() -> dict:
        server.reload()
        return {}

    @api.post("/interrogate")
    def post_interrogate(body: a1111.JSONObject):
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": "NotImplemented", "detail": "sd has no interrogator (CLIP or DeepBooru "
                             "captioning): it would need weights sd does not ship or download", "body": "",
                             "errors": ""}, status_code=501)

    @api.post("/extra-single-image")
    def post_extra_single(body: a1111.JSONObject) -> dict:
        from ldm.serve import extras

        return extras.single(server, body)

    @api.post("/extra-batch-images")
    def post_extra_batch(body: a1111.JSONObject) -> dict:
        from ldm.serve import extras

        return extras.batch(server, body)

    return api
