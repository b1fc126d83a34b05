"""`sd txt2img` end to end on tiny checkpoints: layout, watermark, seeds, metadata, bad inputs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.cli import main

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "3", "--H", "256", "--W", "256", "--precision", "full", "--device", "cpu"]


def run(args, capsys=None):
    code = main(["txt2img", *args])
    err = capsys.readouterr().err if capsys else ""
    return code, err


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def tiny_args(tiny_ckpts, kind="eps", fmt="ckpt"):
    return ["--ckpt", str(tiny_ckpts[kind][fmt]), "--config", str(tiny_ckpts[kind]["config"])]


def test_reference_layout_numbering_watermark_and_metadata(tiny_ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run([*tiny_args(tiny_ckpts), *FAST, "--n_samples", "2", "--n_iter", "1", "--outdir", str(out),
                     "--prompt", "a red cube", "--negative-prompt", "blurry"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out / "samples")) == ["00000.png", "00001.png"]
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0000.png"]
    # A second run continues the numbering and never overwrites.
    first = pixels(out / "samples" / "00000.png")
    code, err = run([*tiny_args(tiny_ckpts, fmt="safetensors"), *FAST, "--n-samples", "1", "--n-iter", "2",
                     "--outdir", str(out), "--seed", "7"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out / "samples")) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    assert np.array_equal(first, pixels(out / "samples" / "00000.png"))
    assert not list(out.rglob("*.tmp*"))

    from ldm.files.imageio import read_watermark
    from ldm.files.metadata import parse_parameters
    img = Image.open(out / "samples" / "00001.png")
    assert read_watermark(img) == b"SDV2"
    prompt, negative, fields = parse_parameters(img.text["parameters"])
    assert (prompt, negative) == ("a red cube", "blurry")
    assert fields["Seed"] == "43" and fields["Steps"] == "3" and fields["Size"] == "256x256"
    # The grid of the 2-sample run: 2 images in one row with 2-pixel padding.
    assert Image.open(out / "grid-0000.png").size == (2 * 256 + 3 * 2, 256 + 2 * 2)


def test_same_seed_same_image_at_batch_size_1_and_3(tiny_ckpts, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run([*tiny_args(tiny_ckpts, "v"), *FAST, "--n_samples", "3", "--n_iter", "1", "--outdir", str(a)], capsys)[0] == 0
    assert run([*tiny_args(tiny_ckpts, "v"), *FAST, "--n_samples", "1", "--n_iter", "3", "--outdir", str(b)], capsys)[0] == 0
    for name in ("00000.png", "00001.png", "00002.png"):
        diff = np.abs(pixels(a / "samples" / name) - pixels(b / "samples" / name))
        # Batched and single convolutions round the last float bit apart (~3e-5 measured); that flips
        # the uint8 truncation of a few pixels by one level, which the watermark's DWT spreads a little.
        assert (diff > 0).mean() < 0.005 and diff.max() <= 4, (name, (diff > 0).mean(), diff.max())
    # Different k gives a different image.
    assert np.abs(pixels(a / "samples" / "00000.png") - pixels(a / "samples" / "00001.png")).mean() > 5


def test_prompt_file_batching_and_fixed_code(tiny_ckpts, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n# a comment\na dog\na bird\n")
    out = tmp_path / "o"
    code, err = run([*tiny_args(tiny_ckpts), *FAST, "--from-file", str(prompts), "--repeat", "2", "--n_samples", "4",
                     "--n_iter", "1", "--outdir", str(out), "--fixed_code"], capsys)
    assert code == 0, err
    from ldm.files.metadata import parse_parameters
    got = [parse_parameters(Image.open(p).text["parameters"])[0] for p in sorted((out / "samples").glob("*.png"))]
    assert got == ["a cat", "a cat", "a dog", "a dog", "a bird", "a bird"]
    # --fixed_code: the two "a cat" images share the noise, so they are the same image.
    assert np.array_equal(pixels(out / "samples" / "00000.png"), pixels(out / "samples" / "00001.png"))


@pytest.mark.parametrize("case", ["missing", "truncated", "evil", "wrong-config", "size", "empty-file", "outdir",
                                  "steps", "sampler-clash"])
def test_bad_input_gives_one_line_and_writes_nothing(case, tiny_ckpts, tmp_path, capsys):
    args = [*tiny_args(tiny_ckpts), *FAST, "--n_samples", "1", "--n_iter", "1"]
    out = tmp_path / "out"
    if case == "missing":
        args += ["--ckpt", str(tmp_path / "nope.ckpt")]
    elif case == "truncated":
        cut = tmp_path / "cut.safetensors"
        data = Path(tiny_ckpts["eps"]["safetensors"]).read_bytes()
        cut.write_bytes(data[: len(data) // 3])
        args += ["--ckpt", str(cut)]
    elif case == "evil":
        import torch
        evil = tmp_path / "evil.ckpt"

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path}/pwned",))
        torch.save({"state_dict": {}, "x": Evil()}, evil)
        args += ["--ckpt", str(evil)]
    elif case == "wrong-config":
        args += ["--config", str(ROOT / "tests/configs/tiny-v2-inpainting.yaml")]
    elif case == "size":
        args += ["--H", "260"]
    elif case == "empty-file":
        empty = tmp_path / "empty.txt"
        empty.write_text("\n# nothing\n")
        args += ["--from-file", str(empty)]
    elif case == "outdir":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "sub"
    elif case == "steps":
        args += ["--steps", "0"]
    elif case == "sampler-clash":
        args += ["--plms", "--dpm"]
    code, err = run([*args, "--outdir", str(out)], capsys)
    assert code != 0
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not (out / "samples").exists() or not list((out / "samples").iterdir())
    assert not (tmp_path / "pwned").exists()


def test_console_script_and_reference_script_run(tiny_ckpts, tmp_path):
    sd = shutil.which("sd", path=str(Path(sys.executable).parent))
    assert sd, "the sd console script is installed next to the interpreter"
    for cmd, out in (([sd, "txt2img"], tmp_path / "a"), ([sys.executable, str(ROOT / "scripts/txt2img.py")], tmp_path / "b")):
        proc = subprocess.run([*cmd, *tiny_args(tiny_ckpts), *FAST, "--n_samples", "1", "--n_iter", "1",
                               "--outdir", str(out)], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert (out / "samples" / "00000.png").is_file()
    a, b = pixels(tmp_path / "a/samples/00000.png"), pixels(tmp_path / "b/samples/00000.png")
    assert np.array_equal(a, b)
    proc = subprocess.run([sd, "txt2img", "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--bogus" in proc.stderr


def test_sampler_flags_reach_the_sampler(tiny_ckpts, tmp_path, capsys):
    """--plms / --dpm / --sampler each run, and differ from DDIM on the same seed."""
    results = {}
    for expected, flag in (("plms", ["--plms"]), ("dpm", ["--dpm"]),
                           ("dpmpp_2m", ["--sampler", "dpmpp_2m", "--schedule", "karras"]), ("ddim", [])):
        out = tmp_path / expected
        code, err = run([*tiny_args(tiny_ckpts, "v"), *FAST, "--n_samples", "1", "--n_iter", "1", "--outdir", str(out),
                         *flag], capsys)
        assert code == 0, err
        results[out.name] = pixels(out / "samples" / "00000.png")
        from ldm.files.metadata import Infotext
        from ldm.models.diffusion.sampler_names import sampler_label

        info = Infotext.read(Image.open(out / "samples" / "00000.png").text["parameters"])
        assert info.fields["Sampler"] == sampler_label(expected)  # A1111's name: "DPM++ 2M"
        assert info.sampler() == (expected, "karras" if expected == "dpmpp_2m" else None)
    ddim = results.pop("ddim")
    for name, img in results.items():
        assert np.abs(img - ddim).mean() > 1.0, name


def test_samplers_command_lists_every_sampler(capsys):
    from ldm.models.diffusion.samplers import SAMPLERS
    assert main(["samplers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines[1:len(SAMPLERS) + 1]]
    assert listed == list(SAMPLERS)
    assert {"ddim", "plms", "dpm", "euler", "euler_a", "heun", "dpm2", "dpmpp_2m", "dpmpp_2m_sde"} <= set(listed)


def test_ipex_without_ipex_says_how_to_get_it(tiny_ckpts, tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import intel_extension_for_pytorch  # noqa: F401
        pytest.skip("IPEX is installed in this environment")
    except ImportError:
        pass
    code, err = run([*tiny_args(tiny_ckpts), *FAST, "--ipex", "--outdir", str(tmp_path)], capsys)
    assert code == 1 and "make install-ipex" in err and err.count("\n") == 1


def test_bf16_and_torchscript_paths_match_fp32(tiny_ckpts, tmp_path, capsys):
    """--bf16 (the reference's flag) and --torchscript run and stay close to the fp32 image."""
    base = [*tiny_args(tiny_ckpts, "v"), "--steps", "3", "--H", "256", "--W", "256", "--device", "cpu",
            "--n_samples", "1", "--n_iter", "1"]
    images = {}
    for name, flags in (("full", ["--precision", "full"]), ("bf16", ["--bf16"]),
                        ("ts", ["--precision", "full", "--torchscript"])):
        code, err = run([*base, *flags, "--outdir", str(tmp_path / name)], capsys)
        assert code == 0, err
        images[name] = pixels(tmp_path / name / "samples" / "00000.png").astype(np.float64)

    def psnr(a, b):
        return 10 * np.log10(255.0 ** 2 / max(np.mean((a - b) ** 2), 1e-12))

    assert psnr(images["ts"], images["full"]) > 45
    assert psnr(images["bf16"], images["full"]) > 20
    code, err = run([*base, "--bf16", "--precision", "full", "--outdir", str(tmp_path / "x")], capsys)
    assert code == 1 and "disagree" in err


def test_ctrl_c_exits_130_with_one_line(tiny_ckpts, tmp_path, capsys, monkeypatch):
    from ldm.batch import run as batch_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch_run, "run_job", interrupted)
    code, err = run([*tiny_args(tiny_ckpts), *FAST, "--outdir", str(tmp_path)], capsys)
    assert code == 130
    assert err.strip().startswith("interrupted:") and err.strip().count("\n") == 0
