"""The demo model as the commands' default: `sd txt2img --prompt ...` with no --ckpt, as a newcomer runs it.

Every generating command that a text-to-image model can serve uses the shipped demo model when neither
--ckpt nor SD_CKPT is given, says so in one line, and writes 256x256 images by default. What the images
show is read from their pixels (ldm.data.measure), so these tests check prompt following, not only that
a file appeared.
"""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.cli import main
from ldm.files.metadata import parse_parameters
from ldm.data.measure import read_image
from ldm.data.shapes import ShapeScene, render_scene
from ldm.loading.families import DEMO_CKPT

NOTE = "note: no --ckpt given, using the built-in demo model"
# fp32 pinned: these assertions read one seed's picture, and `auto` picks bf16 on CPUs that have it natively
# (AMX), which draws another picture from the same seed.
FAST = ["--steps", "20", "--n_samples", "2", "--n_iter", "1", "--device", "cpu", "--precision", "full", "--scale", "5"]


def run(command, args, capsys, monkeypatch=None):
    code = main([command, *args])
    return code, capsys.readouterr().err


@pytest.fixture(autouse=True)
def no_configured_checkpoint(monkeypatch):
    monkeypatch.delenv("SD_CKPT", raising=False)
    monkeypatch.delenv("SD_CONFIG", raising=False)


def readings(folder: Path):
    files = sorted((folder / "samples").glob("*.png"))
    return files, [read_image(np.asarray(Image.open(f).convert("RGB"))) for f in files]


def test_txt2img_without_ckpt_uses_the_demo_model_and_says_so(tmp_path, capsys):
    # No --scale: the demo model's own guidance 5.0 (the reference's 9.0 over-drives it).
    code, err = run("txt2img", ["--prompt", "a red circle on a blue background", *FAST[:-2], "--outdir", str(tmp_path)],
                    capsys)
    assert code == 0, err
    assert err.count(NOTE) == 1 and "pass --ckpt for Stable Diffusion 2.x weights" in err
    files, read = readings(tmp_path)
    assert len(files) == 2 and Image.open(files[0]).size == (256, 256)
    _, _, settings = parse_parameters(Image.open(files[0]).text["parameters"])
    assert settings["Config"] == "demo-inference.yaml" and settings["Size"] == "256x256"
    assert settings["CFG scale"] == "5.0"
    # Both samples follow the prompt (the seeds are 42 and 43).
    assert [(r.color, r.background, r.shape) for r in read] == [("red", "blue", "circle")] * 2


def test_a_configured_or_given_checkpoint_is_used_instead(tiny_ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SD_CKPT", str(tiny_ckpts["eps"]["safetensors"]))
    monkeypatch.setenv("SD_CONFIG", str(tiny_ckpts["eps"]["config"]))
    code, err = run("txt2img", ["--prompt", "x", "--steps", "2", "--n_samples", "1", "--n_iter", "1", "--H", "256",
                                "--W", "256", "--device", "cpu", "--outdir", str(tmp_path)], capsys)
    assert code == 0, err
    assert NOTE not in err
    _, _, settings = parse_parameters(Image.open(next((tmp_path / "samples").glob("*.png"))).text["parameters"])
    assert settings["Config"] == Path(tiny_ckpts["eps"]["config"]).name
    assert settings["CFG scale"] == "9.0"  # a Stable Diffusion checkpoint keeps the reference's default


def test_config_without_ckpt_is_a_one_line_error(tmp_path, capsys):
    code, err = run("txt2img", ["--config", "configs/stable-diffusion/v2-inference-v.yaml", "--outdir", str(tmp_path)], capsys)
    assert code == 1
    assert err.strip().count("\n") == 0 and "--config" in err and "without --ckpt" in err
    assert not (tmp_path / "samples").exists()


def test_img2img_recolours_a_render_with_the_demo_model(tmp_path, capsys):
    # Strength 0.7 keeps the input's shape (measured 4 of 4 squares; at 0.8 one of 4 came out round).
    source = tmp_path / "in.png"
    render_scene(ShapeScene("square", "yellow", "black", "center", "large")).save(source)
    out = tmp_path / "out"
    code, err = run("img2img", ["--init-img", str(source), "--prompt", "a large white square on a black background",
                                "--strength", "0.7", *FAST, "--outdir", str(out)], capsys)
    assert code == 0, err
    assert err.count(NOTE) == 1
    files, read = readings(out)
    assert len(files) == 2
    assert [(r.color, r.background, r.shape) for r in read] == [("white", "black", "square")] * 2


def test_inpainting_recolours_the_shape_and_keeps_the_rest(tmp_path, capsys):
    source, mask = tmp_path / "in.png", tmp_path / "mask.png"
    render_scene(ShapeScene("circle", "red", "blue", "center", "large")).save(source)
    m = np.zeros((256, 256), np.uint8)
    m[56:200, 56:200] = 255  # the circle (radius 64 around the centre) and a margin
    Image.fromarray(m).save(mask)
    out = tmp_path / "out"
    code, err = run("inpaint", ["--image", str(source), "--mask", str(mask), "--prompt",
                                "a large green circle on a blue background, center", *FAST, "--outdir", str(out)], capsys)
    assert code == 0, err
    files, read = readings(out)
    assert [(r.color, r.background) for r in read] == [("green", "blue")] * 2
    before = np.asarray(Image.open(source).convert("RGB"), dtype=np.int16)
    for f in files:
        after = np.asarray(Image.open(f).convert("RGB"), dtype=np.int16)
        outside = m == 0
        # kept pixels are pasted back (the invisible watermark moves them by a few levels at most)
        assert np.abs(after - before)[outside].mean() < 2.0


def test_depth2img_without_ckpt_explains_what_it_needs(tmp_path, capsys):
    source = tmp_path / "in.png"
    render_scene(ShapeScene("circle", "red", "blue", "center", "large")).save(source)
    code, err = run("depth2img", ["--init-img", str(source), "--prompt", "x", "--outdir", str(tmp_path / "o")], capsys)
    assert code == 1 and err.count("\n") <= 2 and "depth" in err.lower()


def test_demo_weights_are_the_only_weights_in_the_repository():
    root = DEMO_CKPT.parents[2]
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "*.safetensors", "*.ckpt", "*.pt", "*.bin"], cwd=root,
                             capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (an sdist, say): nothing to check
        pytest.skip("not a git checkout")
    assert tracked == ["checkpoints/demo/demo.safetensors"]
