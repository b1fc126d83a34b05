"""`sd serve`'s API driven by a client no one here wrote (webuiapi), under load and under attack."""
import base64
import io
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from ldm.files.imageio import read_watermark
from ldm.cli import main
from ldm.limits import Limits
from ldm.pipeline import Pipeline
from ldm.serve.app import Server
from tests.serving import serving

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "configs"
webuiapi = pytest.importorskip("webuiapi")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_ckpts):
    """A models folder with a tiny txt2img and a tiny inpainting checkpoint (their configs beside them)."""
    from tests.tinyckpt import build_tiny, save_tiny

    folder = tmp_path_factory.mktemp("models")
    shutil.copy(tiny_ckpts["eps"]["safetensors"], folder / "tiny-eps.safetensors")
    save_tiny(build_tiny("tiny-v2-inpainting.yaml", 3), folder / "tiny-inpaint.ckpt")
    return folder


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from tests.conftest import smooth_photo

    root = tmp_path_factory.mktemp("photo")
    Image.fromarray(smooth_photo()).save(root / "photo.png")
    mask = np.zeros((300, 260), np.uint8)
    mask[100:200, 80:180] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root / "photo.png", root / "mask.png"


@pytest.fixture(scope="module")
def tiny_server(models, monkeypatch_module):
    """A server on the tiny checkpoints: ldm.loading.detect picks the tiny configs for them."""
    from ldm.loading import detect

    monkeypatch_module.setattr(detect, "reference_config", lambda kind: CONFIGS / {
        "eps": "tiny-v2-inference.yaml", "inpaint": "tiny-v2-inpainting.yaml"}[kind])
    monkeypatch_module.setattr(detect, "probe_parameterization", lambda model: ("eps", 1.0))
    pipe = Pipeline.load(models / "tiny-eps.safetensors", device="cpu", precision="full", quiet=True)
    server = Server(pipe, models_dir=models, limits=Limits(max_side=1024, max_steps=400, max_batch=4, max_images=8),
                    max_pixels=4_000_000, max_body=8 * 2 ** 20)
    with serving(server) as (url, port):
        yield server, url, port


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def command_images(args, outdir):
    assert main([*args, "--precision", "full", "--device", "cpu", "--outdir", str(outdir)]) == 0
    return [Image.open(p) for p in sorted((outdir / "samples").glob("*.png"))]


def test_webuiapi_txt2img_gives_the_commands_pixels(tiny_server, models, tmp_path):
    server, url, port = tiny_server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3)
    result = api.txt2img(prompt="a cube", negative_prompt="blurry", seed=7, width=256, height=320, cfg_scale=7.5,
                         batch_size=2)
    expected = command_images(["txt2img", "--ckpt", str(models / "tiny-eps.safetensors"), "--config",
                               str(CONFIGS / "tiny-v2-inference.yaml"), "--prompt", "a cube", "-n", "blurry",
                               "--seed", "7", "--W", "256", "--H", "320", "--scale", "7.5", "--n_samples", "2",
                               "--n_iter", "1", "--steps", "3", "--sampler", "euler_a"], tmp_path)
    assert len(result.images) == 2
    for got, want in zip(result.images, expected):
        assert np.array_equal(pixels(got), pixels(want))
        assert read_watermark(got.convert("RGB")) == b"SDV2"
    assert result.info["all_seeds"] == [7, 8] and result.info["infotexts"][0].startswith("a cube\nNegative prompt: blurry")
    info = api.png_info(result.images[1])
    assert info.info == result.info["infotexts"][1] and info.parameters["Seed"] == "8"


