"""What a run is asked and what it records: eta resolved in one place (0 stays 0, the PNG says what ran),
and the notes that say which config and model a command chose."""
import re

import numpy as np
import pytest
from PIL import Image

from ldm.files import metadata
from ldm.cli import main
from ldm.loading.families import resolve_eta
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
    from ldm.loading import detect

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


# -- the A1111 parameters format: written and read in one module (ldm.files.metadata.Infotext) ------------------
def test_every_field_round_trips_and_samplers_read_in_either_spelling():
    from ldm.files.metadata import Infotext
    from ldm.models.diffusion.sampler_names import SAMPLER_INFO, SCHEDULE_INFO

    for sampler in SAMPLER_INFO:
        for schedule in (None, *SCHEDULE_INFO):
            written = Infotext.of_run(
                "a (red:1.2) cube, <lora:x:0.5>\nNegative prompt: not really", 'blurry, "bad"\n2nd line', steps=7,
                sampler=sampler, schedule=schedule, scale=7.5, seed=2 ** 64 - 1, width=768, height=512, eta=0.25,
                **{"Model hash": "0123456789", "Model": "v2-1_768", "Config": "v2-inference-v.yaml", "Mode": "img2img",
                   "Precision": "bf16", "Denoising strength": 0.75, "TI hashes": "emb: 0123456789ab",
                   "Lora hashes": "x: ba9876543210", "Emphasis": "No norm", "Batch size": 4, "Batch pos": 3})
            read = Infotext.read(written.text())
            assert (read.prompt, read.negative_prompt) == (written.prompt, written.negative_prompt)
            assert read.fields == {k: str(v) for k, v in written.fields.items()}
            assert read.sampler() == (sampler, schedule)
            assert (read.number("Steps", int), read.number("CFG scale", float), read.number("Seed", int)) == (
                7, 7.5, 2 ** 64 - 1)
            assert read.size() == (768, 512) and read.number("Eta", float) == 0.25
    assert "Sampler: DPM++ 2M SDE, Schedule type: Karras" in Infotext.of_run(
        "", "", steps=1, sampler="dpmpp_2m_sde", schedule="karras", scale=1, seed=1, width=8, height=8, eta=1).text()
    for text, expected in (("x\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7", ("dpmpp_2m", "karras")),
                           ("x\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras", ("dpmpp_2m", "karras")),
                           ("x\nSteps: 20, Sampler: dpmpp_2m, Schedule type: karras", ("dpmpp_2m", "karras")),
                           ("x\nSteps: 20, Sampler: Euler a, Schedule type: Automatic", ("euler_a", None)),
                           ("x\nSteps: 20, Sampler: DDIM, Schedule type: Normal", ("ddim", "uniform")),
                           ("x\nSteps: 20, Sampler: ddim", ("ddim", None))):
        assert Infotext.read(text).sampler() == expected, text


@pytest.mark.parametrize("text, says", [
    ("x\nSteps: 1e999", "its Steps '1e999' is not readable"), ("x\nCFG scale: nan", "not a finite number"),
    ("x\nSize: 12", "its Size '12' is not WIDTHxHEIGHT"), ("x\nSampler: LMS", "unknown sampler 'LMS'"),
    ("x\nSampler: DDIM, Schedule type: Beta", "unknown schedule type 'Beta'"),
])
def test_unreadable_fields_are_one_line(text, says):
    from ldm.errors import SDError
    from ldm.files.metadata import Infotext

    info = Infotext.read(text)
    with pytest.raises(SDError, match=re.escape(says)):
        info.number("Steps", int), info.number("CFG scale", float), info.size(), info.sampler()
