"""Batch jobs: prompt files (plain, JSON Lines), the plan, metadata round trips, --from-image, resume
after an interrupt, and a two-process Lightning DDP run, all on the tiny checkpoints."""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.cli import main
from ldm.errors import SDError

FAST = ["--steps", "2", "--H", "256", "--W", "256", "--precision", "full", "--device", "cpu"]


def model_args(tiny_ckpts):
    return ["--ckpt", str(tiny_ckpts["eps"]["safetensors"]), "--config", str(tiny_ckpts["eps"]["config"])]


def txt2img(args, capsys):
    code = main(["txt2img", *args])
    return code, capsys.readouterr()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def raw_png_text(path: Path) -> dict[str, str]:
    """The PNG's tEXt/zTXt/iTXt chunks, read straight from the bytes (an independent reader)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = {}, 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"tEXt":
            key, value = body.split(b"\0", 1)
            out[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"zTXt":
            key, rest = body.split(b"\0", 1)
            out[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
        elif kind == b"iTXt":
            key, rest = body.split(b"\0", 1)
            compressed, rest = rest[0], rest[2:]
            _lang, _translated, text = rest.split(b"\0", 2)
            out[key.decode("latin-1")] = (zlib.decompress(text) if compressed else text).decode("utf-8")
        pos += 12 + length
    return out


# ------------------------------------------------------------------------------------ prompt files
def test_plain_and_json_lines_prompt_files(tmp_path):
    from ldm.batch.prompts import PromptLine, read_prompt_lines

    plain = write(tmp_path / "p.txt", "  a cat  \n\n# comment\n{not json} is a prompt here\n")
    assert [(l.prompt, l.where) for l in read_prompt_lines(plain)] == [
        ("a cat", f"{plain}:1"), ("{not json} is a prompt here", f"{plain}:4")]
    jl = write(tmp_path / "p.jsonl", '# header\n{"prompt": "a dog", "seed": 7, "size": "320x256"}\n\n'
               '{"prompt": "a bird", "negative_prompt": "blur, text", "steps": 4, "scale": 5, "size": [256, 384], '
               '"sampler": "euler_a", "schedule": "karras", "eta": 0.5}\n')
    assert read_prompt_lines(jl) == [
        PromptLine("a dog", seed=7, size=(320, 256), where=f"{jl}:2"),
        PromptLine("a bird", "blur, text", None, 4, 5.0, (256, 384), "euler_a", "karras", 0.5, where=f"{jl}:4")]


@pytest.mark.parametrize("case,content,message", [
    ("missing", None, "prompt file not found"),
    ("empty", "\n# only a comment\n\n", "has no prompts"),
    ("bad-json", '{"prompt": "a"}\n\n{"prompt": "b",}\n', "p.jsonl:3: not valid JSON"),
    ("unknown", '{"prompt": "a", "stepz": 3}\n', 'p.jsonl:1: unknown field "stepz"'),
    ("size", '{"prompt": "a"}\n{"prompt": "b", "size": "260x256"}\n', "p.jsonl:2: width 260 is not a positive multiple of 8"),
    ("type", '{"prompt": "a", "seed": "42"}\n', 'p.jsonl:1: "seed" must be a whole number'),
    ("no-prompt", '{"seed": 1}\n', 'p.jsonl:1: no "prompt" field'),
    ("sampler", '{"prompt": "a", "sampler": "nope"}\n', "p.jsonl:1: "),
    ("devices", "", "--devices must be at least 1"),
])
def test_bad_prompt_files_fail_up_front_in_one_line(case, content, message, tmp_path, capsys):
    """The checkpoint does not exist: an error about the prompt file proves nothing was loaded first."""
    prompts = tmp_path / "p.jsonl"
    args = ["--ckpt", str(tmp_path / "absent.ckpt"), *FAST, "--outdir", str(tmp_path / "out")]
    if case == "devices":
        args += ["--devices", "0"]
    else:
        if content is not None:
            write(prompts, content)
        args += ["--from-file", str(prompts)]
    code, out = txt2img(args, capsys)
    lines = [l for l in out.err.splitlines() if l.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.err
    assert "checkpoint" not in lines[0] and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- plan
def job(tmp_path, **kw):
    """A BatchJob as `sd txt2img` builds it (its request resolved for an SD checkpoint)."""
    from ldm.batch.job import BatchJob
    from ldm.request import Request, SamplingSettings
    from ldm.runtime.policy import RuntimeOptions

    fields = {"prompt": "p", "batch_size": 2, "n_iter": 1, "seed": 10, "width": 256, "height": 256, "C": 4, "f": 8,
              "sampling": SamplingSettings(steps=3)}
    fields.update({k: kw.pop(k) for k in list(kw) if k in fields or k == "fixed_seed"})
    base = dict(ckpt=None, config=Path("c.yaml"), outdir=tmp_path, runtime=RuntimeOptions("cpu", "full"))
    return BatchJob(Request(**fields).resolved(demo=False), **{**base, **kw}).with_prompt_file()


def test_plan_seeds_batches_and_line_settings(tmp_path):
    from ldm.plan import make_plan

    jl = write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "seed": 100}\n'
               '{"prompt": "c", "steps": 5, "size": "256x320"}\n{"prompt": "d", "negative_prompt": "x"}\n')
    plan = make_plan(job(tmp_path, from_file=jl, repeat=2, batch_size=3, n_iter=2).request)
    got = [[(it.index, it.prompt, it.seed, it.sampling.steps, it.size) for it in b.items] for b in plan]
    # Per iteration: a a b | b (cut: c has other settings) ... c c | d d; the whole set twice.
    first = [[(0, "a", 10, 3, (256, 256)), (1, "a", 11, 3, (256, 256)), (2, "b", 100, 3, (256, 256))],
             [(3, "b", 101, 3, (256, 256))],
             [(4, "c", 14, 5, (256, 320)), (5, "c", 15, 5, (256, 320))],
             [(6, "d", 16, 3, (256, 256)), (7, "d", 17, 3, (256, 256))]]
    assert got[:4] == first
    assert [[(k + 8, p, s + (2 if p == "b" else 8), st, sz) for k, p, s, st, sz in b] for b in first] == got[4:]
    assert [b.index for b in plan] == list(range(8)) and plan[1].items[0].negative_prompt == ""
    assert plan[3].items[0].negative_prompt == "x" and plan[2].sampling.steps == 5 and plan[2].size == (256, 320)
    # --fixed_code: every image of a line uses its seed without offsets.
    fixed = make_plan(job(tmp_path, from_file=jl, batch_size=4, fixed_seed=True).request)
    assert [it.seed for b in fixed for it in b.items] == [10, 100, 10, 10]
    # Without a file: n_samples copies of the prompt per batch, seed + k across n_iter.
    plain = make_plan(job(tmp_path, batch_size=3, n_iter=2).request)
    assert [[it.seed for it in b.items] for b in plain] == [[10, 11, 12], [13, 14, 15]]


def test_prompt_encoder_encodes_each_distinct_prompt_once():
    from ldm.text.encoder import PromptEncoder

    calls = []

    class Model:
        def get_learned_conditioning(self, prompts):
            calls.append(list(prompts))
            return torch.stack([torch.full((2,), float(len(p))) for p in prompts])

    encoder = PromptEncoder(Model(), capacity=2, emphasis="off")  # "off": the model's plain text path only
    out = encoder(["aa", "b", "aa", "b"])
    assert calls == [["aa", "b"]] and out[:, 0].tolist() == [2.0, 1.0, 2.0, 1.0]
    encoder(["b", "ccc"])  # "aa" is now the least recently used and leaves the cache
    assert calls[-1] == ["ccc"] and [text for _, text in encoder.cache] == ["b", "ccc"]
    encoder(["aa"])
    assert calls[-1] == ["aa"]


# ----------------------------------------------------------------- metadata, info and --from-image
def test_metadata_info_and_from_image_reproduce_exactly(tiny_ckpts, tmp_path, capsys):
    from ldm.files import metadata

    prompts = write(tmp_path / "p.jsonl", '{"prompt": "a red cube", "negative_prompt": "blurry, text: none", "seed": 3}\n'
                    '{"prompt": "a blue \\"ball\\", at night", "scale": 7.5, "negative_prompt": "dark"}\n')
    out = tmp_path / "o"
    code, res = txt2img([*model_args(tiny_ckpts), *FAST, "--from-file", str(prompts), "--n_samples", "2", "--n_iter", "1",
                         "--outdir", str(out), "--seed", "20"], capsys)
    assert code == 0, res.err
    # The two prompts have different scales, so they are two batches of one image each.
    image = out / "samples" / "00001.png"
    text = Image.open(image).text["parameters"]
    assert Image.open(image).info["parameters"] == text == raw_png_text(image)["parameters"]
    expected = {"Steps": "2", "Sampler": "DDIM", "CFG scale": "7.5", "Seed": "21", "Size": "256x256",
                "Model hash": metadata.model_hash(tiny_ckpts["eps"]["safetensors"]), "Model": "tiny-eps", "Eta": "0.0",
                "Config": "tiny-v2-inference.yaml", "Mode": "txt2img", "Precision": "full"}
    assert main(["info", "--json", str(image)]) == 0
    assert json.loads(capsys.readouterr().out) == {"prompt": 'a blue "ball", at night', "negative_prompt": "dark",
                                                   "settings": expected}
    assert main(["info", str(image)]) == 0
    assert capsys.readouterr().out == text + "\n"

    # --from-image gives the same file, byte for byte (pixels and metadata).
    again = tmp_path / "again"
    code, res = txt2img([*model_args(tiny_ckpts), "--device", "cpu", "--from-image", str(image), "--outdir", str(again)], capsys)
    assert code == 0, res.err
    assert (again / "samples" / "00000.png").read_bytes() == image.read_bytes()
    assert main(["info", str(tmp_path / "p.jsonl")]) == 1 and "cannot read" in capsys.readouterr().err


def test_from_image_rebuilds_the_batch_the_image_was_made_in(tiny_ckpts, tmp_path, capsys):
    """An image made at position 1 of a batch of 3 is recomputed there: the same bytes, not just close."""
    out = tmp_path / "o"
    code, res = txt2img([*model_args(tiny_ckpts), *FAST, "--n_samples", "3", "--n_iter", "1", "--outdir", str(out),
                         "--prompt", "a cube", "--negative-prompt", "fog"], capsys)
    assert code == 0, res.err
    image = out / "samples" / "00001.png"
    fields = dict(part.split(": ") for part in Image.open(image).text["parameters"].splitlines()[-1].split(", "))
    assert (fields["Batch size"], fields["Batch pos"], fields["Seed"]) == ("3", "1", "43")
    again = tmp_path / "again"
    code, res = txt2img([*model_args(tiny_ckpts), "--device", "cpu", "--from-image", str(image), "--outdir", str(again)], capsys)
    assert code == 0, res.err
    assert [p.name for p in (again / "samples").iterdir()] == ["00000.png"]
    assert (again / "samples" / "00000.png").read_bytes() == image.read_bytes()


# ------------------------------------------------------------------------------ resume and manifest
def test_interrupted_run_resumes_to_the_same_bytes(tiny_ckpts, tmp_path, capsys, monkeypatch):
    from ldm import pipeline
    from ldm.batch.run import run_job
    from ldm.request import SamplingSettings

    args = [*model_args(tiny_ckpts), *FAST, "--n_samples", "2", "--n_iter", "2", "--prompt", "a cube"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    code, res = txt2img([*args, "--outdir", str(whole), "--skip-existing"], capsys)
    assert code == 0, res.err
    assert sorted(os.listdir(whole / "samples")) == ["00000.png", "00001.png", "00002.png", "00003.png"]

    # A plain run (reference names) stopped by Ctrl-C while its second batch is in flight.
    real_sample, calls = pipeline.Session.sample, []

    def interrupting_sample(self, batch, on_step=None):
        calls.append(batch.index)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_sample(self, batch, on_step)

    monkeypatch.setattr(pipeline.Session, "sample", interrupting_sample)
    # The same job as the command line builds (run_job is what `sd txt2img` calls).
    same = job(tmp_path, prompt="a cube", n_iter=2, seed=42, outdir=cut, ckpt=Path(tiny_ckpts["eps"]["safetensors"]),
               config=Path(tiny_ckpts["eps"]["config"]), sampling=SamplingSettings(steps=2))
    with pytest.raises(KeyboardInterrupt):
        run_job(same)
    err = capsys.readouterr().err
    assert "--skip-existing" in err and "2 of 4 images are saved" in err and "in flight was discarded" in err
    assert sorted(os.listdir(cut / "samples")) == ["00000.png", "00001.png"]
    monkeypatch.setattr(pipeline.Session, "sample", real_sample)
    (cut / "samples" / ".00003.deadbeef.tmp").write_bytes(b"half a png")  # left by a killed process

    code, res = txt2img([*args, "--outdir", str(cut), "--skip-existing"], capsys)
    assert code == 0, res.err
    assert files(cut / "samples") == files(whole / "samples")
    records = [json.loads(l) for l in (cut / "manifest-00000.jsonl").read_text().splitlines()]
    assert records[0]["base"] == 0 and records[0]["images"] == 4 and records[0]["names"] == "sequential"
    assert [(r["item"], r["file"], r["seed"]) for r in records if "item" in r] == [
        (k, f"samples/{k:05d}.png", 42 + k) for k in range(4)]
    assert [r["existing"] for r in records if r.get("event") == "end"] == [2]

    # Run again: nothing to do, nothing rewritten; a new plan starts after the reserved numbers.
    before = {p: p.stat().st_mtime_ns for p in (cut / "samples").iterdir()}
    code, res = txt2img([*args, "--outdir", str(cut), "--skip-existing"], capsys)
    assert code == 0 and {p: p.stat().st_mtime_ns for p in (cut / "samples").iterdir()} == before
    code, res = txt2img([*args, "--outdir", str(cut), "--skip-existing", "--seed", "1", "--n_iter", "1"], capsys)
    assert code == 0 and sorted(os.listdir(cut / "samples"))[-2:] == ["00004.png", "00005.png"]
    assert (cut / "manifest-00004.jsonl").is_file()

    # A file under one of the run's names that is another image is never taken for done, nor overwritten.
    shutil.copy(cut / "samples" / "00000.png", whole / "samples" / "00002.png")
    code, res = txt2img([*args, "--outdir", str(whole), "--skip-existing"], capsys)
    assert code == 1 and "00002.png exists but is not image 2 of this run" in res.err


# ------------------------------------------------------------------------------------ scale-out
def test_two_process_ddp_run_writes_the_files_of_a_one_process_run(tiny_ckpts, tmp_path, capsys, monkeypatch):
    """`--devices 2 --accelerator cpu` through the `sd` console script (Lightning relaunches it); the
    processes meet on 127.0.0.1 (raised in a fresh network namespace, else skipped: tests.serving)."""
    from tests.serving import ensure_loopback

    ensure_loopback()
    prompts = write(tmp_path / "p.jsonl", '{"prompt": "a cube"}\n{"prompt": "a ball", "seed": 9}\n{"prompt": "a cone"}\n')
    args = [*model_args(tiny_ckpts), *FAST, "--from-file", str(prompts), "--n_samples", "2", "--n_iter", "1"]
    # CPU float results depend on the intra-op thread count: both runs use one thread per process.
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        code, res = txt2img([*args, "--outdir", str(one), "--skip-existing"], capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, res.err

    run_sd_ddp([*args, "--outdir", str(two), "--devices", "2", "--accelerator", "cpu"], tmp_path)
    assert sorted(os.listdir(two / "samples")) == ["00000.png", "00001.png", "00002.png"]
    assert files(two / "samples") == files(one / "samples")
    records = [json.loads(l) for l in (two / "manifest-00000.jsonl").read_text().splitlines()]
    # Batch 0 (two images) went to rank 0, batch 1 to rank 1; the grid was made after both finished.
    assert [(r["item"], r["batch"], r["rank"]) for r in records if "item" in r] == [(0, 0, 0), (1, 0, 0), (2, 1, 1)]
    assert records[-1]["processes"] == 2 and records[-1]["grid"] == "grid-0000.png"
    assert not list(two.glob(".manifest-*")) and (two / "grid-0000.png").is_file()

    # As if killed half-way: one image of batch 0 and all of batch 1 gone, a temp file left behind.
    for name in ("00001.png", "00002.png"):
        (two / "samples" / name).unlink()
    (two / "samples" / ".00002.0badf00d.tmp").write_bytes(b"partial")
    run_sd_ddp([*args, "--outdir", str(two), "--devices", "2", "--accelerator", "cpu", "--skip-existing"], tmp_path)
    assert files(two / "samples") == files(one / "samples")
    records = [json.loads(l) for l in (two / "manifest-00000.jsonl").read_text().splitlines()]
    assert [r["item"] for r in records if "item" in r][3:] == [1, 2] and records[-1]["existing"] == 1


def run_sd_ddp(args, cwd):
    """`sd txt2img ARGS` in its own session, so that on a timeout the whole group (Lightning's second
    process too) is killed rather than left waiting at a barrier."""
    sd = shutil.which("sd", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sd, "txt2img", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr


def test_scale_out_refuses_launches_that_would_repeat_or_misfire(tiny_ckpts, tmp_path, capsys, monkeypatch):
    # Inside pytest, Lightning's launcher would re-run pytest's command line for the second process.
    code, out = txt2img([*model_args(tiny_ckpts), *FAST, "--devices", "2", "--outdir", str(tmp_path / "a")], capsys)
    assert code == 1 and "run sd from a shell, or start the processes with torchrun" in out.err
    # Started by torchrun as one of 4 processes but without --devices: each would make the whole run.
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, out = txt2img([*model_args(tiny_ckpts), *FAST, "--outdir", str(tmp_path / "b")], capsys)
    assert code == 1 and "one of 4 processes" in out.err and "--devices" in out.err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