def test_webuiapi_switches_models_and_inpaints_with_a_mask(tiny_server, photo, tmp_path):
    server, url, port = tiny_server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3)
    assert api.util_get_model_names() == ["tiny-eps.safetensors", "tiny-inpaint.ckpt"]
    api.util_set_model("tiny-inpaint")
    assert api.util_get_current_model() == "tiny-inpaint.ckpt"
    image, mask = Image.open(photo[0]), Image.open(photo[1])
    # sd's own inpainting, asked for in A1111's terms: whole picture, original fill, no blur, full strength
    result = api.img2img(images=[image], mask_image=mask, prompt="a door", seed=3, denoising_strength=1.0,
                         inpainting_fill=1, inpaint_full_res=False, mask_blur=0, width=260, height=300, cfg_scale=7.5)
    expected = command_images(["inpaint", "--ckpt", str(server.models_dir / "tiny-inpaint.ckpt"), "--image",
                               str(photo[0]), "--mask", str(photo[1]), "--prompt", "a door", "--seed", "3",
                               "--n_samples", "1", "--n_iter", "1", "--steps", "3", "--sampler", "euler_a",
                               "--scale", "7.5"], tmp_path)
    assert np.array_equal(pixels(result.images[0]), pixels(expected[0]))
    # A1111's defaults (only masked, fill, mask blur 4, strength 0.75): the picture keeps its size and the
    # pixels away from the mask (which only the watermark touches)
    result = api.img2img(images=[image], mask_image=mask, prompt="a door", seed=3, width=256, height=256)
    got, before = pixels(result.images[0]), pixels(image)
    assert got.shape == before.shape
    away = np.ones(before.shape[:2], bool)
    away[90:210, 70:190] = False
    assert np.abs(got - before)[away].mean() < 1.5 and np.abs(got - before)[~away].mean() > 5
    api.util_set_model("tiny-eps.safetensors")


def test_fields_sd_cannot_honour_are_named_in_a_422(tiny_server):
    server, url, port = tiny_server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=2)
    api.txt2img(prompt="x", width=256, height=256, restore_faces=False, enable_hr=False, tiling=False)  # defaults: fine
    with pytest.raises(RuntimeError) as refused:
        api.txt2img(prompt="x", width=256, height=256, restore_faces=True, tiling=True)
    status, text = refused.value.args
    assert status == 422 and "restore_faces, tiling" in json.loads(text)["detail"]
    answer = requests.post(f"{url}/sdapi/v1/txt2img", json={"sampler_name": "LMS", "width": 256, "height": 256})
    assert answer.status_code == 422 and "unknown sampler 'LMS'" in answer.json()["detail"]


