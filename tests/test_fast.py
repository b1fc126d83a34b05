"""A picture in seconds on a CPU (issue 32): few-step schedules (trailing, SGM Uniform, turbo) pinned and equal to
diffusers' Euler, SD-Turbo's defaults by file name, guidance off at scale 1, TAESD equal to diffusers'
AutoencoderTiny and read strictly, cheap previews, token merging equal to tomesd as A1111 calls it."""
import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.cli import main
from ldm.errors import SDError
from ldm.models.diffusion import samplers
from ldm.models.diffusion.denoiser import DiscreteDenoiser
from ldm.models.diffusion.schedules import (make_schedule, schedule_at_strength, sigma_to_t,
                                            sigmas_from_alphas_cumprod)
from ldm.models.taesd import load_taesd
from ldm.pipeline import Pipeline
from tests.tinyckpt import randomize_

T = 1000


def sd_sigmas() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    return sigmas_from_alphas_cumprod(torch.cumprod(1 - betas, 0).float())


def timesteps(sigmas: torch.Tensor, model_sigmas: torch.Tensor) -> list[float]:
    return [round(float(t), 4) for t in sigma_to_t(sigmas[:-1], model_sigmas)]


# -- 1. the schedules, pinned against diffusers', A1111's and ComfyUI's numbers ------------------------------
@pytest.mark.parametrize("steps, expected", [(1, [999]), (2, [999, 499]), (3, [999, 666, 332]),
                                             (4, [999, 749, 499, 249])])
def test_trailing_timesteps_are_diffusers(steps, expected):
    model_sigmas = sd_sigmas()
    sigmas = make_schedule("trailing", model_sigmas, steps)
    assert timesteps(sigmas, model_sigmas) == expected and float(sigmas[-1]) == 0.0


def test_trailing_sigmas_are_sd_turbos():
    sigmas = make_schedule("trailing", sd_sigmas(), 4)
    np.testing.assert_allclose(sigmas[:-1].numpy(), [14.6146, 4.0817, 1.6129, 0.6932], atol=1e-4)


def test_sgm_uniform_and_turbo_timesteps():
    model_sigmas = sd_sigmas()
    assert timesteps(make_schedule("sgm_uniform", model_sigmas, 2), model_sigmas) == [999.0, 499.5]
    assert timesteps(make_schedule("turbo", model_sigmas, 2), model_sigmas) == [999, 899]
    assert timesteps(make_schedule("turbo", model_sigmas, 4), model_sigmas) == [999, 899, 799, 699]
    # ComfyUI's denoise: start = 10 - int(10 * denoise), still `steps` steps
    assert timesteps(schedule_at_strength("turbo", model_sigmas, 2, 0.5), model_sigmas) == [499, 399]
    with pytest.raises(SDError, match="takes 1 to 10 steps"):
        make_schedule("turbo", model_sigmas, 11)
    with pytest.raises(SDError, match="takes 1 to 3 steps at strength 0.3"):
        schedule_at_strength("turbo", model_sigmas, 4, 0.3)


