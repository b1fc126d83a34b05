"""The web page of `sd serve` (gradio): a tab per task, a PNG-info tab, progress, Stop, downloadable PNGs.

Every tab's generate button runs a job on the server's worker (so page users and API clients share the
one model in arrival order) and polls its progress for the bar. Results are the PNG bytes the commands
write (watermark and "parameters" text), shown in a gallery from files in a private temporary folder,
so what a user downloads is exactly that file.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page works offline: nothing phones home

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.files import metadata  # noqa: E402
from ldm.errors import SDError  # noqa: E402
from ldm.limits import SERVER_LIMIT_NAMES  # noqa: E402
from ldm.serve import painter  # noqa: E402
from ldm.tasks import Depth2Img, Img2Img, Inpaint, Txt2Img, Upscale, Variations  # noqa: E402

TABS = ("txt2img", "img2img", "inpaint", "depth2img", "upscale", "variations", "png-info")
KEPT_FILES = 256  # result files kept for the gallery; older ones are removed
POLL_SECONDS = 0.25


def model_can_run(pipeline, task: str) -> Optional[str]:
    """Why the loaded model cannot run `task`, or None when it can (or when no model is in memory: unloaded,
    or a switch loading the next one; the task itself checks the model it runs on)."""
    model = pipeline.model
    if model is None:
        return None
    kind = type(model).__name__
    plain = getattr(model, "build_conditioning", None) is None
    unclip = kind == "ImageEmbeddingConditionedLatentDiffusion"
    needs = {"txt2img": plain, "img2img": plain or unclip, "inpaint": plain or kind == "LatentInpaintDiffusion",
             "depth2img": kind == "LatentDepth2ImageDiffusion", "upscale": kind == "LatentUpscaleDiffusion",
             "variations": unclip}
    if needs.get(task, True):
        return None
    wanted = {"depth2img": "a depth checkpoint (512-depth-ema.ckpt)", "upscale": "the x4 upscaler (x4-upscaler-ema.ckpt)",
              "variations": "a Stable unCLIP checkpoint (sd21-unclip-h.ckpt or sd21-unclip-l.ckpt)"}
    return f"The loaded model ({Path(pipeline.choice.ckpt).name}) cannot run {task}: it needs {wanted.get(task, 'a txt2img or inpainting checkpoint')}."


class Results:
    """PNG files of results in a private temporary folder, the newest KEPT_FILES kept."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="sd-serve-"))
        self.count = 0

    def write(self, images) -> list[str]:
        paths = []
        for image in images:
            self.count += 1
            path = self.folder / f"{self.count:06d}-{image.seed}.png"
            path.write_bytes(image.png())
            paths.append(str(path))
        for old in sorted(self.folder.glob("*.png"))[:-KEPT_FILES]:
            old.unlink(missing_ok=True)
        return paths


def follow_job(server, results: Results, make_task: Callable, prompt: str, settings: dict, progress: gr.Progress,
               save_as: Optional[str], extra: Optional[str] = None, owner: str = ""):
    """Queue a task on the server's job table and follow it: yields the live previews as they come (the gallery,
    the status line, no infotext yet), then (gallery files, status line, the first image's infotext[, extra]).
    Stopped, the images finished and the running batch's partial ones. `extra` names the task attribute
    the tab shows beside the images (depth2img's depth map)."""
    from ldm.serve.jobs import Call, Job, outcome

    try:
        request = server.pipeline.request(make_task(), prompt, **settings)
    except SDError as exc:
        raise gr.Error(str(exc)) from None
    call = Call("generate", (request,), {"names": PAGE_NAMES}, keep=(extra,) if extra else ())
    job = server.jobs.submit(Job(job="page", call=call, checkpoint=server.ckpt, owner=owner))
    shown = 0  # the step of the preview on the page
    while not job.future.done():
        server.want_preview()  # this page shows them
        if job.status == "running" and job.steps:
            progress((job.step, job.steps), desc=f"step {job.step} of {job.steps}")
            if job.preview is not None and job.preview_step > shown:
                shown = job.preview_step
                said = f"step {shown} of {job.steps}: preview"
                yield (list(job.preview), said, "") + ((gr.update(),) if extra else ())
        elif job.status == "queued":
            progress(None, desc=f"queued behind {server.jobs.position(job) + len(server.jobs.running())} job(s)")
        time.sleep(POLL_SECONDS)
    try:
        ran = outcome(job)
    except SDError as exc:
        raise gr.Error(str(exc)) from None
    images, side = ran.images, ran.kept.get(extra) if extra else None
    if ran.interrupted:
        status = f"stopped: {ran.stopped or 'before it started'}"
    else:
        status = f"{len(images)} image(s), seeds {', '.join(str(i.seed) for i in images)}"
    if save_as and images and server.outdir is not None:
        server.save(images, save_as)
        status += f"; saved under {Path(server.outdir) / (save_as + '-samples')}"
    files = results.write(images)
    infotext = images[0].parameters if images else ""
    yield (files, status, infotext) if extra is None else (files, status, infotext, side)