def huge_png_header() -> bytes:
    """A PNG that claims 100000 x 100000 pixels (its IHDR is valid; there is no pixel data)."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_a_burst_of_bad_requests_gets_4xx_and_a_good_one_still_succeeds(tiny_server):
    server, url, port = tiny_server
    good = {}

    def good_request():
        good["answer"] = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "ok", "steps": 2, "seed": 1,
                                                                        "width": 256, "height": 256})

    bad = [
        ("txt2img", {"prompt": "x" * (9 * 2 ** 20)}, 413),
        ("img2img", {"init_images": [base64.b64encode(huge_png_header()).decode()]}, 422),
        ("img2img", {"init_images": ["not base64 at all!"]}, 422),
        ("img2img", {"init_images": ["/etc/passwd"]}, 422),
        ("txt2img", {"steps": -5}, 422),
        ("txt2img", {"steps": "many"}, 422),
        ("txt2img", {"sampler_name": "Unknown"}, 422),
        ("txt2img", {"batch_size": 4, "n_iter": 100}, 422),
        ("png-info", {"image": "@@@"}, 422),
        ("options", {"sd_model_checkpoint": "../../etc/passwd"}, 422),
    ]
    worker = threading.Thread(target=good_request)
    for k, (route, body, status) in enumerate(bad):
        if k == 3:
            worker.start()
        answer = requests.post(f"{url}/sdapi/v1/{route}", json=body)
        assert answer.status_code == status, (route, answer.text)
        assert set(answer.json()) >= {"error", "detail"} and "\n" not in answer.json()["detail"]
    answer = requests.post(f"{url}/sdapi/v1/txt2img", data=b"{not json", headers={"content-type": "application/json"})
    assert answer.status_code == 422
    worker.join(60)
    assert good["answer"].status_code == 200 and len(good["answer"].json()["images"]) == 1


def test_interrupt_stops_the_running_job_within_a_step(tiny_server):
    server, url, port = tiny_server
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(r=requests.post(f"{url}/sdapi/v1/txt2img", json={
        "prompt": "long", "steps": 400, "width": 256, "height": 256, "seed": 2, "sampler_name": "Euler"})))
    thread.start()
    deadline = time.time() + 90  # generous on a loaded machine; the loop ends as soon as step 3 is seen
    while requests.get(f"{url}/sdapi/v1/progress").json()["state"]["sampling_step"] < 3 and time.time() < deadline:
        time.sleep(0.05)
    step = requests.get(f"{url}/sdapi/v1/progress").json()["state"]["sampling_step"]
    assert requests.post(f"{url}/sdapi/v1/interrupt").status_code == 200
    thread.join(30)
    info = json.loads(answer["r"].json()["info"])
    # A1111's answer: the image as it stood when interrupted (the running batch's partial image)
    assert answer["r"].status_code == 200 and info["interrupted"] and len(answer["r"].json()["images"]) == 1
    assert 3 <= step < 400
    # the server goes on
    assert requests.post(f"{url}/sdapi/v1/txt2img", json={"steps": 1, "width": 256, "height": 256}).status_code == 200


def test_previews_are_decoded_only_while_someone_watches(tiny_server, monkeypatch):
    """A live preview made by the VAE costs a decode: a job nobody watches makes none; polling /progress
    (without skip_current_image) makes one every 5 steps when asked for "Full" previews, and one every step
    with the default cheap previews (A1111's "Approx cheap"), which cost next to nothing."""
    server, url, port = tiny_server
    decoded = []
    real = Pipeline.preview
    monkeypatch.setattr(Pipeline, "preview", lambda self, x, method="full": decoded.append(method) or real(self, x, method))
    body = {"prompt": "a cube", "steps": 20, "width": 256, "height": 256, "seed": 1, "sampler_name": "Euler"}
    full = {**body, "override_settings": {"show_progress_type": "Full"}}
    from ldm.serve import worker

    with monkeypatch.context() as unwatched:  # an earlier test's /progress polls are forgotten
        unwatched.setattr(worker, "WATCH_SECONDS", 0.0)
        assert requests.post(f"{url}/sdapi/v1/txt2img", json=full).status_code == 200
        assert requests.post(f"{url}/sdapi/v1/txt2img", json=body).status_code == 200
    assert decoded == []
    server.worker.want_preview()  # what the page's poll and /progress do
    assert requests.post(f"{url}/sdapi/v1/txt2img", json=full).status_code == 200
    assert decoded == ["full"] * 3  # steps 5, 10 and 15 (not the last: the result itself follows)
    decoded.clear()
    server.worker.want_preview()
    assert requests.post(f"{url}/sdapi/v1/txt2img", json=body).status_code == 200
    assert decoded == ["cheap"] * 19


def test_a_vanished_client_does_not_stop_the_server(tiny_server):
    server, url, port = tiny_server
    with socket.create_connection(("127.0.0.1", port)) as s:  # half a body, then gone
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": \"a")
    with pytest.raises(requests.exceptions.Timeout):  # a client that gives up while its job runs
        requests.post(f"{url}/sdapi/v1/txt2img", json={"steps": 60, "width": 256, "height": 256}, timeout=0.3)
    answer = requests.post(f"{url}/sdapi/v1/txt2img", json={"steps": 1, "width": 256, "height": 256, "seed": 4})
    assert answer.status_code == 200 and json.loads(answer.json()["info"])["all_seeds"] == [4]


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_eight_clients_on_the_demo_model_get_their_own_images(tmp_path):
    pipe = Pipeline.load(device="cpu", quiet=True)
    reference = {seed: pipe.txt2img("a red circle on a blue background", seed=seed, steps=2)[0].png()
                 for seed in range(100, 140)}
    server = Server(pipe)
    answers, errors = {}, []

    def client(k):
        try:
            api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="DDIM", steps=2)
            for j in range(5):
                seed = 100 + 5 * k + j
                r = api.txt2img(prompt="a red circle on a blue background", seed=seed, width=256, height=256,
                                cfg_scale=5.0, eta=0.0)
                answers[seed] = r.json["images"]
        except Exception as exc:  # reported below, with the client's number
            errors.append((k, exc))

    with serving(server) as (url, port):
        client(0)  # warm the allocator before measuring
        before = resident_bytes()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        after = resident_bytes()
    assert errors == []
    assert sorted(answers) == list(range(100, 140))
    for seed, images in answers.items():
        assert len(images) == 1 and base64.b64decode(images[0]) == reference[seed], seed
    # measured: +6.3 MiB over the first 40 requests, +0.4 and +0.3 over the next rounds of 40
    assert after - before < 64 * 2 ** 20


