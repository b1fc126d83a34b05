"""Hostile input, as an attacker or an unlucky user sends it: every case ends with exit code != 0, exactly
one line on stderr, no traceback, and nothing half-written; what is about time or memory is bounded.

Classes (issue "Hostile inputs, full disks and plain CPUs"): 1 manifests, 2 validation before the load,
3 image sizes, 4 untrusted files, 5 exact reproduction, 6 signals. The tiny checkpoints of conftest keep
each case to a fraction of a second; the few that must run a real process are marked so.
"""
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldm.files import imageio, metadata
from ldm.cli import main
from ldm.errors import SDError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--H", "256", "--W", "256", "--precision", "full", "--device", "cpu", "--n_samples", "1",
        "--n_iter", "1"]


def model_args(tiny_ckpts):
    return ["--ckpt", str(tiny_ckpts["eps"]["safetensors"]), "--config", str(tiny_ckpts["eps"]["config"])]


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model gets loaded: these inputs must be refused before."""
    import ldm.loading.build

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(ldm.loading.build, "load_model", refuse)


def refused(command, args, capsys, outdir: Path) -> str:
    """Run `sd COMMAND ARGS`; assert one error line, no traceback, nothing written; return the line."""
    code = main([command, *args, "--outdir", str(outdir)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    written = [p for p in outdir.rglob("*") if p.is_file()] if outdir.exists() else []
    assert written == [], written
    return lines[0]


# -- 2. everything validated before the model loads, and bounded ---------------------------------------

@pytest.mark.parametrize("extra, says", [
    (["--scale", "nan"], "--scale must be a finite number"),
    (["--scale", "inf"], "--scale must be a finite number"),
    (["--scale", "-inf"], "--scale must be a finite number"),
    (["--ddim_eta", "nan"], "--ddim_eta must be a finite number"),
    (["--H", "0", "--W", "0"], "--H 0 is not a positive multiple of 8"),
    (["--H", "99992"], "--H 99992 is above --max-side 4096"),
    (["--steps", "1000"], "1 to 999 steps"),
    (["--steps", "5000"], "--steps must be from 1 to 1000"),
    (["--steps", "-3"], "--steps must be from 1 to 1000"),
    (["--sampler", "euler", "--steps", "1001"], "(--max-steps; got 1001)"),
    (["--seed", str(2**64)], "seeds must be whole numbers from 0 to 2**64 - 1"),
    (["--seed", "-2"], "seeds must be whole numbers"),
    (["--seed", str(2**64 - 1), "--n_samples", "2"], "past 2**64 - 1"),
    (["--n_samples", "1000"], "above --max-batch 64"),
    (["--n_iter", "1000000"], "above --max-images 100000"),
    (["--max-batch", "0"], "--max-batch must be a whole number of at least 1"),
    (["--sampler", "foo"], "unknown sampler 'foo'"),  # the name is checked before the schedule is built
    (["--f", "0"], "--f must be at least 1"),
    (["--C", "-1"], "--C must be at least 1"),
    (["--threads", "100000"], "--threads must be from 1 to 1024"),
])
def test_bad_numbers_are_refused_before_the_load(extra, says, tiny_ckpts, tmp_path, capsys, no_load):
    line = refused("txt2img", [*model_args(tiny_ckpts), *FAST, *extra], capsys, tmp_path / "out")
    assert says in line


@pytest.mark.parametrize("prompt, says", [
    ("caf\udce9", "--prompt is not valid UTF-8 text (byte 0xe9"),  # how a Latin-1 byte arrives in argv
    ("a\x00b", "NUL"),
])
def test_prompts_that_are_not_text_are_refused(prompt, says, tiny_ckpts, tmp_path, capsys, no_load):
    assert says in refused("txt2img", [*model_args(tiny_ckpts), *FAST, "--prompt", prompt], capsys, tmp_path / "o")


@pytest.mark.parametrize("line, says", [
    ('{"prompt": "a", "seed": %d}' % 2**64, "seeds must be whole numbers"),
    ('{"prompt": "a", "steps": 100000}', "\"steps\" must be from 1 to 1000"),
    ('{"prompt": "a", "scale": NaN}', "\"scale\" must be a finite number"),
    ('{"prompt": "a", "scale": Infinity}', "\"scale\" must be a finite number"),
    ('{"prompt": "a", "size": "99992x99992"}', "above --max-side"),
    ('{"prompt": %s}' % ("[" * 100_000 + "]" * 100_000), "not valid JSON"),
    ('{"prompt": "caf\\udce9"}', "not valid UTF-8"),
])
def test_bad_prompt_file_lines_are_refused(line, says, tiny_ckpts, tmp_path, capsys, no_load):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(line + "\n", encoding="utf-8")
    out = refused("txt2img", [*model_args(tiny_ckpts), *FAST, "--from-file", str(prompts)], capsys, tmp_path / "o")
    assert f"{prompts}:1: " in out and says in out


def png_with_parameters(path: Path, text: str, size=(256, 256)) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text(metadata.PARAMETERS_KEY, text)
    Image.new("RGB", size).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("fields, says", [
    ("Steps: 2, Seed: 1, Size: 256x256, Batch size: 1000000000, Batch pos: 0", "--max-batch"),
    ("Steps: 2, Seed: 1, Size: 99992x99992", "above --max-side"),
    ("Steps: 2, Seed: %d, Size: 256x256" % 2**64, "seeds must be whole numbers"),
    ("Steps: -5, Seed: 1, Size: 256x256", "--steps must be from 1"),
    ("Steps: 2, Seed: 1, Size: 256x256, CFG scale: nan", "its CFG scale 'nan' is not a finite number"),
    ("Steps: 2, Seed: 1, Size: 256", "its Size '256' is not WIDTHxHEIGHT"),
    ("Steps: %s, Seed: 1" % ("9" * 5000), "is not readable"),
])
def test_crafted_metadata_is_bounded(fields, says, tiny_ckpts, tmp_path, capsys, no_load):
    image = png_with_parameters(tmp_path / "in.png", "a prompt\n" + fields)
    out = refused("txt2img", [*model_args(tiny_ckpts), *FAST, "--from-image", str(image)], capsys, tmp_path / "o")
    assert says in out


# -- 1. manifests: never hang, never a torn line -------------------------------------------------------

GARBLED = {
    "empty": b"",
    "garbage": os.urandom(300),
    "not utf-8": b"\xff\xfe{\"sd_manifest\": 1}\n",
    "images lots": b'{"sd_manifest": 1, "run": "x", "base": 0, "images": "lots"}\n',
    "base float": b'{"sd_manifest": 1, "run": "x", "base": 0.5, "images": 3}\n',
    "torn": b'{"sd_manifest": 1, "run": "x", "ba',
    "deep": b"[" * 100_000 + b"\n",
}


@pytest.mark.parametrize("content", GARBLED.values(), ids=GARBLED.keys())
def test_any_manifest_content_is_survived(content, tmp_path):
    from ldm.batch import outputs

    (tmp_path / "samples").mkdir()
    (tmp_path / "manifest-00000.jsonl").write_bytes(content)
    outputs.read_jsonl(tmp_path / "manifest-00000.jsonl")  # no exception, whatever the bytes
    assert outputs.manifests(tmp_path) == []
    path, base = outputs.create_manifest(tmp_path, {"run": "r", "images": 2})  # would spin forever before
    assert base == 1 and path.name == "manifest-00001.jsonl"
    assert outputs.next_base(tmp_path) == 3


def test_a_run_into_a_folder_with_garbled_manifests_finishes(tiny_ckpts, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    for k, content in enumerate(GARBLED.values()):
        (out / f"manifest-{k:05d}.jsonl").write_bytes(content)
    assert main(["txt2img", *model_args(tiny_ckpts), *FAST, "--outdir", str(out), "--skip-existing"]) == 0
    assert [p.name for p in (out / "samples").iterdir()] == [f"{len(GARBLED):05d}.png"]


def test_a_short_write_leaves_no_torn_line(tmp_path, monkeypatch):
    """A full disk that stores half a line: the file is cut back, the error is one line, and the next
    append (after space came back) starts on a whole line."""
    from ldm.batch import outputs

    path = tmp_path / "manifest-00000.jsonl"
    outputs.append_jsonl(path, {"item": 0})
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") == str(path):
            real_write(fd, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(SDError, match="No space left on device"):
        outputs.append_jsonl(path, {"item": 1, "prompt": "x" * 100})
    monkeypatch.setattr(os, "write", real_write)
    assert path.read_bytes() == before
    path.write_bytes(before + b'{"item": 1, "pro')  # what a kill in mid-write of an old version left
    outputs.append_jsonl(path, {"item": 2})
    assert [r["item"] for r in outputs.read_jsonl(path)] == [0, 2]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_full_disk_stops_cleanly_and_resumes_to_the_same_images(tiny_ckpts, tmp_path, capsys):
    """A real full disk (a small tmpfs): the run stops with one line, leaves no temp file and no torn
    manifest line, and --skip-existing after space is freed finishes with the images of an uninterrupted run."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "400k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        args = [*model_args(tiny_ckpts), *FAST, "--n_iter", "8", "--skip-existing"]
        assert main(["txt2img", *args, "--outdir", str(tmp_path / "whole")]) == 0
        capsys.readouterr()
        code = main(["txt2img", *args, "--outdir", str(disk / "o")])
        err = capsys.readouterr().err
        assert code == 1 and "No space left on device" in err and "Traceback" not in err, err
        assert [line for line in err.splitlines() if line.startswith("error: ")] and err.count("error: ") == 1
        assert not list((disk / "o").rglob("*.tmp"))
        for manifest in (disk / "o").glob("manifest-*.jsonl"):
            text = manifest.read_text()
            assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        assert main(["txt2img", *args, "--outdir", str(disk / "o")]) == 0
        whole = {p.name: p.read_bytes() for p in (tmp_path / "whole/samples").iterdir()}
        resumed = {p.name: p.read_bytes() for p in (disk / "o/samples").iterdir()}
        assert resumed == whole and len(whole) == 8
        assert (disk / "o/grid-0000.png").read_bytes() == (tmp_path / "whole/grid-0000.png").read_bytes()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# -- 3. images of every size ---------------------------------------------------------------------------

