"""Real AUTOMATIC1111 clients, replayed: the request sequences SillyTavern, Open WebUI, modelfusion and a
Discord bot send (read from their source), through real HTTP against `sd serve` on tiny checkpoints, and
the A1111 settings, routes and interrupt behaviour they rely on."""
import base64
import io
import json
import shutil
from pathlib import Path
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from ldm.files import metadata
from ldm.limits import Limits
from ldm.pipeline import Pipeline
from ldm.serve.app import Server
from tests.serving import serving

A1111_TXT2IMG = "/sdapi/v1/txt2img"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_ckpts, monkeypatch_module):
    """sd serve over a models folder of two tiny txt2img checkpoints, with a styles.csv beside it."""
    from ldm.loading import detect
    from tests.tinyckpt import build_tiny, save_tiny

    root = tmp_path_factory.mktemp("clients")
    models = root / "models"
    models.mkdir()
    shutil.copy(tiny_ckpts["eps"]["safetensors"], models / "first.safetensors")
    save_tiny(build_tiny("tiny-v2-inference.yaml", 11), models / "second.safetensors")
    (root / "styles.csv").write_text('name,prompt,negative_prompt\nwatercolor,"{prompt}, watercolor",blurry\n'
                                     'sharp,highly detailed,\n')
    monkeypatch_module.setattr(detect, "reference_config", lambda kind: tiny_ckpts["eps"]["config"])
    pipe = Pipeline.load(models / "first.safetensors", device="cpu", precision="full", quiet=True)
    server = Server(pipe, models_dir=models, limits=Limits(max_side=1024, max_steps=400, max_batch=4, max_images=8),
                    max_pixels=4_000_000, max_body=8 * 2 ** 20)
    with serving(server) as (url, port):
        yield server, url


def get(url, path, **kwargs):
    r = requests.get(url + path, timeout=120, **kwargs)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r.json()


def post(url, path, body, status=200):
    r = requests.post(url + path, json=body, timeout=300)
    assert r.status_code == status, (path, r.status_code, r.text)
    return r.json()


def png_of(answer, k=0) -> bytes:
    return base64.b64decode(answer["images"][k])


# -- SillyTavern (src/endpoints/stable-diffusion.js, source "auto") ------------------------------------------
def test_sillytavern_start_up_model_switch_and_generate(served):
    server, url = served
    get(url, "/sdapi/v1/options")  # /ping
    upscalers = [x["name"] for x in get(url, "/sdapi/v1/upscalers")]
    latent = [x["name"] for x in get(url, "/sdapi/v1/latent-upscale-modes")]
    upscalers[1:1] = latent  # "0 = None, then Latent Upscalers, then Upscalers"
    assert upscalers[0] == "None"
    assert [x["model_name"] for x in get(url, "/sdapi/v1/sd-vae")] == []
    samplers = [x["name"] for x in get(url, "/sdapi/v1/samplers")]
    assert "DPM++ 2M" in samplers and "Euler a" in samplers
    assert "karras" in [x["name"] for x in get(url, "/sdapi/v1/schedulers")]
    titles = [x["title"] for x in get(url, "/sdapi/v1/sd-models")]
    assert titles == ["first.safetensors", "second.safetensors"]
    assert get(url, "/sdapi/v1/options")["sd_model_checkpoint"] == "first.safetensors"  # /get-model
    post(url, "/sdapi/v1/options", {"sd_model_checkpoint": "second.safetensors"})  # /set-model
    progress = get(url, "/sdapi/v1/progress")
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0  # its wait loop ends at once
    assert get(url, "/sdapi/v1/options")["sd_model_checkpoint"] == "second.safetensors"
    get(url, "/sdapi/v1/options")  # /generate reads the options first (is it Forge?)
    body = {"url": url, "auth": "", "prompt": "a cube", "negative_prompt": "blurry", "sampler_name": "DPM++ 2M",
            "scheduler": "Karras", "steps": 3, "cfg_scale": 7, "width": 256, "height": 256, "restore_faces": False,
            "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 1.0, "hr_additional_modules": [],
            "denoising_strength": 0.5, "hr_second_pass_steps": 0, "seed": 5, "clip_skip": 1,
            "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"},
            "override_settings_restore_afterwards": True, "save_images": True, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False}
    answer = post(url, A1111_TXT2IMG, body)
    info = json.loads(answer["info"])
    assert len(answer["images"]) == 1 and info["sd_model_name"] == "second.safetensors"
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in info["infotexts"][0]
    assert any("save_images" in x for x in info["ignored_settings"])  # no --outdir: said, not a 422
    assert {"sd_vae_name", "sd_vae_hash", "version"} <= set(info)
    post(url, "/sdapi/v1/options", {"sd_model_checkpoint": "first.safetensors"})