def page_owner(request: Optional[gr.Request]) -> str:
    """The page session a job is for (its Stop button stops that one)."""
    return f"page:{getattr(request, 'session_hash', None) or ''}"


def sampling_controls(tab: str, defaults: dict, size: Optional[int]) -> dict:
    """The knobs every task shares: negative prompt, sampler, schedule, steps, scale, seed, batch, size."""
    from ldm.models.diffusion.sampler_names import SAMPLER_INFO, SCHEDULE_LABELS

    c = {"negative_prompt": gr.Textbox(label="Negative prompt", lines=1, elem_id=f"{tab}-negative-prompt")}
    with gr.Row():
        # A1111's names shown (what its users and infotexts say), sd's names as the values
        c["sampler"] = gr.Dropdown([(info.label, name) for name, info in SAMPLER_INFO.items()],
                                   value=defaults["sampler"], label="Sampler", elem_id=f"{tab}-sampler")
        c["schedule"] = gr.Dropdown([("Automatic", "sampler's own"), *((label, name) for name, label in
                                                                        SCHEDULE_LABELS.items())],
                                    value=defaults["schedule"] or "sampler's own", label="Schedule type",
                                    elem_id=f"{tab}-schedule")
        c["steps"] = gr.Slider(1, 150, value=defaults["steps"], step=1, label="Steps", elem_id=f"{tab}-steps")
        c["scale"] = gr.Slider(1.0, 20.0, value=defaults["scale"], step=0.5, label="Guidance scale")
    with gr.Row():
        c["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id=f"{tab}-seed", scale=3)
        dice = gr.Button("Random", elem_id=f"{tab}-random-seed", scale=0, min_width=80)  # A1111: the dice
        reuse = gr.Button("Reuse", elem_id=f"{tab}-reuse-seed", scale=0, min_width=80)  # the last seed
        c["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{tab}-batch")
        c["n_iter"] = gr.Slider(1, 8, value=1, step=1, label="Batches")
        if size is not None:
            c["width"] = gr.Slider(256, 1024, value=size, step=64, label="Width")
            c["height"] = gr.Slider(256, 1024, value=size, step=64, label="Height")
    dice.click(lambda: -1, None, c["seed"], queue=False)  # random again
    c["reuse"] = reuse  # wired to the last result's seed by task_tab
    return c


# How the page names the fields of ldm.request.Request in messages: by its controls' labels.
PAGE_NAMES = {"prompt": "the prompt", "negative_prompt": "the negative prompt", "steps": "Steps",
              "scale": "Guidance scale", "seed": "Seed", "batch_size": "Batch size", "n_iter": "Batches",
              "width": "Width", "height": "Height", "sampler": "Sampler", "schedule": "Schedule type",
              "strength": "Strength", "noise_level": "Noise level", "hires.scale": "Upscale by",
              "hires.steps": "Hires steps", "hires.strength": "Denoising strength", "hires.upscaler": "Upscaler",
              "hires": "Hires. fix", "control.0.weight": "Control weight", "control.0.start": "Starting control step",
              "control.0.end": "Ending control step", "control.0.module": "Preprocessor", "control.0.image": "Control picture",
              "control.0.model": "the ControlNet model",
              **SERVER_LIMIT_NAMES}


def settings_from(values: dict, defaults: dict) -> dict:
    """Pipeline.request settings from the shared controls' values."""
    schedule = values["schedule"]
    return dict(negative_prompt=values["negative_prompt"] or "", sampler=values["sampler"],
                schedule=None if schedule == "sampler's own" else schedule, steps=int(values["steps"]),
                scale=float(values["scale"]), seed=int(values["seed"]), batch_size=int(values["batch_size"]),
                n_iter=int(values["n_iter"]))


def output_area(server, tab: str):
    """Gallery, status line, infotext, Generate/Stop (Stop only while a job runs) and the save checkbox."""
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", elem_id=f"{tab}-generate")
        stop = gr.Button("Stop", variant="stop", elem_id=f"{tab}-stop", interactive=False)
    save = gr.Checkbox(value=False, label=f"Also save under {server.outdir}" if server.outdir else
                       "Save to an outputs folder (start sd serve with --outdir)", interactive=server.outdir is not None)
    # preview: the first result shown whole, the others as thumbnails under it
    gallery = gr.Gallery(label="Results (download gives the PNG with its parameters)", elem_id=f"{tab}-gallery",
                         columns=4, height=512, object_fit="contain", preview=True, format="png", type="pil",
                         interactive=False)
    status = gr.Textbox(label="Status", interactive=False, elem_id=f"{tab}-status")
    infotext = gr.Textbox(label="Generation parameters", interactive=False, lines=3, elem_id=f"{tab}-infotext")
    def stop_job(request: gr.Request) -> None:
        server.jobs.interrupt(server.jobs.of_caller(page_owner(request)))

    stop.click(stop_job, None, None, queue=False)
    return generate, stop, save, gallery, status, infotext


# Where a result can be sent (A1111's "Send to img2img / inpaint / extras"): the picture goes to the tab's input;
# to txt2img go its parameters (prompt, sampler, steps, seed, size...), as from PNG info.
SEND_TARGETS = ("img2img", "inpaint", "upscale", "txt2img")


def send_buttons(tab: str) -> dict:
    """The send-to buttons under a tab's results (the tab's own target left out)."""
    with gr.Row():
        return {target: gr.Button(f"Send to {target}", size="sm", elem_id=f"{tab}-send-{target}")
                for target in SEND_TARGETS if target != tab}


def task_tab(server, results: Results, tab: str, inputs: Callable, make_task: Callable, extra_output=None,
             extra: Optional[str] = None, fields: Optional[Callable] = None):
    """One generating tab: its own inputs, the shared controls, and the run wiring; `fields(values)` gives
    Request fields of the tab's own inputs (the hires fix, ControlNet)."""
    pipe = server.pipeline
    reason = model_can_run(pipe, tab)
    if reason:
        gr.Markdown(f"**{reason}** Choose a checkpoint that can in the Checkpoint list above.")
    defaults = pipe.defaults(tab)
    sized = tab in ("txt2img", "variations")  # the others take their input's size
    with gr.Row(equal_height=False):  # settings left, results right, as A1111 and Forge; stacked when narrow
        with gr.Column(scale=1, min_width=360):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id=f"{tab}-prompt")
            own = inputs(defaults)
            controls = sampling_controls(tab, defaults, pipe.native_size if sized else None)
        with gr.Column(scale=1, min_width=360):
            generate, stop, save, gallery, status, infotext = output_area(server, tab)
            send = send_buttons(tab)
            side = extra_output() if extra_output else None
    reuse = controls.pop("reuse")
    names = list(own) + list(controls)

    def run(prompt_text, save_it, *values, request: gr.Request = None, progress=gr.Progress()):
        why = model_can_run(server.pipeline, tab)
        if why:
            raise gr.Error(why)
        given = dict(zip(names, values))
        _check_pixels(given.values(), server.max_pixels)
        # the page obeys the API's bounds and uses the server's embeddings
        settings = {**settings_from(given, defaults), "limits": server.limits, "embeddings": server.embeddings,
                    "lora_dir": server.lora_dir, **server.kept_settings(tab)}
        if sized:
            settings.update(height=int(given["height"]), width=int(given["width"]))
        if fields is not None:
            settings.update(fields(given))
        yield from follow_job(server, results, lambda: make_task(given), prompt_text, settings, progress,
                              tab if save_it else None, extra, page_owner(request))

    outputs = [gallery, status, infotext] + ([side] if side is not None else [])
    running = generate.click(lambda: (gr.update(interactive=True), gr.update(interactive=False)), None,
                             [stop, generate], queue=False)
    running.then(run, [prompt, save, *own.values(), *controls.values()], outputs).then(
        lambda: (gr.update(interactive=False), gr.update(interactive=True)), None, [stop, generate], queue=False)
    # the seed of the result shown, read from its infotext (a gr.State would hold a heartbeat connection open)
    reuse.click(lambda text: _number(metadata.Infotext.read(text or ""), "Seed", int, 0, 2 ** 64 - 1), infotext,
                controls["seed"], queue=False)
    return {"prompt": prompt, "controls": controls, "gallery": gallery, "infotext": infotext, "send": send,
            "image": own.get("image"), "tab": tab, "own": own}


