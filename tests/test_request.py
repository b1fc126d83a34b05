"""What a run is asked and what it records: eta resolved in one place (0 stays 0, the PNG says what ran),
and the notes that say which config and model a command chose."""
import numpy as np
import pytest
from PIL import Image

from ldm import metadata
from ldm.cli import main
from ldm.families import resolve_eta
from ldm.pipeline import Pipeline


@pytest.mark.parametrize("task, sampler, asked, runs", [
    ("txt2img", "ddim", None, 0.0), ("txt2img", "euler_a", None, 1.0), ("txt2img", "dpmpp_2m_sde", None, 1.0),
    ("txt2img", "euler_a", 0.0, 0.0), ("txt2img", "euler_a", 0.3, 0.3), ("txt2img", "plms", None, 0.0),
    ("inpaint", "ddim", None, 1.0), ("inpaint", "euler_a", 0.0, 0.0), ("inpaint", "heun", None, 0.0),
])
def test_eta_is_resolved_in_one_place(task, sampler, asked, runs):
    assert resolve_eta(task, False, sampler, asked) == runs


def recorded(folder):
    path = next((folder / "samples").glob("*.png"))
    return np.asarray(Image.open(path).convert("RGB")), metadata.parse_parameters(metadata.read_png_text(path)["parameters"])[2]


def test_the_command_runs_the_eta_it_records(tiny_ckpts, tmp_path):
    entry = tiny_ckpts["eps"]
    base = ["txt2img", "--ckpt", str(entry["safetensors"]), "--config", entry["config"], "--steps", "3", "--H", "256",
            "--W", "256", "--precision", "full", "--device", "cpu", "--n_samples", "1", "--n_iter", "1",
            "--prompt", "a cube", "--sampler", "euler_a"]
    runs = {}
    for name, more in (("own", []), ("zero", ["--ddim_eta", "0"]), ("one", ["--ddim_eta", "1"])):
        assert main([*base, *more, "--outdir", str(tmp_path / name)]) == 0
        runs[name] = recorded(tmp_path / name)
    assert runs["own"][1]["Eta"] == "1.0" and runs["one"][1]["Eta"] == "1.0" and runs["zero"][1]["Eta"] == "0.0"
    assert np.array_equal(runs["own"][0], runs["one"][0])  # left out: euler_a's own 1.0, as recorded
    assert not np.array_equal(runs["zero"][0], runs["one"][0])  # an explicit 0 runs at 0
    pipe = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", precision="full", quiet=True)
    zero = pipe.txt2img("a cube", sampler="euler_a", eta=0.0, steps=3, seed=42, width=256, height=256)[0]
    assert np.array_equal(np.asarray(zero.image.convert("RGB")), runs["zero"][0]) and "Eta: 0.0" in zero.parameters


def test_a_detected_config_is_said_once(tiny_ckpts, tmp_path, capsys, monkeypatch):
    from ldm import detect

    monkeypatch.setattr(detect, "reference_config", lambda kind: tiny_ckpts["eps"]["config"])
    args = ["txt2img", "--ckpt", str(tiny_ckpts["eps"]["safetensors"]), "--steps", "2", "--H", "256", "--W", "256",
            "--precision", "full", "--device", "cpu", "--n_samples", "1", "--n_iter", "1", "--prompt", "a cube"]
    assert main([*args, "--outdir", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert err.count("note: config: ") == 1 and "predicting eps" in err, err
    assert main(["txt2img", "--prompt", "a red circle", "--steps", "2", "--n_samples", "1", "--precision", "full",
                 "--device", "cpu", "--outdir", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert err.count("note: no --ckpt given, using the built-in demo model") == 1 and "note: config" not in err
