"""The inputs around the model, as an attacker sends them (issue "Nothing hangs, nothing blows up"): styles,
PNG text, files that are not regular files, the infotext parser, prompt files, text that is no text, the
server's own styles file, huge JSON numbers, EXIF orientation over the API. One section per class; each
case answers with one line (CLI) or a 4xx/500 naming the file (server) within a bounded time, and the
server keeps serving."""
import base64
import io
import json
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from ldm.cli import main
from ldm.errors import SDError
from ldm.files import imageio, metadata
from ldm.files.reading import open_regular, read_capped
from ldm.limits import Limits
from ldm.pipeline import Pipeline
from ldm.serve import styles as styles_module
from ldm.serve.a1111 import RequestError, decode_image, text_problem
from ldm.serve.app import Server
from tests.serving import serving

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "configs"


def within(seconds: float, fn, *args):
    """fn(*args) in a thread; fails the test when it has not returned after `seconds` (a hang), else its
    result or its exception."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def one_line(code, err: str, says: str) -> str:
    """One error line saying `says` (notes may come before it), no traceback, a non-zero exit."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code not in (0, None) and len(lines) == 1 and "Traceback" not in err, err
    assert says in lines[0], lines[0]
    return lines[0]


def tiny_args(tiny_ckpts, *more):
    return ["--ckpt", str(tiny_ckpts["eps"]["safetensors"]), "--config", str(tiny_ckpts["eps"]["config"]),
            "--steps", "2", "--H", "256", "--W", "256", "--precision", "full", "--device", "cpu", "--n_samples", "1",
            "--n_iter", "1", *more]


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def small_png(*chunks: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, "PNG")
    png = buffer.getvalue()
    end = png.rindex(b"IEND") - 4
    return png[:end] + b"".join(chunks) + png[end:]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory, tiny_ckpts, monkeypatch_module):
    """A server on the tiny checkpoint, its styles file in a folder of its own."""
    from ldm.loading import detect

    monkeypatch_module.setattr(detect, "probe_parameterization", lambda model: ("eps", 1.0))
    folder = tmp_path_factory.mktemp("served")
    styles = folder / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\ndouble,"{prompt} {prompt}",\nplain,"oil painting",\n')
    pipe = Pipeline.load(tiny_ckpts["eps"]["safetensors"], tiny_ckpts["eps"]["config"], device="cpu",
                         precision="full", quiet=True)
    server = Server(pipe, models_dir=Path(tiny_ckpts["eps"]["safetensors"]).parent, styles=styles,
                    limits=Limits(max_side=512, max_steps=10, max_batch=2, max_images=4), max_body=8 * 2 ** 20)
    with serving(server) as (url, port):
        yield server, url, styles


def txt2img(url, **fields):
    body = {"prompt": "a red square", "steps": 2, "width": 256, "height": 256, "seed": 1, **fields}
    return requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)


# -- 1. styles: bounded before the prompt grows -------------------------------------------------------------
def test_a_style_that_doubles_the_prompt_is_refused_before_it_grows():
    styles = {"double": styles_module.Style("double", "{prompt} {prompt}", "")}
    started = time.perf_counter()
    with pytest.raises(SDError, match="longer than 100,000 characters"):
        styles_module.apply_styles(styles, ["double"] * 64, "cat", "")
    assert time.perf_counter() - started < 1.0
    # below the bound the styles apply as A1111 applies them: 2**5 cats
    prompt, _, applied, _ = styles_module.apply_styles(styles, ["double"] * 5, "cat", "")
    assert prompt == " ".join(["cat"] * 32) and applied == ["double"] * 5


def test_a_long_list_of_styles_is_refused_by_its_length():
    styles = {"plain": styles_module.Style("plain", "oil painting", "blurry")}
    with pytest.raises(SDError, match="at most 64 apply to one request"):
        styles_module.apply_styles(styles, ["plain"] * 100_000, "cat", "")
    prompt, negative, _, ignored = styles_module.apply_styles(styles, ["plain", "nope"], "cat", "")
    assert (prompt, negative, ignored) == ("cat, oil painting", "blurry", ["nope"])