def wire_send_to(tabs, parts: dict) -> None:
    """Each tab's send-to buttons: the result shown (the gallery's selected picture, else its first) goes to the
    target tab's picture, with the prompt and negative prompt of its parameters; the target tab opens."""
    for name, source in parts.items():
        selected = gr.Number(0, visible=False)
        source["gallery"].select(_selected_index, None, selected, queue=False)
        for target, button in source["send"].items():
            to = parts[target]
            if target == "txt2img":
                button.click(to_txt2img, source["infotext"], txt2img_fields(tabs, to), queue=False)
                continue
            button.click(_sent(target), [source["gallery"], selected, source["infotext"]],
                         [tabs, to["image"], to["prompt"], to["controls"]["negative_prompt"]], queue=False)


def _selected_index(event: gr.SelectData) -> int:
    return event.index


def _sent(target: str) -> Callable:
    def send(gallery, index, infotext):
        if not gallery:
            raise gr.Error("no result to send yet: Generate first")
        index = int(index) if index is not None and 0 <= int(index) < len(gallery) else 0
        picture = gallery[index][0]  # (PIL image, caption): gradio read it from its own cache
        info = metadata.Infotext.read(infotext or "")
        return gr.Tabs(selected=target), picture.convert("RGB"), info.prompt, info.negative_prompt
    return send


