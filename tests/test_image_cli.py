"""`sd img2img / inpaint / depth2img / upscale` end to end on tiny checkpoints, and their helpers."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import main
from ldm.files.imageio import apply_watermark, pil_to_tensor, tensor_to_pil
from ldm.files.metadata import parse_parameters
from ldm import tasks
from ldm.tasks import tiling
from ldm.tasks import base as task_base, inpaint as task_inpaint

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "configs"
FAST = ["--steps", "2", "--precision", "full", "--device", "cpu", "--n_samples", "1", "--n_iter", "1"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_ckpts):
    """Tiny inpainting, depth and x4-upscaler checkpoints (plus the session's txt2img one)."""
    from tests.tinyckpt import build_tiny, save_tiny

    root = tmp_path_factory.mktemp("image-ckpts")
    out = {"eps": (tiny_ckpts["eps"]["ckpt"], tiny_ckpts["eps"]["config"], tiny_ckpts["eps"]["model"])}
    for kind, cfg, seed in (("inpaint", "tiny-v2-inpainting.yaml", 3), ("depth", "tiny-v2-midas.yaml", 4),
                            ("upscale", "tiny-x4-upscaling.yaml", 5)):
        model = build_tiny(cfg, seed)
        out[kind] = (save_tiny(model, root / f"{kind}.ckpt"), CONFIGS / cfg, model)
    return out


def model_args(ckpts, kind):
    return ["--ckpt", str(ckpts[kind][0]), "--config", str(ckpts[kind][1])]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A smooth 260x300 test picture (sides not multiples of 8), a 64x64 one, and masks."""
    from tests.conftest import smooth_photo

    root, rgb = tmp_path_factory.mktemp("images"), smooth_photo()
    paths = {"photo": root / "photo.png", "small": root / "small.png", "mask": root / "mask.png"}
    Image.fromarray(rgb).save(paths["photo"])  # 260 wide, 300 high
    Image.fromarray(rgb[::4, ::4][:64, :64]).save(paths["small"])
    mask = np.zeros((600, 520), np.uint8)  # twice the photo's size: resized to it
    mask[200:400, 160:360] = 255  # repaint rows 100..200, columns 80..180 of the photo
    Image.fromarray(mask).save(paths["mask"])
    return paths


def run(command, args, capsys):
    code = main([command, *args])
    return code, capsys.readouterr().err


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def psnr(a, b):
    return 10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b) ** 2))


# -- helpers with exact answers -----------------------------------------------------------------------

def test_steps_for_strength_is_the_references_int_strength_times_steps():
    from ldm.request import SamplingSettings

    ddim = SamplingSettings(steps=50, sampler="ddim")
    assert [task_base.steps_for_strength(ddim, s) for s in (0.0, 0.3, 0.8, 1.0)] == [0, 15, 40, 50]
    assert task_base.steps_for_strength(SamplingSettings(steps=3, sampler="ddim"), 0.5) == 1
    # ComfyUI's turbo schedule takes its steps whatever the strength: it starts lower instead
    assert task_base.steps_for_strength(SamplingSettings(steps=2, sampler="euler", schedule="turbo"), 0.5) == 2


def test_mask_rule_bright_any_colour_is_repaint_transparent_is_keep():
    rgba = np.zeros((1, 6, 4), np.uint8)
    rgba[0, 0] = (255, 255, 255, 255)  # white: repaint
    rgba[0, 1] = (0, 0, 0, 255)  # black: keep
    rgba[0, 2] = (200, 0, 0, 255)  # a red stroke: repaint
    rgba[0, 3] = (255, 255, 255, 0)  # transparent white: keep
    rgba[0, 4] = (255, 255, 255, 100)  # faint white over black = 100: keep
    rgba[0, 5] = (255, 255, 255, 128)  # = 128: repaint
    got = task_inpaint.mask_to_binary(Image.fromarray(rgba, "RGBA"))
    assert got.tolist() == [[True, False, True, False, False, True]]
    gray = task_inpaint.mask_to_binary(Image.fromarray(np.array([[127, 128]], np.uint8), "L"))
    assert gray.tolist() == [[False, True]]


def test_exact_tensor_survives_tensor_to_pil_for_every_level():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = Image.fromarray(np.stack([levels, levels.T, 255 - levels], -1))
    assert np.array_equal(np.asarray(tensor_to_pil(task_base.exact_tensor(img))[0]), np.asarray(img))
    # ...which the plain 2p/255 - 1 does not do for every level (the reason exact_tensor exists).
    assert not np.array_equal(np.asarray(tensor_to_pil(pil_to_tensor(img))[0]), np.asarray(img))


def test_tiles_cover_the_image_and_blend_to_the_untiled_value():
    assert task_base.pad_to_multiple(np.zeros((13, 17, 3))).shape == (16, 24, 3)
    assert tiling.spans(100, 40, 16) == [slice(0, 40), slice(24, 64), slice(48, 88), slice(60, 100)]
    assert tiling.spans(30, 40, 16) == [slice(0, 30)]
    x = torch.randn(2, 3, 37, 50, dtype=torch.float64)
    # A per-pixel function tiles exactly: the windows sum to one everywhere.
    got = tiling.tiled(lambda t, r, c: 2 * t + 1, x, tile=16, overlap=6)
    torch.testing.assert_close(got, 2 * x + 1, rtol=0, atol=1e-12)
    # With a scale (as the VAE decoder), tiles land at `scale` times their position.
    up = tiling.tiled(lambda t, r, c: t.repeat_interleave(4, -2).repeat_interleave(4, -1), x, tile=16, overlap=6, scale=4)
    torch.testing.assert_close(up, x.repeat_interleave(4, -2).repeat_interleave(4, -1), rtol=0, atol=1e-12)
    # Tiles see their own slice of spatial conditioning; text and class labels are shared.
    cond = {"c_concat": torch.arange(37 * 50, dtype=torch.float64).reshape(1, 1, 37, 50), "c_adm": torch.tensor([7]), "c_crossattn": torch.ones(1, 77, 4)}
    seen = tiling.tiled(lambda t, r, c: tiling.crop_spatial(cond, (37, 50), r, c)["c_concat"], x[:1, :1], 16, 6)
    torch.testing.assert_close(seen, cond["c_concat"], rtol=0, atol=1e-9)


def test_latent_blend_shows_the_model_the_noised_input_in_kept_cells():
    from ldm.models.diffusion.schedules import t_to_sigma

    seen = {}

    def apply_model(x_t, t, cond):
        seen["x"] = x_t
        return torch.zeros_like(x_t)

    sigmas = torch.linspace(0.03, 14.6, 1000, dtype=torch.float64)
    keep = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    keep[..., :, :2] = True
    blend = tasks.LatentBlend(apply_model, sigmas, keep)
    blend.z0, blend.noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    x_t, t = torch.randn(4, 4, 4, 4), torch.tensor([300.0, 700.0, 300.0, 700.0])  # guidance: [uncond; cond]
    blend(x_t, t, {})
    sigma = t_to_sigma(t.double(), sigmas).float().reshape(-1, 1, 1, 1)
    known = (torch.cat([blend.z0, blend.z0]) + sigma * torch.cat([blend.noise, blend.noise])) / (1 + sigma ** 2).sqrt()
    torch.testing.assert_close(seen["x"][..., :2], known[..., :2])
    assert torch.equal(seen["x"][..., 2:], x_t[..., 2:])


# -- the commands ---------------------------------------------------------------------------------------

def test_img2img_strength_0_returns_the_input_and_1_ignores_it(ckpts, images, tmp_path, capsys):
    ckpt, config, model = ckpts["eps"]
    code, err = run("img2img", [*model_args(ckpts, "eps"), *FAST, "--init-img", str(images["photo"]), "--strength", "0",
                                "--sampler", "euler", "--outdir", str(tmp_path / "s0")], capsys)
    assert code == 0, err
    assert "resized to 256x296" in err  # 260x300 shrunk to multiples of 8
    got = pixels(tmp_path / "s0/samples/00000.png")
    # Strength 0 redoes nothing: the (resized) input itself, not its VAE round trip, plus the watermark.
    x = Image.open(images["photo"]).convert("RGB").resize((256, 296), Image.LANCZOS)
    expected = apply_watermark(x)
    assert got.shape == (296, 256, 3)
    assert np.array_equal(got, np.asarray(expected, np.int16))
    fields = parse_parameters(Image.open(tmp_path / "s0/samples/00000.png").text["parameters"])[2]
    assert fields["Denoising strength"] == "0.0" and fields["Mode"] == "img2img" and fields["Size"] == "256x296"

    # Strength 1 through the reference-style script: exactly txt2img's image for that seed and size.
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/img2img.py"), *model_args(ckpts, "eps"), *FAST,
                           "--init-img", str(images["photo"]), "--strength", "1", "--seed", "5", "--prompt", "a cat",
                           "--outdir", str(tmp_path / "s1")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    code, err = run("txt2img", [*model_args(ckpts, "eps"), *FAST, "--H", "296", "--W", "256", "--seed", "5", "--prompt", "a cat",
                                "--outdir", str(tmp_path / "t")], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "s1/samples/00000.png"), pixels(tmp_path / "t/samples/00000.png"))


@pytest.mark.parametrize("kind", ["inpaint", "eps"])
def test_inpaint_keeps_unmasked_pixels_with_either_kind_of_checkpoint(kind, ckpts, images, tmp_path, capsys):
    out = tmp_path / "out"
    # The blend also runs with a deterministic sampler: the demo's eta 1.0 applies only to samplers with an eta.
    sampler = ["--sampler", "euler"] if kind == "eps" else []
    code, err = run("inpaint", [*model_args(ckpts, kind), *FAST, "--image", str(images["photo"]), *sampler,
                                "--mask", str(images["mask"]), "--prompt", "a hole", "--outdir", str(out)], capsys)
    assert code == 0, err
    assert parse_parameters(Image.open(out / "samples/00000.png").text["parameters"])[2]["Eta"] == (
        "0.0" if kind == "eps" else "1.0")
    assert "mask 520x600 resized" in err
    got = pixels(out / "samples/00000.png")
    original = Image.open(images["photo"]).convert("RGB")
    assert got.shape == (300, 260, 3)  # padded to 264x304 for the model, cropped back
    # Unmasked pixels are the input's: equal to the watermarked input wherever the watermark's 8x8
    # blocks see no repainted pixel.
    expected = np.asarray(apply_watermark(original), np.int16)
    near = np.zeros((300, 260), bool)
    near[100 - 8:200 + 8, 80 - 8:180 + 8] = True
    assert np.array_equal(got[~near], expected[~near])
    assert np.abs(got[100:200, 80:180] - expected[100:200, 80:180]).mean() > 10  # the hole was repainted
    mode = parse_parameters(Image.open(out / "samples/00000.png").text["parameters"])[2]["Inpaint"]
    assert mode == ("inpainting model" if kind == "inpaint" else "latent blend")


def test_upscale_is_4x_and_tiled_matches_untiled(ckpts, images, tmp_path, capsys, monkeypatch):
    args = [*model_args(ckpts, "upscale"), *FAST, "--scale", "1", "--image", str(images["small"]), "--tile-size", "56",
            "--tile-overlap", "40"]
    code, err = run("upscale", [*args, "--no-tile", "--outdir", str(tmp_path / "whole")], capsys)
    assert code == 0, err
    # Automatic tiling: pretend memory is short.
    monkeypatch.setattr(tiling, "available_memory", lambda: 1)
    code, err = run("upscale", [*args, "--outdir", str(tmp_path / "tiled")], capsys)
    assert code == 0, err
    assert "running in 56x56 tiles" in err
    whole, tiled = pixels(tmp_path / "whole/samples/00000.png"), pixels(tmp_path / "tiled/samples/00000.png")
    assert whole.shape == tiled.shape == (256, 256, 3)
    assert psnr(whole, tiled) >= 35
    fields = parse_parameters(Image.open(tmp_path / "tiled/samples/00000.png").text["parameters"])[2]
    assert fields["Tiles"] == "56/40" and fields["Noise level"] == "20"


def test_depth2img_uses_the_given_depth_map_and_saves_it(ckpts, images, tmp_path, capsys):
    depth = tmp_path / "depth.png"
    ramp = np.tile(np.linspace(0, 255, 256).astype(np.uint8), (296, 1))  # near on the right
    Image.fromarray(ramp).save(depth)
    out = tmp_path / "out"
    code, err = run("depth2img", [*model_args(ckpts, "depth"), *FAST, "--init-img", str(images["photo"]),
                                  "--depth-map", str(depth), "--save-depth", "--outdir", str(out)], capsys)
    assert code == 0, err
    assert pixels(out / "samples/00000.png").shape == (296, 256, 3)
    saved = np.asarray(Image.open(out / "depth-0000.png"), np.int16)
    assert saved.shape == (296, 256) and np.abs(saved - ramp).max() <= 1


def test_depth2img_midas_conditioning_is_the_models(ckpts, images, tmp_path):
    _, _, model = ckpts["depth"]
    task = tasks.Depth2Img(images["photo"], 0.5)
    from ldm.loading.detect import ModelChoice
    from ldm.request import Request

    request = Request(task=task, seed=0, batch_size=1, n_iter=1, C=4, f=8).resolved(demo=False)
    task.prepare(model, request, torch.device("cpu"), ModelChoice(Path("x"), Path("x.ckpt"), False, "depth", 512))
    expected = model.build_conditioning(pil_to_tensor(task.image))["c_concat"]
    torch.testing.assert_close(task.c_concat, expected)
    assert float(expected.amin()) == -1.0 and float(expected.amax()) == 1.0


@pytest.mark.parametrize("case", ["missing", "corrupt", "too-small", "strength", "noise-level", "mask-aspect",
                                  "txt2img-ckpt-for-depth"])
def test_bad_input_gives_one_line_and_writes_nothing(case, ckpts, images, tmp_path, capsys):
    out = tmp_path / "out"
    photo = str(images["photo"])
    bad = tmp_path / "bad.png"
    if case == "missing":
        args = ["img2img", *model_args(ckpts, "eps"), "--init-img", str(tmp_path / "nope.png")]
    elif case == "corrupt":
        data = Path(photo).read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        args = ["inpaint", *model_args(ckpts, "inpaint"), "--image", str(bad), "--mask", str(images["mask"])]
    elif case == "too-small":
        Image.new("RGB", (200, 200), "gray").save(bad)  # 40000 pixels < 256 * 256
        args = ["img2img", *model_args(ckpts, "eps"), "--init-img", str(bad)]
    elif case == "strength":
        args = ["depth2img", *model_args(ckpts, "depth"), "--init-img", photo, "--strength", "1.5"]
    elif case == "noise-level":
        args = ["upscale", *model_args(ckpts, "upscale"), "--image", str(images["small"]), "--noise-level", "351"]
    elif case == "mask-aspect":
        Image.new("L", (260, 260), 255).save(bad)
        args = ["inpaint", *model_args(ckpts, "inpaint"), "--image", photo, "--mask", str(bad)]
    else:
        args = ["depth2img", *model_args(ckpts, "eps"), "--init-img", photo]
    code, err = run(args[0], [*args[1:], *FAST, "--outdir", str(out)], capsys)
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not list(out.rglob("*.png")) if out.exists() else True


def test_each_command_has_the_reference_demos_defaults():
    import inspect

    from ldm.cli.app import _register_commands, app

    _register_commands()
    commands = {c.name: c.callback for c in app.registered_commands}
    expected = {
        "img2img": {"steps": 50, "n_samples": 2, "n_iter": 1, "scale": 9.0, "strength": 0.8, "ddim_eta": 0.0,
                    "seed": 42, "outdir": Path("outputs/img2img-samples")},
        "inpaint": {"steps": 45, "n_samples": 4, "scale": 10.0, "ddim_eta": None, "outdir": Path("outputs/inpaint-samples")},
        "depth2img": {"steps": 50, "n_samples": 1, "scale": 9.0, "strength": 0.9, "ddim_eta": 0.0,
                      "outdir": Path("outputs/depth2img-samples")},
        "upscale": {"steps": 75, "n_samples": 1, "scale": 10.0, "ddim_eta": 0.0, "noise_level": 20,
                    "outdir": Path("outputs/upscale-samples")},
    }
    from ldm.loading.families import task_defaults

    for name, values in expected.items():
        params = inspect.signature(commands[name]).parameters
        # steps, batch, scale and eta are resolved when the model is known (the demo model has its own,
        # tests/test_demo_cli.py): the flags default to None and the library (ldm.loading.families) holds the values.
        model_dependent = {key: values.pop(key) for key in ("steps", "n_samples", "n_iter", "scale", "ddim_eta")
                           if key in values}
        assert all(params[key].default is None for key in model_dependent), name
        family = task_defaults(name, demo=False)
        family["ddim_eta"] = family.pop("eta") or 0.0
        family["ddim_eta"] = None if name == "inpaint" else family["ddim_eta"]  # 1.0 for samplers that take one
        assert {key: family[key] for key in model_dependent} == model_dependent, name
        assert {key: params[key].default for key in values} == values, name
    assert "C" not in inspect.signature(commands["upscale"]).parameters  # the x4 model fixes C=4, f=4


def test_image_commands_resume_with_skip_existing(ckpts, images, tmp_path, capsys):
    """The batch flags reach the image commands: a finished run re-run with --skip-existing rewrites nothing."""
    args = [*model_args(ckpts, "eps"), *FAST, "--init-img", str(images["photo"]), "--strength", "0.5",
            "--n_samples", "2", "--outdir", str(tmp_path / "o"), "--skip-existing"]
    code, err = run("img2img", args, capsys)
    assert code == 0, err
    files = sorted((tmp_path / "o/samples").glob("*.png"))
    assert [p.name for p in files] == ["00000.png", "00001.png"]
    stamps = [p.stat().st_mtime_ns for p in files]
    code, err = run("img2img", args, capsys)
    assert code == 0, err
    assert sorted((tmp_path / "o/samples").glob("*.png")) == files
    assert [p.stat().st_mtime_ns for p in files] == stamps