def test_an_interrupted_generate_answers_with_the_partial_image(served):
    """SillyTavern posts /interrupt when its user closes the request; A1111 answers the txt2img with the
    image as it stands, and clients read images[0]."""
    server, url = served
    answer = {}

    def generate():
        answer.update(post(url, A1111_TXT2IMG, {"prompt": "a cube", "steps": 300, "width": 256, "height": 256,
                                                "seed": 3, "sampler_name": "Euler"}))

    thread = threading.Thread(target=generate)
    thread.start()
    deadline = time.time() + 120
    while get(url, "/sdapi/v1/progress")["state"]["sampling_step"] < 6 and time.time() < deadline:
        time.sleep(0.05)
    # the live preview (step 5's x0, decoded) is A1111's current_image; skip_current_image leaves it out
    preview = Image.open(io.BytesIO(base64.b64decode(get(url, "/sdapi/v1/progress")["current_image"])))
    assert preview.size == (256, 256) and np.asarray(preview).std() > 1
    assert get(url, "/sdapi/v1/progress?skip_current_image=true")["current_image"] is None
    post(url, "/sdapi/v1/interrupt", {})
    thread.join(120)
    info = json.loads(answer["info"])
    assert info["interrupted"] is True and len(answer["images"]) == 1
    image = Image.open(io.BytesIO(png_of(answer)))
    assert image.size == (256, 256) and np.asarray(image).std() > 1  # a picture, not a blank
    assert metadata.png_text_chunks(io.BytesIO(png_of(answer)))["parameters"] == info["infotexts"][0]
    assert "Steps: 300" in info["infotexts"][0]


# -- Open WebUI (backend/open_webui/routers/images.py, engine "automatic1111") ---------------------------------
def test_open_webui_switches_models_by_posting_back_the_options(served):
    server, url = served
    options = get(url, "/sdapi/v1/options")
    options["sd_model_checkpoint"] = "second.safetensors"
    answer = post(url, "/sdapi/v1/options", options)  # the whole dict back, as Open WebUI sends it
    assert get(url, "/sdapi/v1/options")["sd_model_checkpoint"] == "second.safetensors"
    assert answer["ignored"] and "sd_model_checkpoint" not in answer["ignored"]
    made = post(url, A1111_TXT2IMG, {"prompt": "a cube", "batch_size": 1, "width": 256, "height": 256, "steps": 2,
                                     "negative_prompt": "", "seed": 1})
    assert json.loads(made["info"])["sd_model_name"] == "second.safetensors"
    post(url, "/sdapi/v1/options", {"sd_model_checkpoint": "first.safetensors"})


