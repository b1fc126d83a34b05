"""What a run is asked and what it records: eta resolved in one place (0 stays 0, the PNG says what ran),
and the notes that say which config and model a command chose."""
import base64
import re
from pathlib import Path

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


# -------------------------------------------------------------------------------- one request, many front ends
def test_a_request_resolves_its_defaults_in_one_function():
    from ldm.request import PromptLine, Request, SamplingSettings

    plain = Request("a cube").resolved(demo=False, native_size=768, channels=4, factor=8)
    assert (plain.sampling.steps, plain.sampling.scale, plain.sampling.eta) == (50, 9.0, 0.0)
    assert (plain.batch_size, plain.n_iter, plain.width, plain.height, plain.C, plain.f) == (3, 3, 768, 768, 4, 8)
    assert 0 <= plain.seed < 2 ** 32
    demo = Request("a cube", seed=-1, sampling=SamplingSettings(sampler="euler_a")).resolved(demo=True)
    assert (demo.sampling.steps, demo.sampling.scale, demo.sampling.eta, demo.batch_size) == (20, 5.0, 1.0, 4)
    assert demo.seed != -1 and demo.width is None  # the size waits for the model
    # a prompt line naming its own sampler gets that sampler's eta; given ones stay (0 included)
    lines = (PromptLine("x", sampler="euler_a"), PromptLine("y", sampler="euler_a", eta=0.0), PromptLine("z"))
    resolved = Request("", lines=lines, sampling=SamplingSettings(sampler="ddim")).resolved(demo=False)
    assert [line.eta for line in resolved.lines] == [1.0, 0.0, None] and resolved.sampling.eta == 0.0
    assert resolved.resolved(demo=False) == resolved  # resolving twice changes nothing


def test_a_request_names_its_fields_as_each_front_end_does():
    from ldm.cli.options import FLAG_NAMES
    from ldm.errors import SDError
    from ldm.request import Request, SamplingSettings
    from ldm.serve.a1111 import API_NAMES
    from ldm.serve.page import PAGE_NAMES

    def says(names, **fields):
        request = Request("a cube", seed=1, **fields).resolved(demo=False)
        with pytest.raises(SDError) as caught:
            request.check(names)
        return str(caught.value)

    steps = {"sampling": SamplingSettings(steps=5000)}
    assert says({}, **steps) == "steps must be from 1 to 1000 (max_steps; got 5000)"
    assert says(FLAG_NAMES, **steps) == "--steps must be from 1 to 1000 (--max-steps; got 5000)"
    assert says(API_NAMES, **steps) == "steps must be from 1 to 1000 (the server's max_steps; got 5000)"
    assert says(PAGE_NAMES, **steps) == "Steps must be from 1 to 1000 (the server's max_steps; got 5000)"
    scale = {"sampling": SamplingSettings(scale=float("inf"))}
    assert says(API_NAMES, **scale).startswith("cfg_scale must be a finite number")
    assert says(FLAG_NAMES, **scale).startswith("--scale must be a finite number")
    assert says(FLAG_NAMES, batch_size=100) == "--n_samples 100 is above --max-batch 64"
    assert says(API_NAMES, batch_size=100) == "batch_size 100 is above the server's max_batch 64"
    assert says(FLAG_NAMES, width=100) == "--W 100 is not a positive multiple of 8"
    assert says(API_NAMES, height=4104) == "height 4104 is above the server's max_side 4096"


def test_the_api_answers_in_its_own_field_names(tiny_ckpts):
    from fastapi.testclient import TestClient

    from ldm.limits import Limits
    from ldm.serve.app import Server, build_app

    entry = tiny_ckpts["eps"]
    pipe = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", precision="full", quiet=True)
    client = TestClient(build_app(Server(pipe, limits=Limits(max_steps=60)), page=False))
    cases = [({"steps": 61}, "steps must be from 1 to 60 (the server's max_steps; got 61)"),
             ({"cfg_scale": 1e9}, "cfg_scale must be at most 1000 in size"),
             ({"width": 100, "height": 256, "steps": 2}, "width 96 is below 256"),
             ({"sampler_name": "Euler", "eta": 0.5, "steps": 2}, None)]
    for body, says in cases:
        reply = client.post("/sdapi/v1/txt2img", json={"prompt": "a cube", "seed": 1, **body})
        if says is None:
            assert reply.status_code == 200, reply.text  # A1111 ignores eta for samplers that take none
            continue
        assert reply.status_code == 422 and says in reply.json()["detail"] and "--" not in reply.json()["detail"], reply.text
    photo = base64.b64encode((Path(__file__).resolve().parents[1] / "docs/images/quickstart.png").read_bytes()).decode()
    reply = client.post("/sdapi/v1/img2img", json={"prompt": "a", "denoising_strength": 1.5, "init_images": [photo]})
    assert reply.status_code == 422 and reply.json()["detail"].startswith("denoising_strength must be between 0 and 1")


def test_seed_minus_one_is_a_random_seed_recorded_in_the_png(tiny_ckpts, tmp_path):
    entry = tiny_ckpts["eps"]
    args = ["txt2img", "--ckpt", str(entry["safetensors"]), "--config", entry["config"], "--steps", "2", "--H", "256",
            "--W", "256", "--precision", "full", "--device", "cpu", "--n_samples", "2", "--n_iter", "1",
            "--prompt", "a cube", "--seed", "-1"]
    seeds = []
    for run in ("a", "b"):
        assert main([*args, "--outdir", str(tmp_path / run)]) == 0
        paths = sorted((tmp_path / run / "samples").glob("*.png"))
        seeds.append([int(metadata.parse_parameters(metadata.read_png_text(p)["parameters"])[2]["Seed"]) for p in paths])
    assert all(0 <= s < 2 ** 32 + 1 for run in seeds for s in run)
    assert seeds[0][1] == seeds[0][0] + 1 and seeds[0] != seeds[1]  # seed + k from one random seed per run
