"""ControlNet (ldm.control, ldm.modules.diffusionmodules.controlnet) and the hires fix (ldm.hires).

- keys and shapes of the full-size ControlNet against the reference's key list (cldm_v21: 340 keys, 364 M);
- the tiny ControlNet and the UNet taking its residuals against diffusers' ControlNetModel and
  UNet2DConditionModel loaded through diffusers' own converters (an independent implementation), and a whole
  DDIM run with guidance against diffusers' DDIMScheduler driving those twins, from the same noise;
- control modes, start/end, resize modes, preprocessors on pictures with known answers, strict loading of
  the file forms, the CLI and the A1111 API (the extension's units and routes, client replays), the hires
  fix's size rules and its second pass.
"""
from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from ldm.control.apply import (Controller, controlled, controlnet_config, fit_hint, hint_tensor, load_controlnet,
                               residual_scales)
from ldm.control.units import ControlUnit, parse_mode, parse_resize
from ldm.errors import SDError
from ldm.modules.diffusionmodules.controlnet import ControlNet
from tests.tinyckpt import manifest, randomize_

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny-v2-inference.yaml"
CPU = dict(device="cpu", precision="full")


def unet_params(config=TINY) -> dict:
    return OmegaConf.to_container(OmegaConf.load(config).model.params.unet_config.params, resolve=True)


def tiny_controlnet(seed: int = 7, config=TINY) -> ControlNet:
    built = controlnet_config(unet_params(config), 3, 4)
    net = ControlNet(**built["params"])
    return randomize_(net, seed).eval()  # the zero convolutions get values too: every path counts


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


def edge_picture(size=(64, 64)) -> np.ndarray:
    """A white square on black: its canny edges are the square's outline."""
    image = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(image).rectangle([16, 16, 47, 47], fill=(255, 255, 255))
    return np.asarray(image)


# -- the network -------------------------------------------------------------------------------------------

def test_full_size_controlnet_has_exactly_the_reference_keys():
    from ldm.loading.checkpoint import build_on_meta

    params = unet_params(ROOT / "configs" / "stable-diffusion" / "v2-inference-v.yaml")
    net = build_on_meta(OmegaConf.create(controlnet_config(params, 3, 4)))
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    ref = manifest("controlnet-v21")
    assert ours == ref
    assert len(ref) == 340 and sum(int(np.prod(s)) for s in ref.values()) == 364_228_240


def diffusers_twins(net: ControlNet, unet):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_controlnet_checkpoint, convert_ldm_unet_checkpoint,
                                                      create_unet_diffusers_config_from_ldm)

    original = OmegaConf.to_container(OmegaConf.load(TINY), resolve=True)
    unet_ckpt = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original, unet_ckpt)
    twin_unet = UNet2DConditionModel(**config)
    twin_unet.load_state_dict(convert_ldm_unet_checkpoint(unet_ckpt, config), strict=True)
    # (diffusers' create_controlnet_diffusers_config_from_ldm calls its UNet helper without the checkpoint in
    # this version; its mapping is the UNet config's keys plus the hint channels)
    keys = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
            "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block")
    cn_config = {"conditioning_channels": 3, **{key: config[key] for key in keys if key in config}}
    twin = ControlNetModel(**cn_config)
    twin.load_state_dict(convert_controlnet_checkpoint(dict(net.state_dict()), cn_config), strict=True)
    return twin.eval(), twin_unet.eval()


@pytest.fixture(scope="module")
def tiny_pair():
    from tests.tinyckpt import build_tiny

    model = build_tiny("tiny-v2-inference.yaml", seed=1)
    net = tiny_controlnet()
    return model, net, *diffusers_twins(net, model.model.diffusion_model)