# -- modelfusion (AUTOMATIC1111 image generation model: override_settings names the checkpoint) --------------
def test_modelfusion_names_the_model_with_its_hash_for_one_request(served):
    server, url = served
    listed = {x["title"]: x for x in get(url, "/sdapi/v1/sd-models")}
    second_hash = metadata.model_hash(listed["second.safetensors"]["filename"])
    plain = post(url, A1111_TXT2IMG, {"prompt": "a cube", "steps": 2, "width": 256, "height": 256, "seed": 9,
                                      "override_settings": {"sd_model_checkpoint": f"second.safetensors [{second_hash}]"}})
    assert json.loads(plain["info"])["sd_model_hash"] == second_hash
    assert get(url, "/sdapi/v1/options")["sd_model_checkpoint"] == "first.safetensors"  # restored afterwards
    by_hash = post(url, A1111_TXT2IMG, {"prompt": "a cube", "steps": 2, "width": 256, "height": 256, "seed": 9,
                                        "override_settings": {"sd_model_checkpoint": second_hash}})
    assert png_of(by_hash) == png_of(plain)


# -- a Discord bot's start-up: it iterates the lists; styles as A1111 applies them ---------------------------
def test_a_discord_bots_start_up_lists_and_styles(served):
    server, url = served
    styles = get(url, "/sdapi/v1/prompt-styles")
    assert [s["name"] for s in styles] == ["watercolor", "sharp"]
    for path in ("/sdapi/v1/face-restorers", "/sdapi/v1/upscalers", "/sdapi/v1/loras", "/sdapi/v1/sd-vae"):
        assert isinstance(get(url, path), list)
    assert set(get(url, "/sdapi/v1/embeddings")) == {"loaded", "skipped"}
    assert "api" in get(url, "/sdapi/v1/cmd-flags")
    memory = get(url, "/sdapi/v1/memory")["ram"]
    assert 0 < memory["process"] < memory["total"] and memory["used"] + memory["free"] == memory["total"]
    answer = post(url, A1111_TXT2IMG, {"prompt": "a cube", "steps": 2, "width": 256, "height": 256, "seed": 2,
                                       "styles": ["None", "watercolor", "sharp"]})
    info = json.loads(answer["info"])
    prompt, negative, _ = metadata.parse_parameters(info["infotexts"][0])
    assert prompt == "a cube, watercolor, highly detailed" and negative == "blurry"
    assert info["styles"] == ["watercolor", "sharp"] and "styles: None" in info["ignored_settings"]


# -- settings sd honours, ignores or refuses ----------------------------------------------------------------
def test_override_settings_are_honoured_ignored_or_refused_by_name(served):
    server, url = served
    base = {"prompt": "a cube", "steps": 2, "width": 256, "height": 256, "seed": 4}
    plain = post(url, A1111_TXT2IMG, base)
    skipped = post(url, A1111_TXT2IMG, {**base, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert "Clip skip: 2" in json.loads(skipped["info"])["infotexts"][0] and png_of(skipped) != png_of(plain)
    same = post(url, A1111_TXT2IMG, {**base, "override_settings": {"samples_format": "jpg", "show_progressbar": False,
                                                                   "randn_source": "CPU", "eta_noise_seed_delta": 0}})
    assert png_of(same) == png_of(plain)
    assert json.loads(same["info"])["ignored_settings"] == ["samples_format", "show_progressbar"]
    for key, value in (("eta_noise_seed_delta", 31337), ("randn_source", "GPU"), ("sd_vae", "vae-ft-mse.pt"),
                       ("CLIP_stop_at_last_layers", 40)):
        refused = requests.post(url + A1111_TXT2IMG, json={**base, "override_settings": {key: value}}, timeout=60)
        assert refused.status_code == 422 and f"override_settings.{key}" in refused.json()["detail"], refused.text
    refused = requests.post(url + "/sdapi/v1/options", json={"sd_model_checkpoint": "nowhere.ckpt"}, timeout=60)
    assert refused.status_code == 422 and "no checkpoint 'nowhere.ckpt'" in refused.json()["detail"]


def test_sizes_that_are_not_multiples_of_8_are_rounded_as_a1111_does(served):
    server, url = served
    answer = post(url, A1111_TXT2IMG, {"prompt": "a cube", "steps": 2, "width": 300, "height": 260, "seed": 1})
    info = json.loads(answer["info"])
    assert Image.open(io.BytesIO(png_of(answer))).size == (296, 256) and (info["width"], info["height"]) == (296, 256)
    assert any("width 300 rounded down to 296" in x for x in info["ignored_settings"])


def test_extras_resample_with_the_named_upscaler(served):
    server, url = served
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    for name, resample in (("Lanczos", Image.LANCZOS), ("Nearest", Image.NEAREST)):
        answer = post(url, "/sdapi/v1/extra-single-image", {"image": data, "upscaler_1": name, "upscaling_resize": 3})
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["image"]))))
        assert np.array_equal(got, np.asarray(picture.resize((90, 120), resample))), name
    batch = post(url, "/sdapi/v1/extra-batch-images", {"imageList": [{"data": data, "name": "a"}] * 2,
                                                       "resize_mode": 1, "upscaling_resize_w": 64,
                                                       "upscaling_resize_h": 48, "upscaler_1": "Lanczos"})
    assert [Image.open(io.BytesIO(base64.b64decode(x))).size for x in batch["images"]] == [(64, 48)] * 2
    bad = requests.post(url + "/sdapi/v1/extra-single-image", json={"image": data, "upscaler_1": "R-ESRGAN 4x+"},
                        timeout=30)
    assert bad.status_code == 422 and "R-ESRGAN 4x+" in bad.json()["detail"]
    said = requests.post(url + "/sdapi/v1/interrogate", json={"image": data}, timeout=30)
    assert said.status_code == 501 and "interrogator" in said.json()["detail"]