def test_the_server_refuses_multiplying_styles_with_a_422_and_keeps_serving(server_url):
    server, url, _ = server_url
    started = time.perf_counter()
    reply = txt2img(url, styles=["double"] * 60)
    assert reply.status_code == 422 and "longer than 100,000 characters" in reply.json()["detail"]
    reply = txt2img(url, styles=["plain"] * 5000)
    assert reply.status_code == 422 and "at most 64" in reply.json()["detail"]
    assert time.perf_counter() - started < 10
    reply = txt2img(url, styles=["double"])
    assert reply.status_code == 200
    assert json.loads(reply.json()["info"])["infotexts"][0].startswith("a red square a red square\n")


# -- 2. PNG text bounded in total --------------------------------------------------------------------------
def bomb_png(chunks: int, each: int = 1 << 20) -> bytes:
    """`chunks` zTXt chunks of distinct keys, each inflating to `each` bytes (a few KB on disk)."""
    body = zlib.compress(b"a" * each, 9)
    return small_png(*(chunk(b"zTXt", f"k{k}".encode() + b"\0\0" + body) for k in range(chunks)))


def test_many_text_chunks_cannot_add_up_to_gigabytes(tmp_path, capsys):
    data = bomb_png(2000)  # 2 GB of text if inflated: about 2 MB on disk
    assert len(data) < 4 * 2 ** 20
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    started = time.perf_counter()
    with pytest.raises(SDError, match="more than 4 MB of text chunks"):
        metadata.read_png_text(path)
    assert time.perf_counter() - started < 2.0
    one_line(main(["info", str(path)]), capsys.readouterr().err, "more than 4 MB of text chunks")
    # three chunks of 1 MB each are within the bound and read whole
    path.write_bytes(bomb_png(3))
    assert sorted(len(v) for v in metadata.read_png_text(path).values()) == [1 << 20] * 3


def test_png_info_answers_a_text_bomb_with_a_422(server_url):
    _, url, _ = server_url
    image = base64.b64encode(bomb_png(2000)).decode()
    reply = requests.post(f"{url}/sdapi/v1/png-info", json={"image": image}, timeout=30)
    assert reply.status_code == 422 and "more than 4 MB of text chunks" in reply.json()["detail"]


def test_a_flood_of_tiny_chunks_is_refused():
    flood = small_png(chunk(b"tIME", b"\0" * 7) * (metadata.MAX_CHUNKS + 1))
    with pytest.raises(SDError, match="more than 100,000 PNG chunks"):
        within(10, metadata.png_text_chunks, io.BytesIO(flood))


# -- 3. only regular files, with a byte cap ---------------------------------------------------------------
@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return path


def test_the_reader_refuses_fifos_devices_and_folders_without_blocking(fifo, tmp_path):
    for path, says in ((fifo, "is a FIFO (named pipe), not a file"), (Path("/dev/zero"), "is a character device"),
                       (tmp_path, "is a folder, not a file"), (tmp_path / "nope", "file not found")):
        with pytest.raises(SDError, match=said(says)):
            within(5, read_capped, path, 100)
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 101)
    with pytest.raises(SDError, match="is 101 bytes, more than the 100 sd reads"):
        read_capped(big, 100)
    with open_regular(big) as f:
        assert f.read() == b"x" * 101