def test_img2img_at_strength_keeps_the_last_steps_as_diffusers_and_never_none():
    model_sigmas = sd_sigmas()
    # SD-Turbo's img2img: 2 trailing steps at strength 0.5 take the step at t = 499
    assert timesteps(schedule_at_strength("trailing", model_sigmas, 2, 0.5), model_sigmas) == [499]
    with pytest.raises(SDError, match=r"strength 0.3 of 1 step\(s\) runs no step.*at least 4 steps"):
        schedule_at_strength("trailing", model_sigmas, 1, 0.3)
    assert len(schedule_at_strength("trailing", model_sigmas, 4, 0.0)) == 1  # strength 0: the input itself


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_euler_trailing_equals_diffusers_on_the_same_unet(steps, tiny_ckpts):
    from diffusers import EulerDiscreteScheduler

    model = tiny_ckpts["eps"]["model"]
    g = torch.Generator().manual_seed(7)
    noise = torch.randn((2, 4, 8, 8), generator=g)
    cond = {"c_crossattn": torch.randn((2, 77, 32), generator=g), "c_concat": None, "c_adm": None}
    with torch.no_grad():
        ours = samplers.run(DiscreteDenoiser(model), noise, cond, "euler", steps=steps, schedule="trailing")
        scheduler = EulerDiscreteScheduler(num_train_timesteps=T, trained_betas=model.betas.numpy(),
                                           prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1)
        scheduler.set_timesteps(steps)
        latents = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = model.apply_model(scheduler.scale_model_input(latents, t), t.expand(2).float(), cond)
            latents = scheduler.step(eps, t, latents).prev_sample
    torch.testing.assert_close(ours.float(), latents, rtol=1e-4, atol=1e-4)


# -- 2. SD-Turbo's defaults by file name, guidance off at scale 1 -------------------------------------------
@pytest.fixture(scope="module")
def turbo_ckpt(tiny_ckpts, tmp_path_factory):
    path = tmp_path_factory.mktemp("turbo") / "sd_turbo.safetensors"
    shutil.copy(tiny_ckpts["eps"]["safetensors"], path)
    return path


@pytest.fixture(scope="module")
def turbo_pipe(turbo_ckpt, tiny_ckpts):
    return Pipeline.load(turbo_ckpt, tiny_ckpts["eps"]["config"], device="cpu", precision="full", quiet=True)


def test_a_checkpoint_named_turbo_gets_turbo_defaults(turbo_pipe, tiny_ckpts):
    assert turbo_pipe.preset == "turbo"
    d = turbo_pipe.defaults("txt2img")
    assert (d["steps"], d["scale"], d["sampler"], d["schedule"]) == (1, 1.0, "euler_a", "trailing")
    image, = turbo_pipe.txt2img("a red cube", width=256, height=256, seed=3)
    fields = json.dumps(image.parameters)
    assert "Steps: 1, Sampler: Euler a, Schedule type: Trailing, CFG scale: 1.0" in image.parameters, fields
    # what the caller sets wins; --preset sd gives SD 2's defaults to the same file
    image, = turbo_pipe.txt2img("a red cube", width=256, height=256, seed=3, steps=2, sampler="euler")
    assert "Steps: 2, Sampler: Euler, Schedule type: Trailing" in image.parameters
    image, = turbo_pipe.txt2img("a red cube", width=256, height=256, seed=3, preset="sd", steps=2)
    assert "Steps: 2, Sampler: DDIM, CFG scale: 9.0" in image.parameters
    plain = Pipeline.load(tiny_ckpts["eps"]["safetensors"], tiny_ckpts["eps"]["config"], device="cpu",
                          precision="full", quiet=True)
    assert plain.preset == "sd" and plain.defaults("txt2img")["sampler"] == "ddim"
    image, = plain.txt2img("a red cube", width=256, height=256, seed=3, preset="turbo")
    assert "Steps: 1, Sampler: Euler a, Schedule type: Trailing, CFG scale: 1.0" in image.parameters


def test_the_command_says_which_defaults_it_took(turbo_ckpt, tiny_ckpts, tmp_path, capsys):
    args = ["txt2img", "--prompt", "a cube", "--ckpt", str(turbo_ckpt), "--config", tiny_ckpts["eps"]["config"],
            "--H", "256", "--W", "256", "--n_samples", "1", "--n_iter", "1", "--precision", "full",
            "--outdir", str(tmp_path / "o")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "sd_turbo.safetensors: its name says turbo" in err and "(1 step(s), scale 1, euler_a, trailing" in err
    assert main(args + ["--preset", "sd", "--steps", "1"]) == 0
    assert "its name says turbo" not in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_scale_one_is_one_unet_pass_per_step_in_every_mode(mode, turbo_pipe, monkeypatch):
    calls = []
    real = turbo_pipe.model.apply_model
    monkeypatch.setattr(turbo_pipe.model, "apply_model",
                        lambda x, t, cond: calls.append(x.shape[0]) or real(x, t, cond))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 192))
    run = {"txt2img": lambda: turbo_pipe.txt2img("a cube", width=256, height=256, steps=4, batch_size=2),
           "img2img": lambda: turbo_pipe.img2img(picture, "a cube", steps=4, strength=1.0, batch_size=2),
           "inpaint": lambda: turbo_pipe.inpaint(picture, mask, "a cube", steps=4, batch_size=2)}[mode]
    run()
    assert calls == [2, 2, 2, 2]  # one pass a step, the batch not doubled for an unconditional branch