def test_png_info_reads_a_jpegs_exif_user_comment(served):
    server, url = served
    exif = Image.Exif()
    text = "a cube\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG", exif=exif)
    answer = post(url, "/sdapi/v1/png-info", {"image": base64.b64encode(buffer.getvalue()).decode()})
    assert answer["info"] == text and answer["parameters"]["Sampler"] == "Euler a"


def test_unload_frees_the_model_and_the_next_job_loads_it_again(served):
    server, url = served
    before = post(url, A1111_TXT2IMG, {"prompt": "a cube", "steps": 2, "width": 256, "height": 256, "seed": 6})
    post(url, "/sdapi/v1/unload-checkpoint", {})
    assert server.pipeline.model is None
    assert get(url, "/sdapi/v1/options")["sd_model_checkpoint"] == "first.safetensors"
    after = post(url, A1111_TXT2IMG, {"prompt": "a cube", "steps": 2, "width": 256, "height": 256, "seed": 6})
    assert server.pipeline.model is not None and png_of(after) == png_of(before)
    post(url, "/sdapi/v1/reload-checkpoint", {})
    again = post(url, A1111_TXT2IMG, {"prompt": "a cube", "steps": 2, "width": 256, "height": 256, "seed": 6})
    assert png_of(again) == png_of(before)


