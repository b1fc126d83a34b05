"""The `sd serve` page in a real browser: Debian's chromium driven by playwright, with no network.

Skipped with the reason where chromium or playwright is missing (`make install-browser` installs
chromium where root may). `SD_SCREENSHOTS=docs/screenshots python -m pytest tests/test_page.py` also
refreshes the README's screenshots.
"""
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from ldm.pipeline import Pipeline
from ldm.serve.app import Server
from tests.serving import serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (make install-browser installs it)")
# Debian's chromium as root needs --no-sandbox; on a closed network the background services must stay off.
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-quic"]
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def demo():
    return Pipeline.load(device="cpu", quiet=True)


@pytest.fixture(scope="module")
def site(demo):
    with serving(Server(demo), page=True) as (url, port):
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    page = context.new_page()
    page.outside = []  # requests to anything but this server
    page.on("request", lambda r: page.outside.append(r.url) if urlparse(r.url).hostname != "127.0.0.1" else None)
    page.goto(site, wait_until="networkidle")
    page.wait_for_selector("#txt2img-prompt textarea")
    yield page
    context.close()


def result_png(page, tab: str) -> bytes:
    """The bytes the gallery's first image downloads."""
    src = page.get_attribute(f"#{tab}-gallery img", "src")
    return page.request.get(src).body()


def status(page, tab: str) -> str:
    return page.input_value(f"#{tab}-status textarea")


def finished(page, tab: str, before: str = "", timeout: int = 120_000) -> None:
    """Wait for the run's result (live previews come first and fill the gallery too); `before`: the status
    line of the tab's previous run, which must not count."""
    page.wait_for_function("([tab, before]) => { const s = document.querySelector(`#${tab}-status textarea`).value;"
                           " return s !== before && /image\\(s\\)|^stopped/.test(s); }", arg=[tab, before],
                           timeout=timeout)
    page.wait_for_selector(f"#{tab}-gallery img", timeout=30_000)


def load_inpaint_picture(page, photo) -> dict:
    """Upload `photo` to the inpaint tab and wait until the painter shows it; returns the strokes canvas's box."""
    page.get_by_role("tab", name="inpaint").click()
    page.wait_for_selector("#inpaint-image", state="visible", timeout=30_000)
    page.set_input_files("#inpaint-image input[type=file]", str(photo))
    page.wait_for_selector("#inpaint-mask .sd-painter[data-ready='1']", timeout=60_000)
    return page.locator("#inpaint-mask canvas.sd-strokes").bounding_box()


def test_the_page_works_offline_and_makes_the_commands_png(page, demo):
    page.fill("#txt2img-prompt textarea", PROMPT)
    page.fill("#txt2img-seed input", "1")
    page.click("#txt2img-generate")
    finished(page, "txt2img")
    assert status(page, "txt2img") == "1 image(s), seeds 1"
    assert result_png(page, "txt2img") == demo.txt2img(PROMPT, seed=1)[0].png()
    assert page.outside == []


def test_a_brush_stroke_repaints_only_under_it(page, tmp_path):
    from tests.conftest import smooth_photo

    photo = tmp_path / "photo.png"
    Image.fromarray(smooth_photo()).save(photo)  # 260 x 300
    canvas = load_inpaint_picture(page, photo)
    assert page.get_attribute("#inpaint-mask .sd-painter", "data-size") == "260x300"
    x, y = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
    page.mouse.move(x - 50, y)
    page.mouse.down()
    for step in range(1, 11):  # a horizontal stroke through the middle of the picture
        page.mouse.move(x - 50 + 10 * step, y)
    page.mouse.up()
    page.fill("#inpaint-prompt textarea", "a green square on a blue background")
    page.fill("#inpaint-seed input", "3")
    page.click("#inpaint-generate")
    finished(page, "inpaint")
    out = tmp_path / "out.png"
    out.write_bytes(result_png(page, "inpaint"))
    got = np.asarray(Image.open(out).convert("RGB"), np.int16)
    before = smooth_photo().astype(np.int16)
    assert got.shape == before.shape
    far = np.ones(before.shape[:2], bool)
    far[110:190, :] = False  # rows near the stroke (the picture's middle row is 150)
    # away from the stroke only the watermark touches the pixels; under it, they are repainted
    assert np.abs(got - before)[far].mean() < 1.5
    assert np.abs(got - before)[~far].max() > 40