def test_controlnet_and_controlled_unet_match_diffusers(tiny_pair):
    model, net, twin, twin_unet = tiny_pair
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 12, generator=g)
    hint = torch.rand(2, 3, 64, 96, generator=g)
    t = torch.tensor([17.0, 903.25])
    context = torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        ours = net(x, hint, t, context)
        down, mid = twin(x, t, encoder_hidden_states=context, controlnet_cond=hint, conditioning_scale=0.7,
                         return_dict=False)
        assert len(ours) == len(down) + 1 == len(unet.input_blocks) + 1 == 5
        for a, b in zip(ours[:-1], down):
            assert rel_err(0.7 * a, b) < 1e-4
        assert rel_err(0.7 * ours[-1], mid) < 1e-4
        steered = unet(x, t, context, control=[0.7 * r for r in ours])
        theirs = twin_unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid).sample
        assert rel_err(steered, theirs) < 1e-4
        assert rel_err(steered, unet(x, t, context)) > 1e-2  # the residuals really steer


def test_ddim_with_controlnet_and_guidance_matches_diffusers_from_the_same_noise(tiny_pair):
    """sd's walk (DiscreteDenoiser -> CFGDenoiser -> DDIM, the Controller inside apply_model) against
    diffusers' DDIMScheduler stepping its UNet and ControlNet twins: the reference's DDIM with ControlLDM."""
    from diffusers import DDIMScheduler

    from ldm.request import SamplingSettings
    from ldm.sampling import sample_latents, start_noise

    model, net, twin, twin_unet = tiny_pair
    steps, scale, weight = 5, 4.0, 0.8  # 1000 / 5: the reference's DDIM and diffusers' "leading" spacing agree
    noise, generators = start_noise([5, 6], (4, 8, 8))
    c = model.get_learned_conditioning(["a red cube", "a blue ball"])
    uc = model.get_learned_conditioning(["", ""])
    hint = hint_tensor(edge_picture())
    unit = ControlUnit(model="x", image=edge_picture(), weight=weight)
    with torch.no_grad(), controlled(model, Controller([(net, unit, hint)], steps, 2, True)) as _:
        ours = sample_latents(model, noise.clone(), generators, c, uc, SamplingSettings(steps, "ddim", None, 0.0, scale))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    sched.set_timesteps(steps)
    x = noise.clone()
    context = torch.cat([uc, c])
    with torch.no_grad():
        for t in sched.timesteps:
            both = torch.cat([x, x])
            down, mid = twin(both, t, encoder_hidden_states=context, controlnet_cond=hint.expand(4, -1, -1, -1),
                             conditioning_scale=weight, return_dict=False)
            eps = twin_unet(both, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + scale * (e_c - e_u), t, x).prev_sample
    assert rel_err(ours, x) < 2e-3
    with torch.no_grad():
        plain = sample_latents(model, noise.clone(), generators, c, uc, SamplingSettings(steps, "ddim", None, 0.0, scale))
    assert rel_err(plain, x) > 2e-2  # without the ControlNet it is another picture


# -- modes, start/end ------------------------------------------------------------------------------------

class FakeNet(torch.nn.Module):
    """Residuals of ones, recording each call's batch."""
    in_channels = 4

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, hint, t, context):
        self.calls.append(x.shape[0])
        return [torch.ones_like(x) for _ in range(13)]


def test_control_modes_weight_the_residuals_as_the_extension():
    unit = ControlUnit(model="x", weight=0.5)
    assert residual_scales(unit, 13) == [0.5] * 13
    soft = residual_scales(ControlUnit(model="x", weight=0.5, mode="prompt"), 13)
    assert soft[-1] == 0.5 and soft[0] == pytest.approx(0.5 * 0.825 ** 12) and soft[6] == pytest.approx(0.5 * 0.825 ** 6)
    net = FakeNet()
    x, cond = torch.zeros(4, 4, 2, 2), {"c_crossattn": torch.zeros(4, 3, 8)}
    for mode, uncond_value in (("balanced", 1.0), ("prompt", 1.0), ("control", 0.0)):
        controller = Controller([(net, ControlUnit(model="x", mode=mode), torch.zeros(1, 3, 16, 16))], 10, 2, True)
        out = controller(x, torch.zeros(4), cond)["c_control"]
        # rows [uncond; cond]: "control" leaves the unconditional half without control
        assert float(out[-1][:2].max()) == uncond_value and float(out[-1][2:].min()) == 1.0
    controller = Controller([(net, ControlUnit(model="x", mode="control"), torch.zeros(1, 3, 16, 16))], 10, 2, False)
    assert float(controller(x[:2], torch.zeros(2), cond)["c_control"][-1].min()) == 1.0  # no guidance: all rows