def test_extras_run_the_x4_diffusion_upscaler_of_the_models_folder(tmp_path, tiny_ckpts, monkeypatch):
    """An x4 checkpoint in the models folder is an upscaler of /upscalers; naming it runs the x4 model (loaded for
    the call, the served model put back), its exact 4x result resized to the asked size."""
    from ldm.loading import detect
    from tests.tinyckpt import build_tiny, save_tiny

    configs = Path(__file__).parent / "configs"
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_ckpts["eps"]["safetensors"], models / "base.safetensors")
    save_tiny(build_tiny("tiny-x4-upscaling.yaml", 5), models / "x4.safetensors")
    monkeypatch.setattr(detect, "reference_config", lambda kind: configs / (
        "tiny-x4-upscaling.yaml" if kind == "x4" else "tiny-v2-inference.yaml"))
    pipe = Pipeline.load(models / "base.safetensors", device="cpu", precision="full", quiet=True)
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (72, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    with serving(Server(pipe, models_dir=models)) as (url, port):
        names = [x["name"] for x in get(url, "/sdapi/v1/upscalers")]
        assert names == ["None", "Lanczos", "Nearest", "SD x4 (x4.safetensors)"]
        answer = post(url, "/sdapi/v1/extra-single-image", {"image": data, "upscaler_1": "SD x4 (x4.safetensors)",
                                                             "upscaling_resize": 2})
        got = Image.open(io.BytesIO(base64.b64decode(answer["image"])))
        assert get(url, "/sdapi/v1/options")["sd_model_checkpoint"] == "base.safetensors"  # put back
    x4 = Pipeline.load(models / "x4.safetensors", device="cpu", precision="full", quiet=True)
    expected = x4.upscale(picture, "", seed=0)[0].image  # the same call on the x4 model itself: 256x288, then to 128x144
    assert got.size == (128, 144) and np.array_equal(np.asarray(got), np.asarray(expected.resize((128, 144), Image.LANCZOS)))


# -- the second round (issue 37): calls A1111 answers that broke aiyabot, SDAI, aaa1111 and Dify -------------
def test_hypernetworks_are_listed_and_a_prompt_naming_one_is_one_line(served, tmp_path):
    server, url = served
    assert get(url, "/sdapi/v1/hypernetworks") == []  # aiyabot loops over it at start; SDAI refuses a 404
    folder = tmp_path / "hypernetworks"
    (folder / "styles").mkdir(parents=True)
    (folder / "anime.pt").write_bytes(b"not read")
    (folder / "styles" / "ink.safetensors").write_bytes(b"not read")
    (folder / "notes.txt").write_text("not a network")
    server.hypernetwork_dir = folder
    try:
        listed = get(url, "/sdapi/v1/hypernetworks")
    finally:
        server.hypernetwork_dir = None
    assert [(h["name"], Path(h["path"]).name) for h in listed] == [("anime", "anime.pt"), ("ink", "ink.safetensors")]
    refused = requests.post(url + A1111_TXT2IMG, json={"prompt": "a cube <hypernet:anime:0.8>", "steps": 1,
                                                      "width": 256, "height": 256}, timeout=60)
    assert refused.status_code == 422
    assert refused.json()["detail"] == ("prompt: <hypernet:anime...>: sd applies no hypernetworks (A1111's older "
                                        "add-on networks); take the tag out, or use a LoRA")


def test_difys_calls_without_a_content_type_are_read_as_json(served):
    """Dify's SD tool (langgenius/dify, tools/stable_diffusion.py) posts `data=json.dumps(...)` with httpx and no
    Content-Type header: the model switch first, then GET sd-models for the model names."""
    import http.client

    server, url = served
    host, port = url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"sd_model_checkpoint": "first"})
    connection.request("POST", "/sdapi/v1/options", body=body, headers={"Content-Length": str(len(body))})
    answer = connection.getresponse()
    assert answer.status == 200 and json.loads(answer.read()) == {"ignored": []}
    assert [m["model_name"] for m in get(url, "/sdapi/v1/sd-models")] == ["first", "second"]
    sent_as_text = requests.post(url + "/sdapi/v1/options", data=body, headers={"Content-Type": "text/plain"},
                                 timeout=30)
    assert sent_as_text.status_code == 422  # a body that says it is something else stays refused


def test_schedulers_list_normal_and_an_unknown_lora_is_left_out_as_a1111_does(served):
    server, url = served
    names = [s["name"] for s in get(url, "/sdapi/v1/schedulers")]
    assert names[:2] == ["automatic", "normal"] and {"karras", "sgm_uniform", "trailing"} <= set(names)
    base = {"prompt": "a cube", "steps": 2, "width": 256, "height": 256, "seed": 4}
    plain = post(url, A1111_TXT2IMG, base)
    tagged = post(url, A1111_TXT2IMG, {**base, "prompt": "a cube<lora:nowhere:0.7>"})
    info = json.loads(tagged["info"])
    assert "<lora:nowhere> (no such LoRA in the LoRA folder: left out, as A1111 does)" in info["ignored_settings"]
    assert png_of(tagged) == png_of(plain)  # drawn without it, as A1111 draws