def _check_pixels(values, limit: int) -> None:
    """The server's max_pixels for uploaded pictures too (the painted mask is bounded where it is read)."""
    for picture in values:
        if isinstance(picture, Image.Image) and picture.width * picture.height > limit:
            raise gr.Error(f"the picture is {picture.width}x{picture.height} pixels, above the server's {limit} "
                           "(the server's max_pixels)")


def _uploaded(path) -> bool:
    """True for a file in gradio's upload folder: the one place a page call's file argument may name.
    (gradio checks this itself once its app counts as launched, see ldm.serve.app; this is a second wall.)"""
    from gradio.utils import get_upload_folder

    try:
        Path(path).resolve().relative_to(Path(get_upload_folder()).resolve())
        return Path(path).is_file()
    except (ValueError, OSError):
        return False


def _need(value, what: str):
    if value is None:
        raise gr.Error(f"upload {what} first")
    return value


def _number(info: metadata.Infotext, key: str, cast, low, high):
    """A parameters field as a control's value, or no change where it is missing, unreadable (Steps: 1e999)
    or outside the control's range: a crafted PNG must not break the page."""
    try:
        value = info.number(key, cast)
    except SDError:
        return gr.update()
    return value if value is not None and low <= value <= high else gr.update()


def checkpoint_picker(server):
    """The models folder's checkpoints (the list and its status line; wire_checkpoint_picker makes it work)."""
    with gr.Row():
        gr.Markdown("### sd: Stable Diffusion 2.x")
        picker = gr.Dropdown([m["title"] for m in server.models()], value=server.current_title(), label="Checkpoint",
                             elem_id="checkpoint", scale=3)
        said = gr.Markdown("", elem_id="checkpoint-status")

    return picker, said


DEFAULTED = ("sampler", "schedule", "steps", "scale")  # the controls a checkpoint's preset sets (SD-Turbo's)