def test_stop_ends_a_long_run(page):
    page.fill("#txt2img-prompt textarea", PROMPT)
    page.fill("#txt2img-steps input[type=number]", "150")
    page.fill("#txt2img-batch input[type=number]", "4")
    assert page.is_disabled("#txt2img-stop")  # nothing runs yet
    page.click("#txt2img-generate")
    page.wait_for_selector("text=/step \\d+ of 150/", timeout=60_000)
    assert page.is_enabled("#txt2img-stop")
    started = time.time()
    page.click("#txt2img-stop")
    page.wait_for_function("document.querySelector('#txt2img-status textarea').value.startsWith('stopped')",
                           timeout=30_000)
    assert time.time() - started < 30  # a 150-step batch of 4 would take minutes; Stop ends it at its step
    assert "cancelled after step" in status(page, "txt2img")
    done, total = map(int, status(page, "txt2img").split("after step ")[1].split(" of "))
    assert done < total == 150
    page.wait_for_selector("#txt2img-gallery img", timeout=30_000)  # the partial pictures, as A1111 shows them
    assert len(result_png(page, "txt2img")) > 1000
    page.wait_for_function("document.querySelector('#txt2img-stop').disabled", timeout=10_000)


def test_a_live_preview_shows_while_it_runs(page):
    page.fill("#txt2img-prompt textarea", PROMPT)
    page.fill("#txt2img-steps input[type=number]", "150")
    page.click("#txt2img-generate")
    page.wait_for_function("document.querySelector('#txt2img-status textarea').value.includes(': preview')",
                           timeout=60_000)
    page.wait_for_selector("#txt2img-gallery img", timeout=10_000)  # the preview, before the result
    said = status(page, "txt2img")
    step = int(said.split("step ")[1].split(" of ")[0])
    assert 1 <= step < 150 and page.input_value("#txt2img-infotext textarea") == ""
    # the cheap previews (A1111's Approx cheap, the default without TAESD) come every step: later ones follow
    page.wait_for_function(f"(/step (\\d+) of/.exec(document.querySelector('#txt2img-status textarea').value) "
                           f"|| [0, 0])[1] > {step}", timeout=60_000)
    page.wait_for_function("document.querySelector('#txt2img-status textarea').value.includes('image(s)')",
                           timeout=120_000)
    assert "Steps: 150" in page.input_value("#txt2img-infotext textarea")