def test_sd_models_leaves_the_x4_upscaler_to_the_upscalers(tmp_path, tiny_ckpts, monkeypatch):
    from ldm.loading import detect
    from tests.tinyckpt import build_tiny, save_tiny

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_ckpts["eps"]["safetensors"], models / "base.safetensors")
    save_tiny(build_tiny("tiny-x4-upscaling.yaml", 3), models / "x4-upscaler-ema.safetensors")
    monkeypatch.setattr(detect, "reference_config", lambda kind: tiny_ckpts["eps"]["config"])
    server = Server(Pipeline.load(models / "base.safetensors", device="cpu", precision="full", quiet=True),
                    models_dir=models)
    with serving(server) as (url, port):
        assert [m["model_name"] for m in get(url, "/sdapi/v1/sd-models")] == ["base"]
        assert "SD x4 (x4-upscaler-ema.safetensors)" in [u["name"] for u in get(url, "/sdapi/v1/upscalers")]


# -- a model switch never fails another request (issue 33's faults) ----------------------------------------
def test_readers_during_a_switch_and_a_job_racing_it_all_answer(served, monkeypatch):
    server, url = served
    real = Pipeline.load_model

    def slow_load(self, *args, **kwargs):  # a switch that takes a while, as a real 5 GB checkpoint does
        time.sleep(0.4)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "load_model", slow_load)
    base = {"prompt": "a cube", "steps": 24, "width": 256, "height": 256, "seed": 6}
    answers: dict = {}
    job = threading.Thread(target=lambda: answers.setdefault("job", requests.post(url + A1111_TXT2IMG, json=base,
                                                                                   timeout=300)))
    job.start()
    while not server.worker.progress()[0]:  # the job holds the model
        time.sleep(0.01)
    switch = threading.Thread(target=lambda: answers.setdefault("switch", requests.post(
        url + "/sdapi/v1/options", json={"sd_model_checkpoint": "second"}, timeout=300)))
    switch.start()
    statuses = []
    while switch.is_alive():
        for path in ("/sdapi/v1/options", "/sdapi/v1/sd-models", "/sdapi/v1/embeddings", "/sdapi/v1/loras",
                     "/sdapi/v1/progress", "/sdapi/v1/cmd-flags"):
            statuses.append(requests.get(url + path, timeout=60).status_code)
    job.join()
    switch.join()
    assert answers["switch"].status_code == 200 and len(statuses) > 6 and set(statuses) == {200}
    info = json.loads(answers["job"].json()["info"])
    assert info["sd_model_name"] == "first.safetensors"  # the model it started on, and its hash
    assert info["sd_model_hash"] == metadata.model_hash(server.models_dir / "first.safetensors")
    assert get(url, "/sdapi/v1/options")["sd_model_checkpoint"] == "second.safetensors"
    post(url, "/sdapi/v1/options", {"sd_model_checkpoint": "first"})


@pytest.mark.parametrize("raw", ['{"CLIP_stop_at_last_layers": Infinity}', '{"CLIP_stop_at_last_layers": NaN}',
                                 '{"CLIP_stop_at_last_layers": 1e400}', '{"comma_padding_backtrack": 1%s}' % ("0" * 400),
                                 '{"eta_ddim": -Infinity}', '{"token_merging_ratio": NaN}'])
def test_non_finite_and_huge_option_values_are_one_422_and_change_nothing(served, raw):
    server, url = served
    before = get(url, "/sdapi/v1/options")
    reply = requests.post(url + "/sdapi/v1/options", data=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == 422 and "Traceback" not in reply.text, reply.text
    assert get(url, "/sdapi/v1/options") == before
    reply = requests.post(url + A1111_TXT2IMG, data='{"prompt": "a", "steps": 1, "override_settings": %s}' % raw,
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert reply.status_code == 422