def wire_checkpoint_picker(server, picker, said, parts: dict) -> None:
    """Choosing a checkpoint loads it on the worker (after the jobs queued before it), with progress, as POST
    /sdapi/v1/options does, and sets every tab's sampler, schedule type, steps and scale to its defaults (a
    few-step model's: 1 step, scale 1, Euler a, trailing)."""
    from ldm.serve.a1111 import RequestError

    outputs = [said] + [parts[tab]["controls"][key] for tab in parts for key in DEFAULTED]

    def pick(title, progress=gr.Progress()):
        if not title or title == server.current_title():
            return [gr.update()] * len(outputs)
        progress(None, desc=f"loading {title}")
        try:
            server.switch(title)
        except RequestError as exc:
            raise gr.Error(str(exc)) from None
        values = []
        for tab in parts:
            defaults = server.pipeline.defaults(tab)
            values += [defaults["sampler"], defaults["schedule"] or "sampler's own", defaults["steps"],
                       defaults["scale"]]
        return [f"loaded {server.current_title()}"] + values

    picker.change(pick, picker, outputs)


def page_theme() -> gr.themes.Theme:
    """gradio's default look with the system's fonts: its own theme fetches web fonts, which an offline
    machine cannot."""
    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])


def build_page(server, first_tab: str = "txt2img") -> gr.Blocks:
    """The page's Blocks (mounted at / by ldm.serve.app)."""
    results = Results()
    # delete_cache: uploads and result copies in gradio's cache older than an hour go every 10 minutes, so
    # a client uploading without end cannot keep the disk's space
    parts: dict = {}  # each generating tab's components that other tabs wire to
    with gr.Blocks(title="sd", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        picker, said = checkpoint_picker(server)
        with gr.Tabs(selected=first_tab) as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                parts["txt2img"] = task_tab(server, results, "txt2img",
                                            lambda d: {**hires_inputs(server), **control_inputs(server, "txt2img")},
                                            lambda g: Txt2Img(),
                                            fields=lambda g: {**hires_fields(server, g), **control_fields(server, g)})
            with gr.Tab("img2img", id="img2img"):
                parts["img2img"] = task_tab(server, results, "img2img", lambda d: {
                    "image": gr.Image(type="pil", label="Image", elem_id="img2img-image"),
                    "strength": gr.Slider(0.0, 1.0, value=d["strength"], step=0.05, label="Strength"),
                    **control_inputs(server, "img2img")},
                    lambda g: Img2Img(_need(g["image"], "an image"), g["strength"]),
                    fields=lambda g: control_fields(server, g))
            with gr.Tab("inpaint", id="inpaint"):
                parts["inpaint"] = task_tab(server, results, "inpaint", lambda d: {
                    "image": gr.Image(type="pil", label="Image", elem_id="inpaint-image"),
                    "mask": gr.HTML("", html_template=painter.TEMPLATE, css_template=painter.CSS,
                                    js_on_load=painter.painter_js("inpaint-image"), elem_id="inpaint-mask",
                                    label="Mask: paint over what to repaint")},
                    lambda g: Inpaint(_need(g["image"], "an image"),
                                      painter.mask_of(g["mask"], g["image"].size, server.max_pixels)))
                # (the inpaint tab's inputs are a picture and a painted mask; its ControlNet is the API's and the CLI's)
            with gr.Tab("depth2img", id="depth2img"):
                parts["depth2img"] = task_tab(server, results, "depth2img", lambda d: {
                    "image": gr.Image(type="pil", label="Image", elem_id="depth2img-image"),
                    "strength": gr.Slider(0.0, 1.0, value=d["strength"], step=0.05, label="Strength")},
                    lambda g: Depth2Img(_need(g["image"], "an image"), g["strength"]),
                    extra_output=lambda: gr.Image(label="Depth map used", type="pil", elem_id="depth2img-depth"),
                    extra="depth")
            with gr.Tab("upscale", id="upscale"):
                parts["upscale"] = task_tab(server, results, "upscale", lambda d: {
                    "image": gr.Image(type="pil", label="Low-resolution image", elem_id="upscale-image"),
                    "noise_level": gr.Slider(0, 350, value=d["noise_level"], step=1, label="Noise level")},
                    lambda g: Upscale(_need(g["image"], "an image"), int(g["noise_level"])))
            with gr.Tab("variations", id="variations"):
                parts["variations"] = task_tab(server, results, "variations", variation_inputs, variations_of)
            with gr.Tab("png-info", id="png-info"):
                png_info_tab(tabs, parts["txt2img"])
        wire_send_to(tabs, parts)
        wire_checkpoint_picker(server, picker, said, parts)
    return page


def variation_inputs(defaults: dict) -> dict:
    """Stable unCLIP: a picture, optionally a second one mixed in with a weight, the embedding's noise level."""
    with gr.Row():
        first = gr.Image(type="pil", label="Picture", elem_id="variations-image")
        second = gr.Image(type="pil", label="Second picture to mix in (optional)", elem_id="variations-image2")
    return {"image": first, "image2": second,
            "mix": gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Share of the second picture"),
            "noise_level": gr.Slider(0, 999, value=defaults["noise_level"], step=1,
                                     label="Noise level (higher: further from the pictures)")}


def variations_of(given: dict) -> Variations:
    pictures = [_need(given["image"], "a picture")] + ([given["image2"]] if given["image2"] is not None else [])
    share = float(given["mix"])
    weights = [1.0 - share, share] if len(pictures) == 2 else [1.0]
    return Variations(pictures, weights, int(given["noise_level"]))


def png_info_tab(tabs, txt2img: dict) -> None:
    """Read the "parameters" of a picture (sd's or A1111's: PNG text, or JPEG/WebP EXIF), show the picture, and
    send the parameters back to txt2img."""
    with gr.Row():
        upload = gr.File(label="A picture made by sd or AUTOMATIC1111 (PNG, JPEG, WebP): drop it here",
                         file_types=[".png", ".jpg", ".jpeg", ".webp"], elem_id="png-info-file")
        shown = gr.Image(label="Picture", interactive=False, type="filepath", elem_id="png-info-picture")
    text = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="png-info-text")
    send = gr.Button("Send to txt2img", elem_id="png-info-send")

    def read(path):
        if not path:
            return "", None
        if not _uploaded(path):
            raise gr.Error("PNG info reads only a picture uploaded to this page")
        try:
            texts = metadata.read_image_texts(path)
        except SDError as exc:
            return str(exc), None
        return texts.get(metadata.PARAMETERS_KEY, "(no generation parameters)"), path

    upload.change(read, upload, [text, shown])
    send.click(to_txt2img, text, txt2img_fields(tabs, txt2img))