def test_img2img_on_a_large_photo_is_shrunk_within_a_memory_bound(tiny_ckpts, tmp_path, capsys):
    """3000x3000 is shrunk to 1 megapixel with a note; the peak memory of the whole run stays bounded."""
    yy, xx = np.mgrid[0:3000, 0:3000]
    photo = tmp_path / "photo.png"
    Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)).save(photo)
    code = subprocess.run(
        # VmHWM, not ru_maxrss: the latter keeps the forking test process's peak across exec
        [sys.executable, "-c", "import sys; from ldm.cli import main; c = main(sys.argv[1:]); "
         "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr); "
         "sys.exit(c)",
         "img2img", *model_args(tiny_ckpts), "--steps", "2", "--precision", "full", "--device", "cpu",
         "--n_samples", "1", "--init-img", str(photo), "--strength", "0.5", "--outdir", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert code.returncode == 0, code.stderr
    assert "init image 3000x3000 shrunk to 1024x1024" in code.stderr
    peak_kib = int(code.stderr.strip().splitlines()[-1])
    assert peak_kib < 2.5 * 2**20, f"peak RSS {peak_kib / 2**20:.1f} GiB"  # was 8 GB and a traceback
    assert Image.open(next((tmp_path / "o/samples").iterdir())).size == (1024, 1024)


def test_strength_zero_returns_the_input(tiny_ckpts, tmp_path, capsys):
    rng = np.random.default_rng(0)
    image = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (256, 264, 3), dtype=np.uint8)).save(image)
    assert main(["img2img", *model_args(tiny_ckpts), "--steps", "4", "--precision", "full", "--device", "cpu",
                 "--n_samples", "1", "--init-img", str(image), "--strength", "0", "--outdir", str(tmp_path / "o")]) == 0
    out = Image.open(next((tmp_path / "o/samples").iterdir()))
    expected = imageio.apply_watermark(Image.open(image).convert("RGB"))  # the input, plus only the watermark
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_input_images_past_the_pixel_bound_are_refused_unread(tiny_ckpts, tmp_path, capsys, no_load):
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(20000, 20000))
    line = refused("img2img", [*model_args(tiny_ckpts), "--steps", "2", "--init-img", str(huge)], capsys, tmp_path / "o")
    assert f"{huge} has more pixels than sd reads" in line or "20000x20000 pixels, more than sd reads" in line