def said(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize("command, says", [
    (["info", "{fifo}"], "is a FIFO (named pipe), not an image"),
    (["info", "/dev/zero"], "is a character device, not an image"),
    (["txt2img", "--from-image", "{fifo}"], "is a FIFO (named pipe), not an image"),
])
def test_commands_on_a_fifo_or_device_say_so_in_one_line(command, says, fifo, capsys):
    args = [part.replace("{fifo}", str(fifo)) for part in command]
    code = within(10, main, args)
    one_line(code, capsys.readouterr().err, says)


def test_a_prompt_file_that_is_a_fifo_is_not_not_found(fifo, tiny_ckpts, tmp_path, capsys):
    code = within(10, main, ["txt2img", *tiny_args(tiny_ckpts, "--from-file", str(fifo), "--outdir",
                                                      str(tmp_path / "o"))])
    one_line(code, capsys.readouterr().err, "is a FIFO (named pipe), not a prompt file")


def test_manifests_and_samples_that_are_not_files_neither_hang_nor_mislead(tiny_ckpts, tmp_path, capsys):
    outdir = tmp_path / "out"
    args = ["txt2img", *tiny_args(tiny_ckpts, "--prompt", "a cat", "--seed", "3", "--outdir", str(outdir),
                                  "--skip-existing")]
    assert within(120, main, args) == 0
    capsys.readouterr()
    sample = next((outdir / "samples").glob("*.png"))
    # a FIFO where a manifest would be is passed over; a finished sample swapped for a FIFO is one line
    os.mkfifo(outdir / "manifest-00077.jsonl")
    sample.unlink()
    os.mkfifo(sample)
    code = within(60, main, args)
    one_line(code, capsys.readouterr().err, f"{sample} is a FIFO (named pipe), not an image")


# -- 4. the infotext parser in linear time -------------------------------------------------------------------
@pytest.mark.parametrize("settings_line", [
    "k," * 1_500_000,  # a million bare keys: every key once searched the rest of the line for a ':'
    "a" * 3_000_000,
    'k: "' + "x" * 3_000_000,  # an unterminated quoted value
    ("k: " + '"a",' * 700_000),
    ":" * 3_000_000,
])
def test_the_parameters_parser_is_linear(settings_line):
    text = "prompt\nNegative prompt: no\n" + settings_line
    started = time.perf_counter()
    info = within(30, metadata.Infotext.read, text)
    assert time.perf_counter() - started < 5.0  # quadratic, these took minutes
    assert info.prompt == "prompt" and info.negative_prompt == "no"


def test_the_linear_parser_reads_what_it_read_before():
    line = 'Steps: 20, Sampler: DPM++ 2M, Lone, Size: 512x768, Note: "a, b: c", Empty: , Odd: "x" y, Last: z'
    assert metadata.Infotext.read(f"p\n{line}").fields == {
        "Steps": "20", "Sampler": "DPM++ 2M", "Lone": "Lone", "Size": "512x768", "Note": "a, b: c", "Empty": "",
        "Odd": '"x" y', "Last": "z"}


# -- 5. prompt files bounded as they are read ----------------------------------------------------------------
def test_a_prompt_file_of_a_million_lines_is_refused_at_the_bound(tiny_ckpts, tmp_path, capsys):
    path = tmp_path / "many.txt"
    path.write_text("a cat\n" * 1_000_000)
    started = time.perf_counter()
    code = main(["txt2img", *tiny_args(tiny_ckpts, "--from-file", str(path), "--repeat", "4", "--max-images", "1000",
                                       "--outdir", str(tmp_path / "o"))])
    one_line(code, capsys.readouterr().err, "has more than 250 prompts (each makes at least 4 image(s) and "
                                            "--max-images is 1,000)")
    assert time.perf_counter() - started < 10


def test_an_oversized_prompt_file_is_refused_unread(tmp_path):
    from ldm.batch.prompts import MAX_PROMPT_FILE_BYTES, read_prompt_lines

    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:
        f.truncate(MAX_PROMPT_FILE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(SDError, match="more than the 67,108,864 sd reads"):
        read_prompt_lines(path)


# -- 6. text that is no text is refused before the job, and replies always serialise ------------------------
@pytest.mark.parametrize("body, says", [
    ({"styles": ["\ud800"]}, "styles[0] holds a lone surrogate U+D800"),
    ({"override_settings": {"\udc80x": 1}}, "a key of override_settings holds a lone surrogate U+DC80"),
    ({"prompt": "cat \udfff"}, "prompt holds a lone surrogate U+DFFF"),
])
def test_lone_surrogates_are_a_422_before_any_job(body, says, server_url):
    server, url, _ = server_url
    jobs = server.worker.progress()[1]
    raw = json.dumps({"prompt": "a red square", "steps": 2, "width": 256, "height": 256, **body})  # \ud800 escapes
    reply = requests.post(f"{url}/sdapi/v1/txt2img", data=raw, headers={"Content-Type": "application/json"},
                          timeout=60)
    assert reply.status_code == 422 and says in reply.json()["detail"], reply.text
    assert server.worker.progress()[1] == jobs
    reply = requests.post(f"{url}/sdapi/v1/options", data=json.dumps({"\ud800": 1}),
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == 422 and "lone surrogate U+D800" in reply.json()["detail"]
    # an emoji written as a surrogate pair is text, and comes back whole
    reply = txt2img(url, prompt="a red square \ud83d\ude00".encode("utf-16", "surrogatepass").decode("utf-16"))
    assert reply.status_code == 200 and json.loads(reply.json()["info"])["prompt"] == "a red square 😀"


def test_text_problem_walks_the_whole_body():
    assert text_problem({"a": [{"b": "ok"}, {"c": ["x", "\ud801"]}]}) == "a[1].c[1] holds a lone surrogate U+D801, " \
                                                                         "which is not text"
    deep: list = []
    for _ in range(100):
        deep = [deep]
    assert "nested more than 64 levels" in text_problem({"x": deep})
    assert text_problem({"prompt": "ok 😀", "n": 1, "f": None}) is None


# -- 7. the server's styles file is the server's fault, read when it changes ------------------------------
def test_a_bad_styles_file_stops_the_server_at_start(tiny_ckpts, tmp_path, monkeypatch):
    from ldm.loading import detect

    monkeypatch.setattr(detect, "probe_parameterization", lambda model: ("eps", 1.0))
    pipe = Pipeline.load(tiny_ckpts["eps"]["safetensors"], tiny_ckpts["eps"]["config"], device="cpu",
                         precision="full", quiet=True)
    bad = tmp_path / "styles.csv"
    for content, says in ((b"name,prompt\nx,\"" + b"y" * 200_000 + b"\"\n", "not a CSV file sd can read"),
                          (b"name,prompt\n\xff\xfe,bad\n", "is not UTF-8 text"),
                          (None, "is a FIFO")):
        bad.unlink(missing_ok=True)
        os.mkfifo(bad) if content is None else bad.write_bytes(content)
        with pytest.raises(SDError, match=f"the server's styles file \\(--styles\\): .*{said(says)}"):
            within(10, lambda: Server(pipe, styles=bad))


def test_a_styles_file_broken_later_fails_only_the_requests_naming_a_style(server_url, monkeypatch):
    server, url, path = server_url
    reads = []
    real = styles_module.read_styles
    monkeypatch.setattr(styles_module, "read_styles", lambda p: reads.append(p) or real(p))
    original = path.read_bytes()
    try:
        path.write_bytes(b"name,prompt\nx,\"" + b"y" * 200_000 + b"\"\n")
        for _ in range(3):
            reply = txt2img(url, styles=["plain"])
            assert reply.status_code == 500, reply.text
            assert reply.json()["detail"].startswith(f"the server's styles file (--styles): the styles file {path}")
        assert len(reads) == 1  # read once for the change, not per request
        assert txt2img(url).status_code == 200  # a request naming no style runs
        assert requests.get(f"{url}/sdapi/v1/prompt-styles", timeout=10).status_code == 500
    finally:
        path.write_bytes(original)
    assert txt2img(url, styles=["plain"]).status_code == 200


# -- 8. numbers of thousands of digits -------------------------------------------------------------------------
@pytest.mark.parametrize("line, says", [
    ('{"prompt": "a", "seed": %s}' % ("9" * 5000), "a number of 5000 digits"),
    ('{"prompt": "a", "steps": -%s}' % ("1" * 41), "a number of 41 digits"),
])
def test_a_jsonl_number_of_thousands_of_digits_is_one_line(line, says, tiny_ckpts, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    code = main(["txt2img", *tiny_args(tiny_ckpts, "--from-file", str(path), "--outdir", str(tmp_path / "o"))])
    one_line(code, capsys.readouterr().err, f"{path}:1: {says}")


def test_a_safetensors_header_with_a_huge_number_is_one_line(tmp_path):
    from ldm.loading.checkpoint import read_state_dict

    header = ('{"w": {"dtype": "F32", "shape": [%s], "data_offsets": [0, 4]}}' % ("9" * 5000)).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(SDError, match="not a valid safetensors file"):
        read_state_dict(path)


def test_manifest_and_sample_names_with_huge_numbers_do_not_block_later_runs(tiny_ckpts, tmp_path, capsys):
    outdir = tmp_path / "out"
    (outdir / "samples").mkdir(parents=True)
    (outdir / f"manifest-{'9' * 200}.jsonl").write_text("{}\n")
    (outdir / "manifest-00001.jsonl").write_text(json.dumps({"sd_manifest": 1, "run": "x", "base": 10 ** 400,
                                                             "images": 1}) + "\n")
    (outdir / "samples" / f"{'7' * 200}.png").write_bytes(b"")
    assert main(["txt2img", *tiny_args(tiny_ckpts, "--prompt", "a cat", "--outdir", str(outdir),
                                       "--skip-existing")]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (outdir / "samples").glob("0*.png")) == ["00002.png"]


# -- 9. the API decodes pictures as the commands do ---------------------------------------------------------
def rotated_jpeg(path: Path) -> bytes:
    """A 320x256 JPEG whose EXIF says: turn 90 degrees (orientation 6), as phones write them."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray((rng.random((256, 320, 3)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    picture.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    return path.read_bytes()


def test_the_api_turns_a_photo_as_the_cli_does(tmp_path, server_url):
    data = rotated_jpeg(tmp_path / "photo.jpg")
    from_file = imageio.load_image(tmp_path / "photo.jpg")
    from_api = decode_image(base64.b64encode(data).decode(), "init_images[0]", 4_000_000)
    assert from_file.size == from_api.size == (256, 320)
    assert np.array_equal(np.asarray(from_file), np.asarray(from_api))
    _, url, _ = server_url
    reply = requests.post(f"{url}/sdapi/v1/img2img", json={
        "init_images": [base64.b64encode(data).decode()], "prompt": "a cat", "steps": 2, "seed": 1,
        "denoising_strength": 0.5}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert Image.open(io.BytesIO(base64.b64decode(reply.json()["images"][0]))).size == (256, 320)


def test_a_float_nan_mask_is_refused_like_a_float_nan_picture(server_url):
    buffer = io.BytesIO()
    values = np.zeros((64, 64), np.float32)
    values[10:20, 10:20] = np.nan
    Image.fromarray(values, mode="F").save(buffer, "TIFF")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(RequestError, match="mask is a float image with NaN"):
        decode_image(encoded, "mask", 4_000_000, "RGBA")
    _, url, _ = server_url
    picture = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(picture, "PNG")
    reply = requests.post(f"{url}/sdapi/v1/img2img", json={
        "init_images": [base64.b64encode(picture.getvalue()).decode()], "mask": encoded, "prompt": "a cat",
        "steps": 2, "width": 256, "height": 256}, timeout=60)
    assert reply.status_code == 422 and "NaN" in reply.json()["detail"]