def txt2img_fields(tabs, txt2img: dict) -> list:
    """What to_txt2img fills, in its order (the txt2img tab's part)."""
    controls, own = txt2img["controls"], txt2img["own"]
    return [tabs, txt2img["prompt"], controls["negative_prompt"], controls["sampler"], controls["schedule"],
            controls["steps"], controls["scale"], controls["seed"], controls["width"], controls["height"],
            own["hr_enabled"], own["hr_upscaler"], own["hr_scale"], own["hr_steps"], own["hr_strength"]]


def to_txt2img(parameters: str) -> list:
    """A "parameters" text (sd's or A1111's) as the txt2img tab's values, the tab opened; a field sd cannot
    read or that is out of a control's range leaves that control as it is."""
    from ldm.limits import SEED_MAX

    info = metadata.Infotext.read(parameters or "")
    width, height = (str(info.fields.get("Size", "x")).split("x") + [""])[:2]
    info.fields.update(Width=width, Height=height)
    try:
        sampler, schedule = info.sampler() if "Sampler" in info.fields else (gr.update(), gr.update())
    except SDError:  # a sampler sd does not have: the controls keep theirs
        sampler, schedule = gr.update(), gr.update()
    return [gr.Tabs(selected="txt2img"), info.prompt, info.negative_prompt, sampler,
            "sampler's own" if schedule is None else schedule, _number(info, "Steps", int, 1, 150),
            _number(info, "CFG scale", float, 1.0, 20.0), _number(info, "Seed", int, -1, SEED_MAX),
            _number(info, "Width", int, 256, 1024), _number(info, "Height", int, 256, 1024), *hires_values(info)]


def hires_values(info: metadata.Infotext) -> list:
    """The hires controls' values from a "parameters" text: on with its fields, off without them."""
    from ldm.hires import UPSCALERS, X4

    if "Hires upscaler" not in info.fields and "Hires upscale" not in info.fields:
        return [False, gr.update(), gr.update(), gr.update(), gr.update()]
    upscaler = info.fields.get("Hires upscaler")
    known = upscaler in UPSCALERS and upscaler != X4  # an x4 model's name: the dropdown keeps its choice
    return [True, upscaler if known else gr.update(), _number(info, "Hires upscale", float, 1.0, 4.0),
            _number(info, "Hires steps", int, 0, 150), _number(info, "Denoising strength", float, 0.0, 1.0)]