def test_several_units_add_their_weighted_residuals():
    net = FakeNet()
    hint = torch.zeros(1, 3, 16, 16)
    units = [(net, ControlUnit(model="x", weight=0.5), hint), (net, ControlUnit(model="x", weight=0.25, mode="prompt"), hint),
             (net, ControlUnit(model="x", weight=2.0, start=0.5), hint)]  # the third not yet active at step 0
    out = Controller(units, 10, 1, False)(torch.zeros(1, 4, 2, 2), torch.zeros(1), {"c_crossattn": torch.zeros(1, 3, 8)})
    residuals = out["c_control"]
    assert len(residuals) == 13 and net.calls == [1, 1]
    assert float(residuals[-1].mean()) == pytest.approx(0.75) and float(residuals[0].mean()) == pytest.approx(
        0.5 + 0.25 * 0.825 ** 12)


def test_start_and_end_are_fractions_of_the_steps():
    net = FakeNet()
    controller = Controller([(net, ControlUnit(model="x", start=0.2, end=0.5), torch.zeros(1, 3, 16, 16))], 10, 1,
                            False)
    active = []
    for i in range(10):
        cond = controller(torch.zeros(1, 4, 2, 2), torch.zeros(1), {"c_crossattn": torch.zeros(1, 3, 8)})
        active.append("c_control" in cond)
        controller.on_step({"i": i})
    assert active == [False, False, True, True, True, True, False, False, False, False]


def test_enum_strings_integers_and_legacy_names():
    assert [parse_mode(v) for v in ("Balanced", "My prompt is more important", 2, "control")] == \
        ["balanced", "prompt", "control", "control"]
    assert [parse_resize(v) for v in ("Just Resize", 1, "Resize and Fill", "Scale to Fit (Inner Fit)",
                                       "Envelope (Outer Fit)")] == ["just", "crop", "fill", "crop", "fill"]
    for bad in (3, True, "Sideways"):
        with pytest.raises(SDError, match="not one of"):
            parse_mode(bad)


def test_resize_modes_fit_the_hint():
    hint = np.zeros((100, 200, 3), np.uint8)
    hint[:, :100] = 255  # left half white
    assert fit_hint(hint, 64, 64, "just").shape == (64, 64, 3)
    crop = fit_hint(hint, 64, 64, "crop")  # scaled to 64x128, centre cut: half white, half black
    assert crop.shape == (64, 64, 3) and crop[:, :28].min() == 255 and crop[:, 36:].max() == 0
    fill = fit_hint(hint, 64, 64, "fill")  # scaled to 32x64 and padded with the border's median
    assert fill.shape == (64, 64, 3) and fill[16:48, :28].min() == 255


# -- preprocessors --------------------------------------------------------------------------------------

def test_preprocessors_on_pictures_with_known_answers():
    from ldm.control.preprocess import detect

    square = edge_picture()
    edges = detect("canny", square, 64)
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    ys, xs = np.nonzero(edges[..., 0])
    assert 14 <= ys.min() <= 17 and 46 <= ys.max() <= 49 and edges[20:44, 20:44].max() == 0  # the outline only
    assert (detect("invert", square, 64) == 255 - square).all()
    assert (detect("threshold", square, 64, a=127) == square).all()
    drawing = 255 - square  # a black square on white: lines are where it is dark against light
    assert detect("scribble_xdog", drawing, 64)[30, 30].min() == 0
    lines = np.full((64, 64, 3), 255, np.uint8)
    lines[30:32, :] = 0  # a dark line on a light page
    art = detect("lineart_standard", lines, 64)
    assert art[30, 32, 0] > 100 and art[10, 32, 0] == 0
    assert detect("canny", square, 128).shape == (128, 128, 3)  # processor_res scales the shorter side
    with pytest.raises(SDError, match="needs MiDaS"):
        detect("depth_midas", square, 64)
    with pytest.raises(SDError, match="not a preprocessor"):
        detect("openpose", square, 64)