def png_header_only(width: int, height: int, text: bytes = b"") -> bytes:
    """A PNG whose header claims width x height, with one tiny (invalid) IDAT: decoding it would allocate
    the whole image; reading its header or text must not."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (metadata.PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + (chunk(b"tEXt", text) if text else b"") + chunk(b"IEND", b""))


# -- 4. untrusted files stay data ----------------------------------------------------------------------

def safetensors_bytes(header, data: bytes = b"\0" * 16) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


BAD_SAFETENSORS = {
    "header is a list": safetensors_bytes([1, 2]),
    "header is a number": safetensors_bytes(5),
    "negative offset": safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}),
    "float offset": safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}),
    "negative shape": safetensors_bytes({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}),
    "float shape": safetensors_bytes({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}),
    "shape too big": safetensors_bytes({"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 4]}}),
    "unknown dtype": safetensors_bytes({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}),
    "past the end": safetensors_bytes({"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}),
    "entry not an object": safetensors_bytes({"a": 3}),
    "huge header length": struct.pack("<Q", 2**63) + b"{}",
    "deep header": struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("content", BAD_SAFETENSORS.values(), ids=BAD_SAFETENSORS.keys())
def test_crafted_safetensors_headers_are_one_line(content, tiny_ckpts, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    args = ["--ckpt", str(bad), "--config", str(tiny_ckpts["eps"]["config"]), *FAST]
    line = refused("txt2img", args, capsys, tmp_path / "o")
    assert str(bad) in line


def test_a_torch_file_named_safetensors_is_read_by_content(tiny_ckpts, tmp_path, capsys):
    import shutil

    renamed = tmp_path / "really-a-ckpt.safetensors"
    shutil.copy(tiny_ckpts["eps"]["ckpt"], renamed)
    args = ["--ckpt", str(renamed), "--config", str(tiny_ckpts["eps"]["config"]), *FAST, "--outdir", str(tmp_path / "o")]
    assert main(["txt2img", *args]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("target", ["os.system", "subprocess.Popen", "builtins.eval", "ldm.util.get_obj_from_str"])
def test_a_config_cannot_run_code(target, tiny_ckpts, tmp_path, capsys):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"model:\n  target: {target}\n  params:\n    command: touch {marker}\n")
    line = refused("txt2img", ["--ckpt", str(tiny_ckpts["eps"]["safetensors"]), "--config", str(config), *FAST],
                   capsys, tmp_path / "o")
    assert f"config target '{target}'" in line and "--trust-config" in line
    assert not marker.exists()


def test_trust_config_lets_the_user_decide(tiny_ckpts, tmp_path, monkeypatch):
    from ldm.util import instantiate_from_config, trusted_config

    with pytest.raises(SDError, match="--trust-config"):
        instantiate_from_config({"target": "collections.OrderedDict"})
    with trusted_config():
        assert instantiate_from_config({"target": "collections.OrderedDict", "params": {"a": 1}}) == {"a": 1}


def test_info_reads_text_without_decoding_pixels(tmp_path, capsys):
    """A 20000x20000 PNG (1.2 GB decoded): `sd info` reads its text from the chunks alone."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(20000, 20000, b"parameters\0a cat\nSteps: 20, Seed: 1"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(["info", str(bomb)]) == 0
    assert capsys.readouterr().out == "a cat\nSteps: 20, Seed: 1\n"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB


def test_info_does_not_send_escape_sequences_to_the_terminal(tmp_path, capsys):
    image = png_with_parameters(tmp_path / "x.png", "red \x1b[2J\x1b]0;owned\x07 \u202e cat 👩‍💻\nSteps: 2")
    assert main(["info", str(image)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert out.startswith("red \\x1b[2J\\x1b]0;owned\\x07 \\u202e cat 👩‍💻")
    assert main(["info", str(image), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)  # still valid JSON, with the characters escaped
    assert record["prompt"] == "red \x1b[2J\x1b]0;owned\x07 \u202e cat 👩‍💻"


@pytest.mark.parametrize("content", [b"", b"not a png", metadata.PNG_SIGNATURE + b"\0\0\0\xffzTXt"])
def test_info_on_broken_files_is_one_line(content, tmp_path, capsys):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")


# -- 5. reproduction is exact ------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, negative", [
    ("a cat\nNegative prompt: a dog", ""),
    ("a\n\\Negative prompt: b", "Negative prompt: c\nd"),
    ("plain", "\\\\Negative prompt: x"),
])
def test_negative_prompt_lines_round_trip(prompt, negative):
    text = metadata.format_parameters(prompt, negative, {"Steps": 2, "Seed": 3})
    assert metadata.parse_parameters(text) == (prompt, negative, {"Steps": "2", "Seed": "3"})


def test_from_image_reproduces_a_prompt_with_a_negative_prompt_line(tiny_ckpts, tmp_path, capsys):
    args = [*model_args(tiny_ckpts), *FAST]
    prompt = "a cat\nNegative prompt: a dog"
    assert main(["txt2img", *args, "--prompt", prompt, "--outdir", str(tmp_path / "a")]) == 0
    made = tmp_path / "a/samples/00000.png"
    assert main(["txt2img", *args, "--from-image", str(made), "--outdir", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b/samples/00000.png").read_bytes() == made.read_bytes()


def test_img2img_from_image_uses_the_recorded_strength(tiny_ckpts, tmp_path, capsys):
    rng = np.random.default_rng(1)
    image = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(image)
    args = [*model_args(tiny_ckpts), "--steps", "4", "--precision", "full", "--device", "cpu", "--n_samples", "1",
            "--init-img", str(image)]
    assert main(["img2img", *args, "--strength", "0.5", "--outdir", str(tmp_path / "a")]) == 0
    made = tmp_path / "a/samples/00000.png"
    assert main(["img2img", *args, "--strength", "0.9", "--from-image", str(made), "--outdir", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b/samples/00000.png").read_bytes() == made.read_bytes()


# -- 6. signals ---------------------------------------------------------------------------------------

def sd_process(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import sys; from ldm.cli.entry import main; sys.exit(main())", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])  # the interpreter itself starts in ~0.03 s
def test_ctrl_c_while_importing_is_one_line(delay, tmp_path):
    proc = sd_process("txt2img", "--outdir", str(tmp_path / "o"))
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    if proc.returncode != 0:  # it was still importing, or running: either way one line
        assert len([line for line in err.splitlines() if line.startswith(("interrupted", "error"))]) == 1, err
        assert proc.returncode == 130


def test_sigterm_stops_like_ctrl_c_with_the_resume_hint(tiny_ckpts, tmp_path):
    out = tmp_path / "o"
    proc = sd_process("txt2img", *model_args(tiny_ckpts), "--steps", "50", "--H", "256", "--W", "256",
                      "--precision", "full", "--device", "cpu", "--n_iter", "50", "--n_samples", "1",
                      "--skip-existing", "--outdir", str(out))
    deadline = time.time() + 120
    while not list((out / "samples").glob("*.png")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "--skip-existing" in err and "terminated" in err
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))


def test_an_error_mid_run_starts_on_its_own_line(tiny_ckpts, tmp_path, capsys, monkeypatch):
    from ldm.batch import outputs

    def full(*args, **kwargs):
        raise SDError("cannot write x: No space left on device")

    monkeypatch.setattr(outputs.PlanRunner, "_save", full)
    assert main(["txt2img", *model_args(tiny_ckpts), *FAST, "--outdir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "\nerror: cannot write x" in "\n" + err  # at the start of a line, not after the bar's text
