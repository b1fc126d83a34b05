"""`sd variations` and Pipeline.variations end to end on tiny unCLIP checkpoints (H and L classes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import main
from ldm.files.metadata import parse_parameters, read_png_text
from ldm.pipeline import Pipeline

CONFIGS = Path(__file__).resolve().parent / "configs"
FAST = ["--steps", "2", "--precision", "full", "--device", "cpu"]
SIZE = ["--H", "256", "--W", "256"]  # sd variations' size (img2img takes its input's)


@pytest.fixture(scope="module")
def unclip(tmp_path_factory, tiny_ckpts):
    """Tiny unCLIP-H and -L checkpoints, two pictures, a statistics file, and the txt2img checkpoint."""
    from tests.conftest import smooth_photo
    from tests.tinyckpt import build_tiny, save_tiny

    root = tmp_path_factory.mktemp("unclip")
    out = {v: (save_tiny(build_tiny(f"tiny-unclip-{v}.yaml", seed=7), root / f"unclip-{v}.safetensors"),
               CONFIGS / f"tiny-unclip-{v}.yaml") for v in "hl"}
    out["eps"] = (tiny_ckpts["eps"]["ckpt"], tiny_ckpts["eps"]["config"])
    rgb = smooth_photo()
    Image.fromarray(rgb).save(root / "a.png")  # 260x300: cut to 256x256 (multiples of 64)
    Image.fromarray(np.ascontiguousarray(rgb[::-1, ::-1, [2, 0, 1]])).save(root / "b.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    g = torch.Generator().manual_seed(0)
    torch.save((torch.randn(16, generator=g), 0.5 + torch.rand(16, generator=g)), root / "stats.th")
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def pipe_h(unclip):
    return Pipeline.load(unclip["h"][0], unclip["h"][1], device="cpu", precision="full", quiet=True)


def args(unclip, kind, *extra, sized: bool = True):
    ckpt, config = unclip[kind]
    return ["--ckpt", str(ckpt), "--config", str(config), *FAST, *(SIZE if sized else []), *extra]


def px(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_command_writes_what_the_pipeline_returns_with_metadata(unclip, pipe_h, tmp_path, capsys):
    assert pipe_h.native_size == 768  # unCLIP is SD 2.1-768-v
    assert pipe_h.defaults("variations") == {"steps": 20, "scale": 10.0, "n_samples": 2, "n_iter": 2, "eta": None,
                                             "noise_level": 0, "sampler": "ddim", "schedule": None}  # the reference demo's
    a, b = unclip["root"] / "a.png", unclip["root"] / "b.png"
    out = tmp_path / "out"
    code = main(["variations", *args(unclip, "h", "--image", str(a), "--image", str(b), "--weight", "2", "--weight",
                                     "1", "--noise-level", "30", "--prompt", "a house", "--n_samples", "2",
                                     "--n_iter", "1", "--outdir", str(out))])
    assert code == 0, capsys.readouterr().err
    written = sorted((out / "samples").glob("*.png"))
    assert len(written) == 2
    images = pipe_h.variations([a, b], "a house", weights=[2, 1], noise_level=30, width=256, height=256, steps=2,
                               seed=42, batch_size=2)
    assert [im.png() for im in images] == [p.read_bytes() for p in written]
    prompt, _, fields = parse_parameters(read_png_text(written[1])["parameters"])
    assert prompt == "a house" and fields["Mode"] == "variations" and fields["Noise level"] == "30"
    assert fields["Image weights"] == "2.0, 1.0" and len(fields["Image hashes"].split(", ")) == 2

    # --from-image with the same pictures gives the same bytes; pictures swapped are noted
    again = tmp_path / "again"
    assert main(["variations", *args(unclip, "h", "--image", str(a), "--image", str(b), "--from-image",
                                     str(written[1]), "--outdir", str(again))]) == 0
    assert (again / "samples" / "00000.png").read_bytes() == written[1].read_bytes()
    main(["variations", *args(unclip, "h", "--image", str(b), "--image", str(a), "--from-image", str(written[1]),
                              "--outdir", str(tmp_path / "swapped"))])
    assert "the result will differ" in capsys.readouterr().err


def test_a_picture_mixed_with_itself_is_the_picture(unclip, pipe_h):
    a = unclip["root"] / "a.png"
    settings = dict(width=256, height=256, steps=3, seed=3, batch_size=1)
    one = pipe_h.variations(a, **settings)[0]
    two = pipe_h.variations([a, Image.open(a)], weights=[1, 1], **settings)[0]
    assert np.array_equal(px(one.image), px(two.image))


def test_noise_level_decides_how_much_the_picture_matters(unclip, pipe_h):
    """Two different pictures, same seed: at level 0 their variations differ (14 grey levels on average
    when measured), at 500 less, at 999 the embedding is all noise and they nearly coincide (0.0014)."""
    gap = {}
    for level in (0, 500, 999):
        a, b = (pipe_h.variations(unclip["root"] / name, noise_level=level, width=256, height=256, steps=3, seed=7,
                                  batch_size=1)[0] for name in ("a.png", "b.png"))
        gap[level] = np.abs(px(a.image) - px(b.image)).mean()
    assert gap[0] > 5 and gap[999] < 0.01 * gap[0] and gap[999] < gap[500] < gap[0]


def test_unclip_l_statistics(unclip, tmp_path, capsys):
    a = str(unclip["root"] / "a.png")
    code = main(["variations", *args(unclip, "l", "--image", a, "--n_samples", "1", "--n_iter", "1", "--outdir",
                                     str(tmp_path / "l0"))])
    err = capsys.readouterr().err
    assert code == 0 and "noise level 0 runs with mean 0 / std 1" in err and "0.0064" in err
    code = main(["variations", *args(unclip, "l", "--image", a, "--noise-level", "5", "--outdir", str(tmp_path / "l5"))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "--clip-stats" in err[0] and "ViT-L-14_stats.th" in err[0]
    assert not list((tmp_path / "l5").rglob("*.png"))
    stats = str(unclip["root"] / "stats.th")
    assert main(["variations", *args(unclip, "l", "--image", a, "--noise-level", "5", "--clip-stats", stats,
                                     "--n_samples", "1", "--n_iter", "1", "--outdir", str(tmp_path / "ls"))]) == 0
    assert len(list((tmp_path / "ls" / "samples").glob("*.png"))) == 1
    code = main(["variations", *args(unclip, "h", "--image", a, "--clip-stats", stats, "--outdir", str(tmp_path / "h"))])
    assert code != 0 and "--clip-stats is for unCLIP-L" in capsys.readouterr().err


@pytest.mark.parametrize("case, extra, message", [
    ("txt2img checkpoint", ["--image", "{a}"], "fits tiny-v2-inference.yaml, which builds LatentDiffusion"),
    ("missing image", ["--image", "{root}/nope.png"], "image not found"),
    ("corrupt image", ["--image", "{root}/corrupt.png"], "cannot read"),
    ("weights sum to 0", ["--image", "{a}", "--image", "{b}", "--weight", "1", "--weight", "-1"], "must not sum to 0"),
    ("level above 999", ["--image", "{a}", "--noise-level", "1000"], "0..999"),
    ("level below 0", ["--image", "{a}", "--noise-level", "-1"], "0..999"),
    ("weights per image", ["--image", "{a}", "--weight", "1", "--weight", "2"], "one weight per picture"),
    ("no image", [], "--image"),
])
def test_bad_input_is_one_line_and_writes_nothing(unclip, tmp_path, capsys, case, extra, message):
    names = {"a": unclip["root"] / "a.png", "b": unclip["root"] / "b.png", "root": unclip["root"]}
    kind = "eps" if case == "txt2img checkpoint" else "h"
    out = tmp_path / "out"
    code = main(["variations", *args(unclip, kind, *[e.format(**names) for e in extra]), "--outdir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0], err
    assert "Traceback" not in err[0] and not list(out.rglob("*.png"))


def test_txt2img_with_an_unclip_checkpoint_points_to_variations(unclip, tmp_path, capsys):
    code = main(["txt2img", *args(unclip, "h", "--outdir", str(tmp_path))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "sd variations" in err[0]


def test_img2img_with_an_unclip_checkpoint_conditions_on_the_picture(unclip, pipe_h, tmp_path, capsys):
    """AUTOMATIC1111's unCLIP img2img: the start is the noised input and its embedding (level 0) conditions."""
    a = unclip["root"] / "a.png"
    out = tmp_path / "out"
    code = main(["img2img", *args(unclip, "h", "--init-img", str(a), "--strength", "0.7", "--prompt", "a cat",
                                  "--n_samples", "1", "--n_iter", "1", "--outdir", str(out), sized=False)])
    assert code == 0, capsys.readouterr().err
    written = (out / "samples" / "00000.png")
    _, _, fields = parse_parameters(read_png_text(written)["parameters"])
    assert fields["Mode"] == "img2img" and fields["Noise level"] == "0" and fields["Denoising strength"] == "0.7"
    image = pipe_h.img2img(a, "a cat", strength=0.7, steps=2, seed=42, batch_size=1)[0]
    assert image.parameters == read_png_text(written)['parameters']
    assert image.png() == written.read_bytes()
    # the picture's embedding conditions: another picture's embedding with the same start gives another image
    task_image = pipe_h.img2img(a, "", strength=1.0, steps=2, seed=42, batch_size=1)[0]
    other = pipe_h.img2img(unclip["root"] / "b.png", "", strength=1.0, steps=2, seed=42, batch_size=1)[0]
    assert np.abs(px(task_image.image) - px(other.image)).mean() > 1.0


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "plms"])
def test_every_sampler_runs_and_repeats_exactly(pipe_h, unclip, sampler):
    settings = dict(width=256, height=256, steps=3, seed=11, batch_size=2, sampler=sampler, noise_level=20,
                    negative_prompt="blurry")
    first = pipe_h.variations(unclip["root"] / "a.png", "a house", **settings)
    again = pipe_h.variations(unclip["root"] / "a.png", "a house", **settings)
    assert [im.png() for im in first] == [im.png() for im in again]
    assert first[0].png() != first[1].png()  # image k has its own seed (and embedding noise)


def test_the_a1111_api_serves_unclip_img2img_and_refuses_txt2img_in_a_4xx(unclip, pipe_h):
    import base64
    import io

    import requests

    from ldm.serve.app import Server
    from tests.serving import serving

    with open(unclip["root"] / "a.png", "rb") as f:
        encoded = base64.b64encode(f.read()).decode()
    with serving(Server(pipe_h)) as (url, port):
        answer = requests.post(f"{url}/sdapi/v1/img2img", json={
            "init_images": [encoded], "prompt": "a cat", "denoising_strength": 0.6, "steps": 2, "seed": 4,
            "sampler_name": "DDIM"}, timeout=120)
        assert answer.status_code == 200, answer.text
        png = base64.b64decode(answer.json()["images"][0])
        expected = pipe_h.img2img(unclip["root"] / "a.png", "a cat", strength=0.6, steps=2, seed=4, batch_size=1)[0]
        assert np.array_equal(px(Image.open(io.BytesIO(png)).convert("RGB")), px(expected.image))
        refused = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2}, timeout=120)
        assert refused.status_code == 422 and "sd variations" in refused.text
        assert requests.get(f"{url}/sdapi/v1/progress", timeout=30).status_code == 200  # still serving