def test_depth_preprocessor_uses_sds_midas(tmp_path):
    from ldm.control.preprocess import detect, load_midas
    from ldm.modules.midas.api import MiDaSInference
    from tests.tinyckpt import save_tiny

    midas = randomize_(MiDaSInference(tiny=True), 0).eval()
    path = save_tiny(torch.nn.ModuleDict({"depth_model": midas}), tmp_path / "depth.safetensors")
    loaded = load_midas(path)
    depth = detect("depth_midas", edge_picture((96, 64)), 64, midas=loaded)
    assert depth.shape == (64, 96, 3) and depth.min() == 0 and depth.max() == 255
    assert (depth[..., 0] == depth[..., 1]).all()
    with pytest.raises(SDError, match="not MiDaS"):
        load_midas(save_tiny(tiny_controlnet(), tmp_path / "cn.safetensors"))


# -- files -----------------------------------------------------------------------------------------------

def test_controlnet_files_load_strictly_in_every_form(tmp_path, tiny_pair):
    from safetensors.torch import save_file

    _, net, _, _ = tiny_pair
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    alone = tmp_path / "alone.safetensors"
    save_file(state, str(alone))
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({"control_model." + k: v for k, v in state.items()}, str(prefixed))
    full = tmp_path / "controlldm.ckpt"  # the reference's ControlLDM checkpoint: the SD keys beside it
    torch.save({"state_dict": {**{"control_model." + k: v for k, v in state.items()},
                               "model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}}, full)
    params = unet_params()
    for path in (alone, prefixed, full):
        loaded = load_controlnet(path, params, 4, torch.float32, torch.device("cpu"))
        for key, value in state.items():
            assert torch.equal(loaded.state_dict()[key], value), (path.name, key)
    sd_only = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}, str(sd_only))
    with pytest.raises(SDError, match="holds no ControlNet") as info:
        load_controlnet(sd_only, params, 4, torch.float32, torch.device("cpu"))
    assert "\n" not in str(info.value)
    wider = dict(params, model_channels=64)
    with pytest.raises(SDError, match="does not fit this model"):
        load_controlnet(alone, wider, 4, torch.float32, torch.device("cpu"))
    with pytest.raises(SDError, match="class label"):
        controlnet_config(dict(params, num_classes=1000), 3, 4)


# -- the pipeline and the CLI ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_ckpts):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("controlnet")
    net = tiny_controlnet()
    (root / "controlnet").mkdir()
    cn = root / "controlnet" / "control_tiny_canny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(cn))
    Image.fromarray(edge_picture((256, 256))).save(root / "edges.png")
    return {"root": root, "cn": cn, "edges": root / "edges.png", "ckpt": tiny_ckpts["eps"]["safetensors"],
            "config": Path(tiny_ckpts["eps"]["config"])}


@pytest.fixture(scope="module")
def pipe(files):
    from ldm.pipeline import Pipeline

    return Pipeline.load(files["ckpt"], files["config"], **CPU)


def unit_of(files, **kw) -> ControlUnit:
    return ControlUnit(model=str(files["cn"]), image=np.asarray(Image.open(files["edges"]).convert("RGB")), **kw)


def test_pipeline_controlnet_changes_the_picture_and_records_the_unit(pipe, files):
    common = dict(seed=3, steps=4, width=256, height=256)
    plain = pipe.txt2img("a cube", **common)[0]
    steered = pipe.txt2img("a cube", control=(unit_of(files, module="canny", weight=1.5),), **common)[0]
    off = pipe.txt2img("a cube", control=(unit_of(files, start=0.9, end=1.0, weight=0.0),), **common)[0]
    a, b, c = (np.asarray(i.image, np.float32) for i in (plain, steered, off))
    assert np.abs(a - b).mean() > 1.0 and np.abs(a - c).max() == 0  # weight 0: the same picture
    from ldm.control.units import parse_infotext
    from ldm.files import metadata

    fields = metadata.parse_parameters(steered.parameters)[2]
    unit = parse_infotext(fields["ControlNet 0"])
    assert unit["Module"] == "canny" and unit["Model"] == "control_tiny_canny" and unit["Weight"] == "1.5"
    assert unit["Control Mode"] == "Balanced" and unit["Resize Mode"] == "Crop and Resize"
    assert unit["Threshold A"] == "100" and unit["Processor Res"] == "512"


def test_pipeline_refuses_bad_units_in_one_line(pipe, files):
    for kw, message in ((dict(weight=2.5), "weight must be a number from 0 to 2"),
                        (dict(start=0.6, end=0.4), "is after"), (dict(module="hed"), "not a preprocessor"),
                        (dict(weight=float("nan")), "weight"), (dict(mode="loud"), "mode")):
        with pytest.raises(SDError, match=message) as info:
            pipe.txt2img("a cube", seed=1, steps=2, width=256, height=256, control=(unit_of(files, **kw),))
        assert "\n" not in str(info.value)
    with pytest.raises(SDError, match="not found"):
        pipe.txt2img("a", steps=2, width=256, height=256, control=(ControlUnit(model="/nope.safetensors",
                                                                              image=edge_picture()),))


def test_cli_controlnet_writes_the_infotext_and_from_image_reproduces_it(files, tmp_path, capsys):
    from ldm.cli import main

    base = ["txt2img", "--ckpt", str(files["ckpt"]), "--config", str(files["config"]), "--prompt", "a cube",
            "--steps", "3", "--H", "256", "--W", "256", "--n_samples", "1", "--n_iter", "1", "--precision", "full",
            "--device", "cpu"]
    control = ["--controlnet", f"{files['cn']}:0.8", "--control-image", str(files["edges"]), "--control-module",
               "canny", "--control-mode", "prompt", "--control-end", "0.75"]
    assert main([*base, *control, "--outdir", str(tmp_path / "a")]) == 0
    first = next((tmp_path / "a" / "samples").glob("*.png"))
    from ldm.files import metadata

    info = metadata.Infotext.of_png(first)
    assert "Weight: 0.8" in info.fields["ControlNet 0"] and "My prompt is more important" in info.fields["ControlNet 0"]
    # --from-image takes the unit's settings from the PNG; the file and picture come from the flags
    assert main([*base, "--controlnet", str(files["cn"]), "--control-image", str(files["edges"]), "--from-image",
                 str(first), "--outdir", str(tmp_path / "b")]) == 0
    again = next((tmp_path / "b" / "samples").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    capsys.readouterr()
    assert main([*base, "--from-image", str(first), "--outdir", str(tmp_path / "c")]) == 1
    assert "pass --controlnet FILE and --control-image" in capsys.readouterr().err
    assert main([*base, "--control-image", str(files["edges"]), "--outdir", str(tmp_path / "d")]) == 1
    assert "only apply with --controlnet" in capsys.readouterr().err
    assert main([*base, "--controlnet", f"{files['cn']}:9", "--control-image", str(files["edges"]),
                 "--outdir", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--controlnet FILE:WEIGHT (unit 1) must be a number from 0 to 2" in err


# -- the A1111 API ---------------------------------------------------------------------------------------

def b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def served(files):
    from ldm.pipeline import Pipeline
    from ldm.serve.app import Server
    from tests.serving import serving

    server = Server(Pipeline.load(files["ckpt"], files["config"], **CPU), controlnet_dir=files["root"] / "controlnet")
    with serving(server) as (url, _):
        yield url


def post(url, path, body):
    import requests

    return requests.post(url + path, json=body, timeout=120)


def test_extension_routes_list_models_modules_and_settings(served, files):
    import requests

    assert requests.get(served + "/controlnet/version").json() == {"version": 3}
    models = requests.get(served + "/controlnet/model_list").json()["model_list"]
    assert len(models) == 1 and models[0].startswith("control_tiny_canny [")
    modules = requests.get(served + "/controlnet/module_list", params={"alias_names": "true"}).json()
    assert "canny" in modules["module_list"] and modules["module_detail"]["canny"]["sliders"][1]["value"] == 100
    assert requests.get(served + "/controlnet/settings").json() == {"control_net_unit_count": 3,
                                                                     "control_net_max_models_num": 3}
    types = requests.get(served + "/controlnet/control_types").json()["control_types"]
    assert types["Canny"]["default_model"] == models[0] and types["Canny"]["default_option"] == "canny"
    reply = post(served, "/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [b64(files["edges"])],
                                                "controlnet_processor_res": 128})
    assert reply.status_code == 200 and reply.json()["info"] == "Success"
    edges = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply.json()["images"][0]))))
    assert edges.shape == (128, 128, 3) and edges.max() == 255 and edges[50:70, 50:70].max() == 0