def hires_inputs(server) -> dict:
    """The txt2img tab's hires fix (A1111's "Hires. fix"): off unless ticked. Its upscalers: the latent modes,
    Lanczos, Nearest and the models folder's x4 upscalers ("SD x4 (NAME)", as /upscalers names them)."""
    from ldm.hires import UPSCALERS, X4
    from ldm.serve.extras import x4_models

    with gr.Accordion("Hires. fix", open=False):
        c = {"hr_enabled": gr.Checkbox(False, label="Hires. fix: a second pass at a larger size", elem_id="txt2img-hires")}
        with gr.Row():
            choices = [name for name in UPSCALERS if name != X4] + list(x4_models(server))
            c["hr_upscaler"] = gr.Dropdown(choices, value="Latent", label="Upscaler", elem_id="txt2img-hr-upscaler")
            c["hr_scale"] = gr.Slider(1.0, 4.0, value=2.0, step=0.05, label="Upscale by", elem_id="txt2img-hr-scale")
        with gr.Row():
            c["hr_steps"] = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0: the same as Steps)",
                                      elem_id="txt2img-hr-steps")
            c["hr_strength"] = gr.Slider(0.0, 1.0, value=0.7, step=0.01, label="Denoising strength",
                                         elem_id="txt2img-hr-strength")
    return c


def hires_fields(server, given: dict) -> dict:
    from ldm.hires import X4, Hires
    from ldm.serve.extras import x4_models

    if not given.get("hr_enabled"):
        return {}
    upscaler, x4 = given["hr_upscaler"], x4_models(server).get(given["hr_upscaler"])
    return {"hires": Hires(scale=float(given["hr_scale"]), upscaler=X4 if x4 is not None else upscaler,
                           x4=None if x4 is None else str(x4), steps=int(given["hr_steps"]),
                           strength=float(given["hr_strength"]))}


def control_inputs(server, tab: str) -> dict:
    """A ControlNet unit (the extension's panel): a picture, its preprocessor, a model of the ControlNet folder."""
    from ldm.control.preprocess import MODULES
    from ldm.control.units import MODES, RESIZES
    from ldm.serve.controlnet import models

    names = list(models(server))
    with gr.Accordion("ControlNet", open=False):
        c = {"cn_enabled": gr.Checkbox(False, label="Enable", elem_id=f"{tab}-cn-enabled")}
        c["cn_image"] = gr.Image(type="pil", label="Control picture", elem_id=f"{tab}-cn-image")
        with gr.Row():
            c["cn_module"] = gr.Dropdown(list(MODULES), value="none", label="Preprocessor", elem_id=f"{tab}-cn-module")
            c["cn_model"] = gr.Dropdown(names, value=names[0] if names else None, label=f"Model ({len(names)} in "
                                        "the ControlNet folder)", elem_id=f"{tab}-cn-model")
        with gr.Row():
            c["cn_weight"] = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Control weight", elem_id=f"{tab}-cn-weight")
            c["cn_start"] = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Starting control step")
            c["cn_end"] = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Ending control step")
        c["cn_mode"] = gr.Radio(list(MODES.values()), value="Balanced", label="Control mode", elem_id=f"{tab}-cn-mode")
        c["cn_resize"] = gr.Radio(list(RESIZES.values()), value="Crop and Resize", label="Resize mode")
    return c


def control_fields(server, given: dict) -> dict:
    """The ControlNet unit of the panel's values ({} when it is off)."""
    from ldm.control.units import ControlUnit, parse_mode, parse_resize
    from ldm.serve.controlnet import models

    if not given.get("cn_enabled"):
        return {}
    path = models(server).get(given.get("cn_model") or "")
    if path is None:
        raise gr.Error("ControlNet: choose a model of the ControlNet folder (sd serve --controlnet-dir)")
    picture = _need(given.get("cn_image"), "a control picture")
    return {"control": (ControlUnit(model=str(path), image=np.asarray(picture.convert("RGB")),
                                    module=given["cn_module"], weight=float(given["cn_weight"]),
                                    start=float(given["cn_start"]), end=float(given["cn_end"]),
                                    mode=parse_mode(given["cn_mode"]), resize=parse_resize(given["cn_resize"])),)}