def test_every_tab_renders(page, tmp_path):
    folder = Path(os.environ.get("SD_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    for tab in ("txt2img", "img2img", "inpaint", "depth2img", "upscale", "variations", "png-info"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(300)
        if tab != "variations":  # (the README shows the others)
            page.screenshot(path=str(folder / f"{tab}.png"))
        if tab in ("depth2img", "upscale", "variations"):  # the demo model is text-to-image: these tabs say so
            assert page.get_by_text(f"cannot run {tab}").is_visible()
    assert len(list(folder.glob("*.png"))) >= 6


def test_png_info_reads_a_png_and_sends_it_to_txt2img(page, demo, tmp_path):
    made = demo.txt2img(PROMPT, negative_prompt="blurry", seed=12, steps=7)[0]
    path = tmp_path / "made.png"
    path.write_bytes(made.png())
    page.get_by_role("tab", name="png-info").click()
    page.set_input_files("#png-info-file input[type=file]", str(path))
    page.wait_for_function("document.querySelector('#png-info-text textarea').value.length > 0", timeout=20_000)
    assert page.input_value("#png-info-text textarea") == made.parameters
    page.click("#png-info-send")
    page.wait_for_function(f"document.querySelector('#txt2img-prompt textarea').value === {PROMPT!r}", timeout=20_000)
    assert page.input_value("#txt2img-seed input") == "12"
    assert page.input_value("#txt2img-steps input[type=number]") == "7"
    assert page.input_value("#txt2img-sampler input") == "DDIM"  # A1111's name shown, sd's kept as the value


def test_an_a1111_png_sends_its_sampler_and_schedule(page, tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a lighthouse\nSteps: 9, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 77, "
                                "Size: 512x512, Model hash: 0123456789")
    Image.new("RGB", (64, 64)).save(tmp_path / "a1111.png", pnginfo=info)
    page.get_by_role("tab", name="png-info").click()
    page.set_input_files("#png-info-file input[type=file]", str(tmp_path / "a1111.png"))
    page.wait_for_function("document.querySelector('#png-info-text textarea').value.length > 0", timeout=20_000)
    page.click("#png-info-send")
    page.wait_for_function("document.querySelector('#txt2img-prompt textarea').value === 'a lighthouse'",
                           timeout=20_000)
    assert page.input_value("#txt2img-sampler input") == "DPM++ 2M"
    assert page.input_value("#txt2img-schedule input") == "Karras"
    assert page.input_value("#txt2img-seed input") == "77"


def test_dice_and_reuse_seed_and_the_infotext_under_the_result(page):
    page.fill("#txt2img-prompt textarea", PROMPT)
    page.fill("#txt2img-steps input[type=number]", "2")
    page.click("#txt2img-generate")
    page.wait_for_selector("#txt2img-gallery img", timeout=60_000)
    page.wait_for_function("document.querySelector('#txt2img-infotext textarea').value.includes('Seed: ')",
                           timeout=30_000)
    infotext = page.input_value("#txt2img-infotext textarea")
    seed = infotext.split("Seed: ")[1].split(",")[0]
    assert page.input_value("#txt2img-seed input") == "-1"
    page.click("#txt2img-reuse-seed")
    page.wait_for_function(f"document.querySelector('#txt2img-seed input').value === '{seed}'", timeout=10_000)
    page.click("#txt2img-random-seed")
    page.wait_for_function("document.querySelector('#txt2img-seed input').value === '-1'", timeout=10_000)
    assert page.is_disabled("#txt2img-stop") and page.is_enabled("#txt2img-generate")  # Stop only while running


def test_the_depth_tab_shows_the_depth_map_used(browser, tmp_path):
    from tests.conftest import smooth_photo
    from tests.tinyckpt import build_tiny, save_tiny

    ckpt = save_tiny(build_tiny("tiny-v2-midas.yaml", 4), tmp_path / "depth.ckpt")
    config = Path(__file__).parent / "configs" / "tiny-v2-midas.yaml"
    photo = tmp_path / "photo.png"
    Image.fromarray(smooth_photo()).save(photo)
    pipe = Pipeline.load(ckpt, config, device="cpu", precision="full", quiet=True)
    with serving(Server(pipe), page=True) as (url, port):
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.goto(url, wait_until="networkidle")
        page.get_by_role("tab", name="depth2img").click()
        page.set_input_files("#depth2img-image input[type=file]", str(photo))
        page.wait_for_timeout(1000)
        page.fill("#depth2img-steps input[type=number]", "3")
        page.click("#depth2img-generate")
        page.wait_for_selector("#depth2img-depth img", timeout=60_000)
        assert page.is_visible("#depth2img-gallery img")
        page.close()


def test_the_variations_tab_mixes_two_pictures_as_the_pipeline_does(browser, tmp_path):
    from tests.conftest import smooth_photo
    from tests.tinyckpt import build_tiny, save_tiny

    config = Path(__file__).parent / "configs" / "tiny-unclip-h.yaml"
    ckpt = save_tiny(build_tiny("tiny-unclip-h.yaml", 7), tmp_path / "unclip-h.safetensors")
    rgb = smooth_photo()
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(rgb).save(first)
    Image.fromarray(np.ascontiguousarray(rgb[::-1])).save(second)
    pipe = Pipeline.load(ckpt, config, device="cpu", precision="full", quiet=True)
    expected = pipe.variations([first, second], weights=[0.5, 0.5], steps=3, seed=5, batch_size=1)[0].png()
    with serving(Server(pipe), page=True) as (url, port):
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.goto(url, wait_until="networkidle")
        page.get_by_role("tab", name="variations").click()
        page.set_input_files("#variations-image input[type=file]", str(first))
        page.set_input_files("#variations-image2 input[type=file]", str(second))
        page.wait_for_timeout(1000)
        page.fill("#variations-steps input[type=number]", "3")
        page.fill("#variations-seed input", "5")
        page.click("#variations-generate")
        # the result, not a live preview (cheap previews come every step)
        page.wait_for_function("document.querySelector('#variations-status textarea').value.includes('image(s)')",
                               timeout=60_000)
        page.wait_for_selector("#variations-gallery img", timeout=60_000)
        assert result_png(page, "variations") == expected
        page.close()


def test_the_checkpoint_picker_switches_models(browser, tmp_path, tiny_ckpts, monkeypatch):
    from ldm.loading import detect
    from tests.tinyckpt import build_tiny, save_tiny

    monkeypatch.setattr(detect, "reference_config", lambda kind: tiny_ckpts["eps"]["config"])
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_ckpts["eps"]["safetensors"], models / "first.safetensors")
    save_tiny(build_tiny("tiny-v2-inference.yaml", 12), models / "second.safetensors")
    shutil.copy(models / "second.safetensors", models / "sd_turbo.safetensors")
    server = Server(Pipeline.load(models / "first.safetensors", device="cpu", precision="full", quiet=True),
                    models_dir=models)
    with serving(server, page=True) as (url, port):
        context = browser.new_context(viewport={"width": 1366, "height": 900})
        page = context.new_page()
        page.goto(url, wait_until="networkidle")
        page.click("#checkpoint input")
        page.get_by_role("option", name="second.safetensors").click()
        page.wait_for_function("document.querySelector('#checkpoint-status').innerText.includes('loaded second')",
                               timeout=60_000)
        assert server.current_title() == "second.safetensors"
        # settings left, results right at 1366x900: the gallery's top is beside the prompt, above the fold
        prompt, gallery = page.locator("#txt2img-prompt").bounding_box(), page.locator("#txt2img-gallery").bounding_box()
        assert gallery["x"] > prompt["x"] + prompt["width"] - 1 and gallery["y"] < 900
        # a checkpoint named turbo (SD-Turbo) sets every tab's controls to its defaults: 1 step, scale 1
        steps = "#txt2img-steps input[type=number]"
        assert page.input_value(steps) == "50"
        page.click("#checkpoint input")
        page.get_by_role("option", name="sd_turbo.safetensors").click()
        page.wait_for_function("document.querySelector('#checkpoint-status').innerText.includes('loaded sd_turbo')",
                               timeout=60_000)
        page.wait_for_function(f"document.querySelector('{steps}').value == '1'", timeout=10_000)
        page.get_by_role("tab", name="img2img").click()  # (a tab's controls render when it is shown)
        page.wait_for_function("document.querySelector('#img2img-steps input[type=number]').value == '2'",
                               timeout=10_000)
        context.close()


def test_inpaint_with_nothing_painted_says_so(page, tmp_path):
    from tests.conftest import smooth_photo

    Image.fromarray(smooth_photo()).save(tmp_path / "photo.png")
    load_inpaint_picture(page, tmp_path / "photo.png")
    page.fill("#inpaint-prompt textarea", "a green square")
    page.click("#inpaint-generate")
    page.get_by_text("nothing is painted yet").first.wait_for(timeout=60_000)
    assert not page.locator("#inpaint-gallery img").count()


def test_png_info_shows_a_jpeg_and_reads_its_exif_parameters(page, tmp_path):
    text = "a lighthouse\nSteps: 11, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    Image.new("RGB", (96, 64), (200, 40, 40)).save(tmp_path / "a1111.jpg", "JPEG", exif=exif)
    page.get_by_role("tab", name="png-info").click()
    page.set_input_files("#png-info-file input[type=file]", str(tmp_path / "a1111.jpg"))
    page.wait_for_function("document.querySelector('#png-info-text textarea').value.length > 0", timeout=20_000)
    assert page.input_value("#png-info-text textarea") == text
    page.wait_for_selector("#png-info-picture img", timeout=20_000)  # the picture is shown


def test_send_to_carries_the_result_and_its_prompt_and_the_painter_makes_no_upload_loop(page, tmp_path):
    """A txt2img result sent to inpaint: the picture, prompt and negative prompt arrive, the painter shows the
    picture; painting and generating there, then generating in txt2img, uploads nothing in a loop (gradio's
    ImageEditor re-uploaded its layers on every status message once it had been an input: ~15 a second)."""
    uploads = []
    page.on("request", lambda r: uploads.append(r.url) if "/upload" in r.url else None)
    page.fill("#txt2img-prompt textarea", PROMPT)
    page.fill("#txt2img-negative-prompt textarea", "blurry")
    page.fill("#txt2img-seed input", "4")
    page.fill("#txt2img-steps input[type=number]", "4")
    page.click("#txt2img-generate")
    finished(page, "txt2img")
    page.click("#txt2img-send-inpaint")
    page.wait_for_selector("#inpaint-mask .sd-painter[data-ready='1']", timeout=60_000)
    # the picture and the texts come in one update, but the browser may paint them a moment apart
    page.wait_for_function(f"document.querySelector('#inpaint-prompt textarea').value === '{PROMPT}'", timeout=10_000)
    assert page.input_value("#inpaint-negative-prompt textarea") == "blurry"
    assert page.get_attribute("#inpaint-mask .sd-painter", "data-size") == "256x256"
    canvas = page.locator("#inpaint-mask canvas.sd-strokes").bounding_box()
    page.mouse.move(canvas["x"] + 20, canvas["y"] + 20)
    page.mouse.down()
    page.mouse.move(canvas["x"] + 60, canvas["y"] + 40)
    page.mouse.up()
    page.fill("#inpaint-steps input[type=number]", "4")
    page.click("#inpaint-generate")
    finished(page, "inpaint")
    assert status(page, "inpaint").startswith("1 image(s)")
    seed = page.input_value("#inpaint-infotext textarea").split("Seed: ")[1].split(",")[0]
    page.click("#inpaint-send-txt2img")  # its parameters, as from PNG info: the seed it ran with
    page.wait_for_function(f"document.querySelector('#txt2img-seed input').value === '{seed}'", timeout=10_000)
    page.wait_for_function("document.querySelector('#txt2img-negative-prompt textarea').value === 'blurry'",
                           timeout=10_000)
    assert seed != "4"
    before = len(uploads)
    page.fill("#txt2img-seed input", "-1")
    page.fill("#txt2img-steps input[type=number]", "40")
    previous = status(page, "txt2img")
    page.click("#txt2img-generate")
    finished(page, "txt2img", previous)
    page.wait_for_timeout(2000)
    assert len(uploads) - before == 0, uploads[before:]
    page.click("#txt2img-send-img2img")  # and to img2img: the picture arrives in its input
    page.wait_for_selector("#img2img-image img", timeout=30_000)
    page.wait_for_function(f"document.querySelector('#img2img-prompt textarea').value === '{PROMPT}'", timeout=10_000)


def test_a_hires_png_sends_its_hires_fix_to_txt2img(page, tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a castle\nSteps: 12, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, "
                                "Denoising strength: 0.55, Hires upscale: 1.5, Hires steps: 9, "
                                "Hires upscaler: Latent (bicubic)")
    Image.new("RGB", (64, 64)).save(tmp_path / "hires.png", pnginfo=info)
    page.get_by_role("tab", name="png-info").click()
    page.set_input_files("#png-info-file input[type=file]", str(tmp_path / "hires.png"))
    page.wait_for_function("document.querySelector('#png-info-text textarea').value.length > 0", timeout=20_000)
    page.click("#png-info-send")
    page.wait_for_function("document.querySelector('#txt2img-prompt textarea').value === 'a castle'", timeout=20_000)
    page.get_by_text("Hires. fix", exact=True).first.click()  # open the panel: gradio draws it when opened
    page.wait_for_selector("#txt2img-hires input[type=checkbox]", timeout=20_000)
    assert page.is_checked("#txt2img-hires input[type=checkbox]")
    assert page.input_value("#txt2img-hr-scale input[type=number]") == "1.5"
    assert page.input_value("#txt2img-hr-steps input[type=number]") == "9"
    assert page.input_value("#txt2img-hr-strength input[type=number]") == "0.55"
    assert page.input_value("#txt2img-hr-upscaler input") == "Latent (bicubic)"


def test_the_controlnet_panel_steers_txt2img_and_the_hires_fix_enlarges(browser, tmp_path):
    """A ControlNet of the demo model's UNet (random weights) from the panel: the result records its unit;
    the hires fix ticked gives the second pass's size."""
    from safetensors.torch import save_file

    from ldm.control.apply import controlnet_config
    from ldm.modules.diffusionmodules.controlnet import ControlNet
    from ldm.loading.families import DEMO_CONFIG
    from ldm.util import load_config
    from omegaconf import OmegaConf
    from tests.tinyckpt import randomize_

    params = OmegaConf.to_container(load_config(DEMO_CONFIG).model.params.unet_config.params, resolve=True)
    net = randomize_(ControlNet(**controlnet_config(params, 3, 4)["params"]), 0)
    folder = tmp_path / "controlnet"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "control_demo_canny.safetensors"))
    edges = np.zeros((256, 256, 3), np.uint8)
    edges[64:192, 64:192] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png")
    pipe = Pipeline.load(device="cpu", quiet=True)
    with serving(Server(pipe, controlnet_dir=folder), page=True) as (url, port):
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        page.goto(url, wait_until="networkidle")
        page.fill("#txt2img-prompt textarea", PROMPT)
        page.fill("#txt2img-steps input[type=number]", "3")
        page.get_by_text("ControlNet", exact=True).first.click()  # open the panel
        page.check("#txt2img-cn-enabled input[type=checkbox]")
        page.set_input_files("#txt2img-cn-image input[type=file]", str(tmp_path / "edges.png"))
        page.wait_for_timeout(1000)
        page.get_by_text("Hires. fix", exact=True).first.click()
        page.check("#txt2img-hires input[type=checkbox]")
        page.fill("#txt2img-hr-scale input[type=number]", "1.5")
        page.press("#txt2img-hr-scale input[type=number]", "Enter")
        page.click("#txt2img-generate")
        finished(page, "txt2img")
        infotext = page.input_value("#txt2img-infotext textarea")
        assert 'ControlNet 0: "Module: none, Model: control_demo_canny' in infotext
        assert "Hires upscale: 1.5" in infotext
        src = page.get_attribute("#txt2img-gallery img", "src")
        import io

        assert Image.open(io.BytesIO(page.request.get(src).body())).size == (384, 384)
        page.close()