def gimpfusion_unit(files, model) -> dict:
    """stable-gimpfusion's unit, as its CONTROLNET_DEFAULT_SETTINGS and getControlNetParams build it."""
    return {"input_image": b64(files["edges"]), "mask": "", "module": "canny", "model": model, "weight": 1.0,
            "resize_mode": "Scale to Fit (Inner Fit)", "lowvram": False, "processor_res": 64, "threshold_a": 64,
            "threshold_b": 64, "guidance": 1.0, "guidance_start": 0.0, "guidance_end": 1.0, "guessmode": True}


def test_client_replays_gimpfusion_and_photoshop(served, files):
    import requests

    model = requests.get(served + "/controlnet/model_list").json()["model_list"][0]
    body = {"prompt": "a cube", "steps": 3, "width": 256, "height": 256, "seed": 4, "sampler_index": "Euler a",
            "batch_size": 1, "cfg_scale": 7.5, "denoising_strength": 0.8}
    # stable-gimpfusion: the extension's old /controlnet/txt2img with controlnet_units
    reply = post(served, "/controlnet/txt2img", {**body, "controlnet_units": [gimpfusion_unit(files, model)]})
    assert reply.status_code == 200, reply.text
    info = json.loads(reply.json()["info"])
    assert "ControlNet 0" in info["infotexts"][0] and any("guessmode" in i for i in info.get("ignored_settings", []))
    plain = post(served, "/sdapi/v1/txt2img", body).json()["images"][0]
    assert reply.json()["images"][0] != plain
    # the Photoshop plug-in (typescripts/controlnet/entry.ts, mapPluginSettingsToControlNet): its units both in
    # controlnet_units and in alwayson_scripts, the old field names, pixel_perfect on, a disabled unit after
    def photoshop_unit(enabled, model, image):
        return {"enabled": enabled, "input_image": image, "mask": "", "module": "canny", "model": model, "weight": 0.9,
                "resize_mode": "Scale to Fit (Inner Fit)", "lowvram": False, "processor_res": 512, "threshold_a": 100,
                "threshold_b": 200, "guidance_start": 0, "guidance_end": 1, "guessmode": False, "control_mode": 0,
                "pixel_perfect": True}

    units = [photoshop_unit(True, model, b64(files["edges"])), photoshop_unit(False, "None", None)]
    reply = post(served, "/sdapi/v1/txt2img", {**body, "controlnet_units": units, "subseed": -1,
                                               "alwayson_scripts": {"controlnet": {"args": units}}})
    assert reply.status_code == 200, reply.text
    assert "Weight: 0.9" in json.loads(reply.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("change, message", [
    ({"model": "control_nope"}, "no ControlNet named"),
    ({"module": "openpose_full"}, "not a preprocessor"),
    ({"weight": 3}, "weight must be a number from 0 to 2"),
    ({"guidance_start": 0.9, "guidance_end": 0.1}, "is after"),
    ({"guidance": 0.5}, "disagree"),
    ({"image": "not base64!"}, "not valid base64"),
    ({"control_mode": 7}, "control_mode"),
    ({"mask": b64(Path(__file__))}, "mask"),
], ids=["model", "module", "weight", "start-end", "alias", "image", "mode", "mask"])
def test_bad_units_get_one_422_line(served, files, change, message):
    import requests

    model = requests.get(served + "/controlnet/model_list").json()["model_list"][0]
    unit = {"module": "canny", "model": model, "image": b64(files["edges"]), "guidance_end": 1.0, **change}
    reply = post(served, "/sdapi/v1/txt2img", {"prompt": "a", "steps": 2, "width": 256, "height": 256,
                                                 "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert reply.status_code == 422, reply.text
    detail = reply.json()["detail"]
    assert message in detail and "\n" not in detail
    assert requests.get(served + "/controlnet/version").status_code == 200  # still serving


# -- the hires fix ---------------------------------------------------------------------------------------

def test_hires_sizes_follow_a1111s_rules():
    from ldm.hires import Hires

    assert Hires(scale=2).target(512, 384) == ((1024, 768), (1024, 768))
    assert Hires(scale=1.5).target(512, 512) == ((768, 768), (768, 768))
    assert Hires(width=1024).target(512, 384) == ((1024, 768), (1024, 768))  # the height follows the aspect
    assert Hires(height=600).target(512, 384) == ((800, 600), (800, 600))
    # both given: scaled to cover, then cropped
    assert Hires(width=1024, height=1024).target(512, 384) == ((1365, 1024), (1024, 1024))
    assert Hires(width=640, height=320).target(512, 512) == ((640, 640), (640, 320))


def test_hires_latent_modes_and_crop():
    from ldm.hires import LATENT_MODES, crop_latents, upscale_latents

    z = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(upscale_latents(z, (8, 8), "Latent (nearest)")[0, 0, ::2, ::2], z[0, 0])
    assert upscale_latents(z, (8, 8), "Latent").shape == (1, 1, 8, 8) and len(LATENT_MODES) == 6
    assert crop_latents(torch.zeros(1, 4, 10, 16), (64, 80), 8).shape == (1, 4, 10, 8)


def test_hires_second_pass_gives_the_larger_picture_and_its_fields(pipe):
    from ldm.files import metadata
    from ldm.hires import Hires

    steps = []
    out = pipe.txt2img("a cube", seed=2, steps=4, width=256, height=256,
                       hires=Hires(scale=1.5, strength=0.5, upscaler="Latent (bicubic)"),
                       progress=lambda p: steps.append((p.step, p.total)))[0]
    assert out.image.size == (384, 384)
    assert steps[-1] == (6, 6)  # 4 first-pass steps, then the last half of 4
    fields = metadata.parse_parameters(out.parameters)[2]
    assert fields["Size"] == "256x256" and fields["Hires upscale"] == "1.5" and fields["Hires upscaler"] == "Latent (bicubic)"
    assert fields["Denoising strength"] == "0.5"
    pixel = pipe.txt2img("a cube", seed=2, steps=4, width=256, height=256,
                         hires=Hires(width=384, height=256, upscaler="Lanczos", steps=2, strength=1.0, keep_first=True))[0]
    assert pixel.image.size == (384, 256) and pixel.first_pass.size == (256, 256)
    first = pipe.txt2img("a cube", seed=2, steps=4, width=256, height=256)[0]
    assert np.array_equal(np.asarray(first.image), np.asarray(pixel.first_pass))  # the first pass is plain txt2img
    assert out.first_pass is None
    with pytest.raises(SDError, match="hires.upscaler"):
        pipe.txt2img("a", steps=2, width=256, height=256, hires=Hires(upscaler="ESRGAN_4x"))
    with pytest.raises(SDError, match="plain txt2img"):
        pipe.img2img(Image.new("RGB", (256, 256)), "a", steps=2, hires=Hires())


def test_cli_hires_fix_writes_the_larger_picture_and_reads_it_back(files, tmp_path):
    from ldm.cli import main
    from ldm.files import metadata

    base = ["txt2img", "--ckpt", str(files["ckpt"]), "--config", str(files["config"]), "--prompt", "a cube",
            "--steps", "3", "--H", "256", "--W", "256", "--n_samples", "1", "--n_iter", "1", "--precision", "full",
            "--device", "cpu"]
    assert main([*base, "--hires-scale", "1.25", "--hires-steps", "4", "--hires-strength", "0.5",
                 "--hires-keep-first", "--outdir", str(tmp_path / "a")]) == 0
    samples = tmp_path / "a" / "samples"
    made = samples / "00000.png"
    assert Image.open(made).size == (320, 320)
    assert Image.open(samples / "00000-before-highres-fix.png").size == (256, 256)
    fields = metadata.Infotext.of_png(made).fields
    assert fields["Hires upscale"] == "1.25" and fields["Hires steps"] == "4" and fields["Denoising strength"] == "0.5"
    assert main([*base, "--from-image", str(made), "--outdir", str(tmp_path / "b")]) == 0
    again = tmp_path / "b" / "samples" / "00000.png"
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(again)))
    assert main([*base, "--hires-resize", "10x", "--outdir", str(tmp_path / "c")]) == 1


def test_sillytavern_enable_hr_request_returns_the_asked_size(served):
    """SillyTavern's generateAutoImage body with its hires fields on (extension_settings.sd.enable_hr)."""
    body = {"prompt": "a cube", "negative_prompt": "", "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "steps": 3, "cfg_scale": 7, "width": 256, "height": 256, "restore_faces": False, "enable_hr": True,
            "hr_upscaler": "Latent", "hr_scale": 1.5, "hr_additional_modules": [], "denoising_strength": 0.7,
            "hr_second_pass_steps": 2, "seed": 11, "clip_skip": 1, "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": True, "save_images": False, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False}
    reply = post(served, "/sdapi/v1/txt2img", body)
    assert reply.status_code == 200, reply.text
    picture = Image.open(io.BytesIO(base64.b64decode(reply.json()["images"][0])))
    assert picture.size == (384, 384)
    infotext = json.loads(reply.json()["info"])["infotexts"][0]
    assert "Hires upscale: 1.5" in infotext and "Hires steps: 2" in infotext
    bad = post(served, "/sdapi/v1/txt2img", {**body, "hr_upscaler": "R-ESRGAN 4x+"})
    assert bad.status_code == 422 and "could not find upscaler" in bad.json()["detail"]
    import requests

    assert requests.get(served + "/sdapi/v1/latent-upscale-modes").json()[0] == {"name": "Latent"}


def test_hires_with_the_sd_x4_upscaler(pipe, tmp_path):
    """"SD x4": the first pass through the x4 diffusion upscaler (its checkpoint beside the model), then resized."""
    from ldm.files import metadata
    from ldm.hires import Hires
    from tests.tinyckpt import build_tiny, save_tiny

    x4 = save_tiny(build_tiny("tiny-x4-upscaling.yaml", 5), tmp_path / "x4-tiny.ckpt")
    out = pipe.txt2img("a cube", seed=2, steps=2, width=256, height=256,
                       hires=Hires(scale=1.25, upscaler="SD x4", x4=str(x4), steps=2, strength=0.5,
                                   x4_config=str(ROOT / "tests" / "configs" / "tiny-x4-upscaling.yaml"), x4_steps=2))[0]
    assert out.image.size == (320, 320)
    assert metadata.parse_parameters(out.parameters)[2]["Hires upscaler"] == "SD x4 (x4-tiny)"
    lanczos = pipe.txt2img("a cube", seed=2, steps=2, width=256, height=256,
                           hires=Hires(scale=1.25, upscaler="Lanczos", steps=2, strength=0.5))[0]
    assert np.abs(np.asarray(out.image, np.float32) - np.asarray(lanczos.image, np.float32)).mean() > 1.0
    with pytest.raises(SDError, match="needs the x4 upscaler's checkpoint"):
        pipe.txt2img("a", steps=2, width=256, height=256, hires=Hires(upscaler="SD x4"))


def test_the_api_names_x4_upscalers_as_upscalers_lists_them():
    from ldm.serve.a1111 import RequestError, Txt2ImgRequest, hires_of

    models = {"SD x4 (x4-upscaler-ema)": Path("/models/x4-upscaler-ema.ckpt")}
    hires = hires_of(Txt2ImgRequest(enable_hr=True, hr_upscaler="SD x4 (x4-upscaler-ema)"), x4_models=models)
    assert hires.upscaler == "SD x4" and hires.x4 == "/models/x4-upscaler-ema.ckpt" and hires.strength == 0.75
    assert hires_of(Txt2ImgRequest(enable_hr=True, hr_upscaler="None")).upscaler == "Lanczos"
    for name in ("SD x4", "SD x4 (other)", "4x-UltraSharp"):
        with pytest.raises(RequestError, match="could not find upscaler named"):
            hires_of(Txt2ImgRequest(enable_hr=True, hr_upscaler=name), x4_models=models)