def test_auth_guards_the_api_and_the_page(tmp_path):
    pipe = Pipeline.load(device="cpu", quiet=True)
    with serving(Server(pipe), auth=("ann", "s3cret"), page=True) as (url, port):
        for path in ("/", "/sdapi/v1/sd-models", "/docs"):
            assert requests.get(url + path).status_code == 401
            assert requests.get(url + path, auth=("ann", "wrong")).status_code == 401
            assert requests.get(url + path, auth=("ann", "s3cret")).status_code == 200
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username="ann", password="s3cret")
        assert api.util_get_model_names() == ["demo.safetensors"]


def test_sd_serve_refuses_an_open_host_without_auth_before_loading():
    code = ("import sys\nfrom ldm.cli import main\n"
            "print(main(['serve', '--host', '0.0.0.0', '--ckpt', '/no/such.ckpt']), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["1", "False"]
    assert done.stderr.strip().startswith("error: --host 0.0.0.0 lets other machines connect")
    assert done.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("script, tab", [("inpainting", "inpaint"), ("depth2img", "depth2img"),
                                         ("superresolution", "upscale")])
def test_the_reference_gradio_command_lines_open_sd_serve(script, tab, monkeypatch):
    import runpy

    seen = {}
    import ldm.cli.entry

    monkeypatch.setattr(ldm.cli.entry, "main", lambda command=None, argv=None: seen.update(command=command, argv=argv) or 0)
    monkeypatch.setattr(sys, "argv", [script, "configs/x.yaml", "model.ckpt", "--port", "7000"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "scripts" / "gradio" / f"{script}.py"), run_name="__main__")
    assert done.value.code == 0
    assert seen == {"command": "serve", "argv": ["--config", "configs/x.yaml", "--ckpt", "model.ckpt", "--tab", tab,
                                                 "--port", "7000"]}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gradio" / f"{script}.py")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "CONFIG CKPT" in done.stderr


def test_the_page_holds_uploads_and_painted_masks_to_the_pixel_bound():
    import base64

    import gradio as gr

    from ldm.errors import SDError
    from ldm.serve.page import _check_pixels
    from ldm.serve.painter import mask_of

    small = Image.new("RGB", (10, 10))
    _check_pixels([small, None, 3, "text"], 100)
    with pytest.raises(gr.Error, match="above the server's 100"):
        _check_pixels([Image.new("RGB", (11, 10))], 100)

    def data_url(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    strokes = Image.new("RGBA", (20, 10))
    strokes.paste((255, 255, 255, 255), (5, 0, 10, 10))
    mask = np.asarray(mask_of(data_url(strokes), (40, 20), 1000))  # painted at another size: scaled to the picture
    assert mask.shape == (20, 40) and mask[:, 10:20].min() == 255 and mask[:, :10].max() == 0 and mask[:, 20:].max() == 0
    for value, says in (("", "nothing is painted yet"), (data_url(Image.new("RGBA", (20, 10))), "nothing is painted"),
                        ("data:image/png;base64,!!!", "not a PNG"), ("javascript:alert(1)", "not a PNG"),
                        ("data:image/png;base64," + base64.b64encode(b"GIF89a....").decode(), "not a PNG"),
                        (data_url(Image.new("RGBA", (40, 40))), "above the server's max_pixels")):
        with pytest.raises(SDError, match=says):
            mask_of(value, (40, 20), 1000)