# -- 3. TAESD -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_tiny():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae = AutoencoderTiny().eval()
    randomize_(vae, 5)
    return vae


@pytest.fixture(scope="module")
def taesd_files(diffusers_tiny, tmp_path_factory):
    """The three forms of the same weights: a diffusers folder, madebyollin's .pth pair, the .safetensors pair."""
    root = tmp_path_factory.mktemp("taesd")
    diffusers_tiny.save_pretrained(root / "folder")
    ours = load_taesd(root / "folder")
    torch.save(ours.decoder.state_dict(), root / "taesd_decoder.pth")
    torch.save(ours.encoder.state_dict(), root / "taesd_encoder.pth")
    (root / "st").mkdir()
    save_file({k: v.contiguous() for k, v in ours.decoder.state_dict().items()}, root / "st" / "taesd_decoder.safetensors")
    save_file({k: v.contiguous() for k, v in ours.encoder.state_dict().items()}, root / "st" / "taesd_encoder.safetensors")
    (root / "alone").mkdir()
    shutil.copy(root / "taesd_decoder.pth", root / "alone" / "taesd_decoder.pth")
    return root


@pytest.mark.parametrize("form", ["folder", "taesd_decoder.pth", "st/taesd_decoder.safetensors"])
def test_taesd_equals_diffusers_autoencoder_tiny(form, taesd_files, diffusers_tiny):
    taesd = load_taesd(taesd_files / form)
    g = torch.Generator().manual_seed(1)
    z = torch.randn((2, 4, 16, 16), generator=g)
    x = torch.rand((2, 3, 128, 128), generator=g) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(taesd.decode(z), diffusers_tiny.decode(z).sample.clamp(-1, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(taesd.encode(x), diffusers_tiny.encode(x).latents, rtol=1e-5, atol=1e-5)


def test_taesd_files_are_read_strictly(taesd_files, tiny_ckpts, tmp_path):
    alone = load_taesd(taesd_files / "alone" / "taesd_decoder.pth")
    assert alone.encoder is None
    with pytest.raises(SDError, match="TAESD's encoder was not loaded: put taesd_encoder.pth"):
        alone.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(SDError, match="is not a TAESD file for SD 1/2 latents: keys .* missing"):
        load_taesd(tiny_ckpts["eps"]["safetensors"])
    broken = tmp_path / "taesd_decoder.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SDError, match="not a valid safetensors file"):
        load_taesd(broken)
    bad = {k: v.clone() for k, v in alone.decoder.state_dict().items()}
    bad["1.weight"][0, 0, 0, 0] = float("nan")
    save_file(bad, tmp_path / "nan_decoder.safetensors")
    with pytest.raises(SDError, match="holds NaN"):
        load_taesd(tmp_path / "nan_decoder.safetensors")
    with pytest.raises(SDError, match="TAESD file not found"):
        load_taesd(tmp_path / "nope.pth")


def test_decode_and_encode_with_taesd_are_recorded_and_reproduced(turbo_ckpt, tiny_ckpts, taesd_files, tmp_path, capsys):
    out = tmp_path / "o"
    common = ["--ckpt", str(turbo_ckpt), "--config", tiny_ckpts["eps"]["config"], "--precision", "full",
              "--n_samples", "1", "--n_iter", "1", "--taesd", str(taesd_files / "taesd_decoder.pth")]
    assert main(["txt2img", "--prompt", "a cube", "--H", "256", "--W", "256", "--decode", "taesd", "--seed", "5",
                 "--outdir", str(out), *common]) == 0
    first = next((out / "samples").glob("*.png"))
    text = Image.open(first).info["parameters"]
    assert "VAE Decoder: TAESD" in text and "VAE Encoder" not in text
    assert main(["txt2img", "--from-image", str(first), "--outdir", str(tmp_path / "again"), *common]) == 0
    again = next((tmp_path / "again" / "samples").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert main(["img2img", "--prompt", "a cube", "--init-img", str(first), "--strength", "0.5", "--steps", "2",
                 "--encode", "taesd", "--outdir", str(tmp_path / "i2i"), *common]) == 0
    text = Image.open(next((tmp_path / "i2i" / "samples").glob("*.png"))).info["parameters"]
    assert "VAE Encoder: TAESD" in text and "VAE Decoder" not in text
    capsys.readouterr()
    assert main(["txt2img", "--prompt", "a cube", "--decode", "taesd", "--outdir", str(tmp_path / "x"),
                 *common[:-2]]) == 1
    assert "--decode taesd needs TAESD's files: --taesd PATH" in capsys.readouterr().err


def test_the_demo_model_refuses_taesd(taesd_files):
    pipe = Pipeline.load(device="cpu", precision="full", quiet=True, taesd=taesd_files / "folder")
    with pytest.raises(SDError, match="TAESD decodes SD 1/2 latents, and this model's are its own"):
        pipe.txt2img("a red cube", steps=2, decode="taesd")


# -- 4. previews that cost nothing ----------------------------------------------------------------------------
def test_cheap_previews_are_a1111s_linear_map(turbo_pipe):
    from ldm.models.preview import CHEAP_COEFFICIENTS

    z = torch.zeros((1, 4, 8, 8))
    z[0, 3] = 1.0  # the fourth latent channel alone: (-0.184, -0.271, -0.473) in [-1, 1]
    picture, = turbo_pipe.preview(z, "cheap")
    assert picture.size == (64, 64)
    expected = np.floor(255 * (CHEAP_COEFFICIENTS[3].numpy() + 1) / 2)
    assert np.abs(np.asarray(picture)[32, 32].astype(float) - expected).max() <= 1
    # without TAESD loaded a TAESD preview falls back to the cheap one
    assert np.array_equal(np.asarray(turbo_pipe.preview(z, "taesd")[0]), np.asarray(picture))
    with pytest.raises(SDError, match="unknown preview method"):
        turbo_pipe.preview(z, "fancy")


# -- 5. token merging ----------------------------------------------------------------------------------------
def test_token_merging_equals_tomesd_as_a1111_calls_it(tiny_ckpts):
    tomesd = pytest.importorskip("tomesd")
    from ldm.modules.tome import token_merging

    ours = tiny_ckpts["eps"]["model"]
    theirs = copy.deepcopy(ours)
    tomesd.apply_patch(theirs, ratio=0.5, max_downsample=1, sx=2, sy=2, use_rand=False, merge_attn=True,
                       merge_crossattn=False, merge_mlp=False)
    g = torch.Generator().manual_seed(2)
    x = torch.randn((2, 4, 16, 12), generator=g)
    t = torch.tensor([999.0, 500.0])
    cond = {"c_crossattn": torch.randn((2, 77, 32), generator=g), "c_concat": None, "c_adm": None}
    with torch.no_grad():
        plain = ours.apply_model(x, t, cond)
        with token_merging(ours.model.diffusion_model, 0.5):
            merged = ours.apply_model(x, t, cond)
        reference = theirs.apply_model(x, t, cond)
    torch.testing.assert_close(merged, reference, rtol=1e-5, atol=1e-5)
    assert (merged - plain).abs().max() > 1e-3  # it did merge
    with torch.no_grad():  # and it is undone after the block
        torch.testing.assert_close(ours.apply_model(x, t, cond), plain, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_token_merging_is_recorded_and_reproduced(mode, tiny_ckpts, tmp_path):
    common = ["--ckpt", str(tiny_ckpts["eps"]["safetensors"]), "--config", tiny_ckpts["eps"]["config"],
              "--precision", "full", "--n_samples", "1", "--n_iter", "1", "--steps", "2", "--tome", "0.5"]
    picture = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(picture)
    own = ["--H", "256", "--W", "256"] if mode == "txt2img" else ["--init-img", str(picture), "--strength", "0.6"]
    assert main([mode, "--prompt", "a cube", *own, "--outdir", str(tmp_path / "o"), *common]) == 0
    first = next((tmp_path / "o" / "samples").glob("*.png"))
    assert "Token merging ratio: 0.5" in Image.open(first).info["parameters"]
    again_args = [mode, "--from-image", str(first), "--outdir", str(tmp_path / "again"), *common[:-2]]
    if mode == "img2img":
        again_args += ["--init-img", str(picture)]
    assert main(again_args) == 0
    again = next((tmp_path / "again" / "samples").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_token_merging_ratio_is_bounded(tiny_ckpts, tmp_path, capsys):
    assert main(["txt2img", "--prompt", "a", "--ckpt", str(tiny_ckpts["eps"]["safetensors"]), "--config",
                 tiny_ckpts["eps"]["config"], "--tome", "0.95", "--outdir", str(tmp_path)]) == 1
    assert "--tome must be from 0 to 0.9 (got 0.95)" in capsys.readouterr().err


# -- 6. every backend: turbo + TAESD on OpenVINO (FastSD's fastest combination) -------------------------------
def test_turbo_with_taesd_runs_on_openvino_and_token_merging_says_it_cannot(turbo_ckpt, tiny_ckpts, taesd_files,
                                                                             tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = tiny_ckpts["eps"]["config"]
    settings = dict(width=256, height=256, seed=9, decode="taesd")
    torch_pipe = Pipeline.load(turbo_ckpt, config, device="cpu", precision="full", quiet=True,
                               taesd=taesd_files / "taesd_decoder.pth")
    ov_pipe = Pipeline.load(turbo_ckpt, config, device="cpu", precision="full", quiet=True, backend="openvino",
                            taesd=taesd_files / "taesd_decoder.pth")
    assert type(ov_pipe.taesd.decoder).__name__ == "OpenVINOPart"
    expected = np.asarray(torch_pipe.txt2img("a red cube", **settings)[0].image, dtype=np.float64)
    made = ov_pipe.txt2img("a red cube", **settings)[0]
    error = np.mean((np.asarray(made.image, dtype=np.float64) - expected) ** 2)
    assert 10 * np.log10(255.0 ** 2 / max(error, 1e-12)) > 40
    assert "Steps: 1, Sampler: Euler a, Schedule type: Trailing" in made.parameters
    assert "VAE Decoder: TAESD" in made.parameters and "Backend: openvino f32" in made.parameters
    assert list((tmp_path / "cache" / "sd" / "openvino").glob("taesd-decoder-*.xml"))  # converted once, cached
    with pytest.raises(SDError, match=r"token merging \(tome\) changes the UNet's attention, which --backend "
                                      "openvino has baked in: use --backend torch"):
        ov_pipe.txt2img("a red cube", width=256, height=256, tome=0.5)


# -- 7. the A1111 API: turbo defaults, the VAE methods, previews and token merging as options -----------------
@pytest.fixture(scope="module")
def turbo_server(turbo_ckpt, tiny_ckpts, taesd_files):
    from ldm.limits import Limits
    from ldm.serve.app import Server
    from tests.serving import serving

    pipe = Pipeline.load(turbo_ckpt, tiny_ckpts["eps"]["config"], device="cpu", precision="full", quiet=True,
                         taesd=taesd_files / "taesd_decoder.pth")
    server = Server(pipe, limits=Limits(max_side=512, max_steps=20, max_batch=2, max_images=4))
    with serving(server) as (url, port):
        yield server, url


def infotext(reply) -> str:
    assert reply.status_code == 200, reply.text
    return json.loads(reply.json()["info"])["infotexts"][0]


def test_the_api_gives_a_turbo_checkpoint_its_defaults_and_takes_a1111s_fast_options(turbo_server):
    import requests

    server, url = turbo_server
    body = {"prompt": "a red cube", "width": 256, "height": 256, "seed": 2}
    text = infotext(requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60))
    assert "Steps: 1, Sampler: Euler a, Schedule type: Trailing, CFG scale: 1.0" in text
    assert "VAE Decoder" not in text and "Token merging" not in text
    options = requests.get(f"{url}/sdapi/v1/options", timeout=10).json()
    assert options["show_progress_type"] == "TAESD" and options["sd_vae_decode_method"] == "Full"
    override = {**body, "override_settings": {"sd_vae_decode_method": "TAESD", "token_merging_ratio": 0.5}}
    text = infotext(requests.post(f"{url}/sdapi/v1/txt2img", json=override, timeout=60))
    assert "VAE Decoder: TAESD" in text and "Token merging ratio: 0.5" in text
    # POST /options keeps them for the requests after it; GET /options reads them back
    assert requests.post(f"{url}/sdapi/v1/options", json={"sd_vae_decode_method": "TAESD",
                                                           "show_progress_type": "Approx cheap"}, timeout=30).ok
    assert requests.get(f"{url}/sdapi/v1/options", timeout=10).json()["sd_vae_decode_method"] == "TAESD"
    assert server.worker.preview_method == "cheap"
    assert "VAE Decoder: TAESD" in infotext(requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60))
    for bad, says in (({"token_merging_ratio": 2}, "token_merging_ratio must be a number from 0 to 0.9"),
                      ({"sd_vae_decode_method": "Approx"}, "sd_vae_decode_method must be one of 'Full', 'TAESD'"),
                      ({"show_progress_type": "Fancy"}, "show_progress_type must be one of")):
        reply = requests.post(f"{url}/sdapi/v1/options", json=bad, timeout=10)
        assert reply.status_code == 422 and says in reply.json()["detail"], reply.text
    reply = requests.post(f"{url}/sdapi/v1/options", data='{"token_merging_ratio": NaN}',
                          headers={"Content-Type": "application/json"}, timeout=10)
    assert reply.status_code == 422
    requests.post(f"{url}/sdapi/v1/options", json={"sd_vae_decode_method": "Full"}, timeout=30)


def test_the_api_without_taesd_says_what_is_missing(tiny_ckpts):
    import requests

    from ldm.serve.app import Server
    from tests.serving import serving

    pipe = Pipeline.load(tiny_ckpts["eps"]["safetensors"], tiny_ckpts["eps"]["config"], device="cpu",
                         precision="full", quiet=True)
    with serving(Server(pipe)) as (url, port):
        reply = requests.post(f"{url}/sdapi/v1/txt2img", json={
            "prompt": "a", "steps": 1, "width": 256, "height": 256,
            "override_settings": {"sd_vae_decode_method": "TAESD"}}, timeout=60)
        assert reply.status_code == 422
        assert reply.json()["detail"].startswith("override_settings.sd_vae_decode_method TAESD needs TAESD's files: "
                                                 "start sd serve with --taesd PATH")
        assert requests.get(f"{url}/sdapi/v1/options", timeout=10).json()["show_progress_type"] == "Approx cheap"
