"""The server, LoRA/TI files, prompts, images and the OpenVINO cache under attack (issue "Nothing leaks, nothing
hangs, nothing silently black"). Each section is one class of fault; server faults go through real HTTP and
the page's through gradio's own call routes, as an attacker would send them."""
import json
import math
import os
import pickle
import random
import re
import string
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from ldm.cli import main
from ldm.errors import SDError
from ldm.limits import Limits
from ldm.pipeline import Cancelled, Pipeline
from ldm.serve.app import Server
from tests.serving import serving

ROOT = Path(__file__).resolve().parent.parent
SECRET = "TOPSECRET-PARAMETERS"


def one_line_error(code: int, err: str, says: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and says in lines[0], err
    assert "Traceback" not in err


def tiny_args(tiny_ckpts, *more):
    return ["--ckpt", str(tiny_ckpts["eps"]["safetensors"]), "--config", tiny_ckpts["eps"]["config"], "--steps", "2",
            "--H", "256", "--W", "256", "--precision", "full", "--device", "cpu", "--n_samples", "1", "--n_iter", "1",
            *more]


# -- 1. the page reads no file the client did not upload ----------------------------------------------------
def gradio_call(url: str, name: str, data: list) -> str:
    """One call through gradio's public call route: the event stream's text (complete or error)."""
    event = requests.post(f"{url}/gradio_api/call/{name}", json={"data": data}, timeout=30).json()["event_id"]
    return requests.get(f"{url}/gradio_api/call/{name}/{event}", timeout=120).text


@pytest.fixture(scope="module")
def page_server():
    pipe = Pipeline.load(device="cpu", precision="full", quiet=True)
    with serving(Server(pipe), page=True) as (url, port):
        yield url


def test_a_page_call_cannot_make_gradio_read_a_server_file(page_server, tmp_path):
    secret = tmp_path / "secret.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", SECRET)
    Image.new("RGB", (8, 8)).save(secret, pnginfo=info)
    named = {"path": str(secret), "meta": {"_type": "gradio.FileData"}}
    endpoints = requests.get(page_server + "/gradio_api/info", timeout=30).json()["named_endpoints"]
    img2img = ["a cube", False, named, 0.5, False, None, "none", None, 1.0, 0.0, 1.0, "Balanced", "Crop and Resize",
               "", "ddim", "sampler's own", 2, 5.0, 1, 1, 1]  # ControlNet panel (off) after the strength
    assert len(img2img) == len(endpoints["/run_1"]["parameters"])
    control_picture = list(img2img)
    control_picture[2], control_picture[5] = None, named  # the ControlNet panel's picture: gradio's check holds too
    for name, data in (("read", [named]), ("run_1", img2img), ("run_1", control_picture)):
        answer = gradio_call(page_server, name, data)
        assert answer.startswith("event: error") and "not uploaded by a user" in answer, answer
        assert SECRET not in answer
        for path in set(re.findall(r"/[^\s\"']*gradio[^\s\"']*", answer)):  # nothing to fetch from the cache
            assert SECRET.encode() not in requests.get(f"{page_server}/gradio_api/file={path}", timeout=30).content
    # The same picture uploaded by the client is read: the route works for what a user gives it.
    with open(secret, "rb") as f:
        uploaded = requests.post(page_server + "/gradio_api/upload", files={"files": ("s.png", f)}, timeout=30).json()[0]
    answer = gradio_call(page_server, "read", [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}])
    assert answer.startswith("event: complete") and SECRET in answer


def test_an_uploaded_svg_is_never_served_to_a_browser(page_server, tmp_path):
    """An SVG can carry script; gradio serves some files inline (an uploaded SVG that a call names becomes a
    static file). The page's file routes refuse SVG and HTML files whatever their path."""
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    uploaded = requests.post(page_server + "/gradio_api/upload", files={"files": ("x.svg", svg)}, timeout=30).json()[0]
    gradio_call(page_server, "read", [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}])
    for route in (f"/gradio_api/file={uploaded}", f"/file={uploaded}", f"/gradio_api/file={uploaded.upper()}",
                  "/gradio_api/file=" + uploaded.replace(".svg", "%2Esvg")):
        answer = requests.get(page_server + route, timeout=30)
        assert answer.status_code == 403 and b"<script>" not in answer.content, route


def test_the_png_info_handler_reads_only_uploads(tmp_path):
    from gradio.utils import get_upload_folder

    from ldm.serve.page import _uploaded

    outside = tmp_path / "x.png"
    outside.write_bytes(b"x")
    inside = Path(get_upload_folder()) / "sd-test-upload" / "x.png"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_bytes(b"x")
    try:
        assert _uploaded(str(inside)) and not _uploaded(str(outside))
        assert not _uploaded(str(inside.parent / ".." / ".." / outside.relative_to("/")))
        assert not _uploaded("/etc/passwd") and not _uploaded(str(inside.parent))
    finally:
        inside.unlink()


def test_a_crafted_png_sent_to_txt2img_leaves_bad_numbers_out(page_server):
    answer = gradio_call(page_server, "to_txt2img", ["a cube\nSteps: 1e999, CFG scale: nan, Seed: 12, Size: 99999x64"])
    assert answer.startswith("event: complete"), answer
    values = __import__("json").loads(answer.split("data:", 1)[1])
    assert values[1] == "a cube" and 12 in values  # the readable fields arrive; the others leave their controls


# -- 2. LoRA names stay inside --lora-dir --------------------------------------------------------------------
def lora_file(path: Path, tensors: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def small_lora(width=8, rank=2, **changes):
    tensors = {"lora_unet_nowhere.lora_down.weight": torch.zeros(rank, width),
               "lora_unet_nowhere.lora_up.weight": torch.zeros(width, rank)}
    tensors.update(changes)
    return tensors


def test_lora_names_are_names_in_the_folder_and_nothing_else(tmp_path):
    from ldm.adapters.lora import LoraPlan

    folder = tmp_path / "loras"
    lora_file(folder / "style.safetensors", small_lora())
    lora_file(folder / "sub" / "deep.safetensors", small_lora())
    lora_file(tmp_path / "outside" / "secret.safetensors", small_lora())
    (folder / "escape.safetensors").symlink_to(tmp_path / "outside" / "secret.safetensors")
    os.mkfifo(folder / "fifo.safetensors")
    plan = LoraPlan([], folder)
    assert plan.path_of("style") == (folder / "style.safetensors").resolve()
    assert plan.path_of("deep") == (folder / "sub" / "deep.safetensors").resolve()  # subfolders, as A1111 lists
    said = set()
    for name in ("../outside/secret", str(tmp_path / "outside" / "secret"), "escape", "fifo", "missing",
                 "sub/deep", "sub/../style"):
        with pytest.raises(SDError) as refused:
            plan.path_of(name)
        said.add(str(refused.value).replace(name, "NAME"))
    assert len(said) == 1, said  # existing and missing files cannot be told apart


def test_a_lora_tag_that_climbs_out_is_a_4xx_with_the_missing_ones_text(tmp_path, tiny_ckpts):
    folder = tmp_path / "loras"
    lora_file(tmp_path / "outside" / "secret.safetensors", small_lora())
    folder.mkdir()
    pipe = Pipeline.load(tiny_ckpts["eps"]["safetensors"], tiny_ckpts["eps"]["config"], device="cpu",
                         precision="full", quiet=True)
    with serving(Server(pipe, lora_dir=folder)) as (url, port):
        texts = []
        for name in ("../outside/secret", "missing"):  # left out, as A1111 does with a name it does not list
            r = requests.post(url + "/sdapi/v1/txt2img", json={"prompt": f"a <lora:{name}:1>", "steps": 1,
                                                              "width": 256, "height": 256}, timeout=60)
            assert r.status_code == 200 and "Lora hashes" not in json.loads(r.json()["info"])["infotexts"][0]
            texts.append([t.replace(name, "NAME") for t in json.loads(r.json()["info"])["ignored_settings"]])
        assert texts[0] == texts[1] == ["<lora:NAME> (no such LoRA in the LoRA folder: left out, as A1111 does)"]


# -- 3. prompts built to be slow -------------------------------------------------------------------------------
def reference_weights(text: str) -> list:
    """A1111's bracket rule as first written here (quadratic: every close multiplies all pieces after its
    open), the independent check of the linear parser."""
    from ldm.text.syntax import _BREAK, _PIECE, BREAK, BREAK_MARK, ROUND, SQUARE, _merged, _number

    out, rounds, squares = [], [], []

    def multiply(start, factor):
        for piece in out[start:]:
            if piece[0] is not BREAK_MARK:
                piece[1] *= factor

    for match in _PIECE.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            out.append([piece[1:] if len(piece) > 1 else piece, 1.0])
        elif piece in "([" and len(piece) == 1:
            (rounds if piece == "(" else squares).append(len(out))
        elif weight is not None and rounds:
            multiply(rounds.pop(), _number(weight))
        elif piece == ")" and rounds:
            multiply(rounds.pop(), ROUND)
        elif piece == "]" and squares:
            multiply(squares.pop(), SQUARE)
        else:
            for k, part in enumerate(_BREAK.split(piece)):
                if k:
                    out.append([BREAK_MARK, -1.0])
                out.append([part, 1.0])
    for start in rounds:
        multiply(start, ROUND)
    for start in squares:
        multiply(start, SQUARE)
    return _merged([[BREAK if t is BREAK_MARK else t, w] for t, w in out])


def test_the_linear_parser_gives_the_rules_weights_bit_for_bit():
    from ldm.text.syntax import parse_weights

    parts = ["(", ")", "[", "]", ":1.3)", ":0.5)", "a", "b c", " ", "\\(", "\\", "BREAK", " BREAK ", ",", ":", "\\\\"]
    rng = random.Random(0)
    for _ in range(3000):
        prompt = "".join(rng.choice(parts) for _ in range(rng.randint(0, 40)))
        assert parse_weights(prompt) == reference_weights(prompt), prompt


def finishes(code: str, seconds: float = 60) -> str:
    """Run `code` in a fresh interpreter; its stdout, or a failure if it did not finish in time (a hang)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_prompts_built_to_be_slow_are_refused_or_parsed_at_once():
    out = finishes("""
from ldm.errors import SDError
from ldm.text.syntax import parse_weights
from ldm.text.chunks import check_prompt
for prompt in ["(x " * 20000, "(x:1" * 200]:
    try:
        parse_weights(prompt); print("parsed")
    except SDError as exc:
        print(str(exc)[:39])
print(len(parse_weights("(x) [y] " * 50000)))
for prompt in ["x BREAK " * 10000, "a photo of a cat, " * 6000, "x" * 1_000_000]:
    try:
        check_prompt("--prompt", prompt, 32); print("passed")
    except SDError as exc:
        print(str(exc)[:60])
""", 60).splitlines()
    assert out[:2] == ["the prompt nests brackets more than 100"] * 2
    assert out[2] == "200000"  # x, space, y, space: four pieces a repeat
    assert out[3].startswith("--prompt: the prompt needs more than 32 chunks")
    assert out[4].startswith("--prompt: the prompt needs more than 32 chunks")
    assert out[5].startswith("--prompt: the prompt is 1000000 characters")


def test_long_words_take_the_heap_bpe_and_get_the_same_tokens():
    from ldm.text import tokenizer as T

    tok = T.get_tokenizer()
    rng = random.Random(3)
    for length in (65, 90, 200, 500, 900):
        for letters in (string.ascii_lowercase, "aeitnhs", "ab"):
            word = "".join(rng.choice(letters) for _ in range(length))
            symbols = "".join(tok._byte_symbols[b] for b in word.encode())
            parts = list(symbols[:-1]) + [symbols[-1] + T._END_OF_WORD]
            assert T._bpe_long(list(parts), tok._ranks) == T._bpe(list(parts), tok._ranks)
    assert len(finishes("from ldm.text.tokenizer import get_tokenizer\nimport random\n"
                        "r = random.Random(0)\nprint(len(get_tokenizer().encode(''.join(r.choice('abcdefghij') "
                        "for _ in range(45000)))))", 60).strip()) > 0


def test_the_chunk_bound_is_a_flag_and_a_one_line_error(tiny_ckpts, tmp_path, capsys):
    code = main(["txt2img", *tiny_args(tiny_ckpts, "--prompt", "x BREAK " * 5, "--max-chunks", "4",
                                       "--outdir", str(tmp_path))])
    one_line_error(code, capsys.readouterr().err, "more than 4 chunks of 75 tokens (--max-chunks")
    assert not list(tmp_path.rglob("*.png"))


def test_an_interrupt_reaches_the_text_encoder(tiny_ckpts):
    pipe = Pipeline.load(tiny_ckpts["eps"]["safetensors"], tiny_ckpts["eps"]["config"], device="cpu",
                         precision="full", quiet=True)
    embedder = pipe.model.cond_stage_model
    calls = []
    original = embedder.encode_tokens

    def encode_tokens(*args, **kwargs):
        calls.append(1)
        pipe.cancel()  # an interrupt arriving while the first chunk is encoded
        return original(*args, **kwargs)

    embedder.encode_tokens = encode_tokens
    with pytest.raises(Cancelled, match="while encoding the prompt"):
        pipe.txt2img("x BREAK " * 30, steps=2, width=256, height=256, limits=Limits(max_chunks=40))
    assert len(calls) == 1  # not 30 chunks first
    embedder.encode_tokens = original
    assert len(pipe.txt2img("a cube", steps=1, width=256, height=256)) == 1  # and the pipeline serves on


# -- 4. no silently black image --------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, says", [
    ("a (cube:" + "9" * 400 + ")", "not a finite number"), ("a (cube:1.2.3)", "not a number"),
    ("a " + "(" * 150 + "cube", "nests brackets more than 100"), ("a " + "((" * 40 + "cube", None),
    ("a (cube:5000)", "up to 1000"), ("a " + "(cube:9)" * 1 + "(((((((((((((((((((((x:9)))))))))))))))))))))", None),
    ("<lora:x:1e30>", "not a finite number up to 100"), ("<lora:x:nan>", "not a finite number up to 100"),
    ("<lora:x:1:inf>", "not a finite number up to 100"),
])
def test_absurd_weights_are_refused_before_the_load(prompt, says):
    from ldm.text.chunks import check_prompt

    if says is None:  # deep but finite, or a product past the bound: one line either way, or accepted
        try:
            check_prompt("--prompt", prompt, 32)
        except SDError as exc:
            assert "weight" in str(exc) and "\n" not in str(exc)
        return
    with pytest.raises(SDError, match=re.escape(says)):
        check_prompt("--prompt", prompt, 32)


@pytest.mark.parametrize("change, says", [
    ({"lora_unet_nowhere.lora_up.weight": torch.full((8, 2), float("nan"))}, "not finite numbers"),
    ({"lora_unet_nowhere.alpha": torch.tensor(float("inf"))}, "not finite numbers"),
    ({"lora_unet_nowhere.lora_up.weight": torch.zeros(8, 3)}, "rank 2 in its down weight and 3"),
    ({"lora_unet_nowhere.lora_down.weight": torch.zeros(0, 8), "lora_unet_nowhere.lora_up.weight": torch.zeros(8, 0)},
     "must agree and be at least 1"),
    ({"lora_unet_nowhere.lora_up.weight": torch.zeros(8)}, "both must be matrices"),
    ({"lora_unet_nowhere.alpha": torch.ones(3)}, "has 3 values, not one"),
])
def test_damaged_lora_files_are_one_line(tmp_path, change, says):
    from ldm.adapters.lora import read_lora

    with pytest.raises(SDError, match=re.escape(says)):
        read_lora(lora_file(tmp_path / "bad.safetensors", small_lora(**change)))


def test_a_run_that_turns_non_finite_saves_nothing_and_says_why(tiny_ckpts, tmp_path, capsys):
    from tests.tinyckpt import build_tiny, save_tiny

    model = build_tiny("tiny-v2-inference.yaml", seed=1)
    with torch.no_grad():
        model.model.diffusion_model.out[-1].bias.fill_(float("inf"))
    ckpt = save_tiny(model, tmp_path / "broken.safetensors")
    code = main(["txt2img", "--ckpt", str(ckpt), "--config", tiny_ckpts["eps"]["config"], "--steps", "2", "--H", "256",
                 "--W", "256", "--precision", "full", "--device", "cpu", "--n_samples", "1", "--n_iter", "1",
                 "--prompt", "a cube", "--outdir", str(tmp_path / "out")])
    one_line_error(code, capsys.readouterr().err, "the sampled latents hold NaN or infinite values, so nothing was saved")
    assert not list((tmp_path / "out").rglob("*.png"))


# -- 5. one line (or a 4xx) where a traceback or a 500 was --------------------------------------------------------
@pytest.fixture(scope="module")
def api(tiny_ckpts):
    pipe = Pipeline.load(tiny_ckpts["eps"]["safetensors"], tiny_ckpts["eps"]["config"], device="cpu",
                         precision="full", quiet=True)
    with serving(Server(pipe, limits=Limits(max_side=512, max_steps=20, max_batch=2, max_images=4),
                        max_pixels=1_000_000), auth=("ann", "pw")) as (url, port):
        yield url


def png_b64(size=(64, 64)) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 120, 200)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("route, body, says", [
    ("txt2img", {"prompt": "\ud800 cube"}, "lone surrogate U+D800"),
    ("txt2img", {"prompt": "x", "cfg_scale": 1e300}, "at most 1000"),
    ("txt2img", {"prompt": "x", "alwayson_scripts": {"controlnet": "on"}}, "alwayson_scripts.controlnet must be an object"),
    ("txt2img", {"prompt": "x", "alwayson_scripts": {"x": {"args": 5}}}, "alwayson_scripts.x.args must be a list"),
    ("img2img", {"prompt": "x", "init_images": [png_b64()], "width": -64}, "width must be from 1 to 512"),
    ("img2img", {"prompt": "x", "init_images": [png_b64()], "height": 2 ** 40}, "height must be from 1 to 512"),
    ("img2img", {"prompt": "x", "init_images": [png_b64()], "mask": png_b64(), "width": 2 ** 40},
     "width must be from 1 to 512"),
])
def test_bad_requests_are_a_422_and_the_server_serves_on(api, route, body, says):
    import json

    data = json.dumps({"steps": 2, **body}).encode("utf-8", "surrogatepass")
    r = requests.post(f"{api}/sdapi/v1/{route}", data=data, auth=("ann", "pw"),
                      headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422 and says in r.json()["detail"], r.text
    ok = requests.post(f"{api}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 256, "height": 256},
                       auth=("ann", "pw"), timeout=60)
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1


def test_auth_headers_of_any_bytes_are_a_401_and_the_scheme_is_case_blind(api):
    import base64
    import http.client

    host, port = api.removeprefix("http://").split(":")
    for header in (b"Basic \xff\xfe\xc3\xa9", "Basic é".encode(), b"Bearer x", b"", b"Basic"):
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.putrequest("GET", "/sdapi/v1/options")
        connection.putheader("Authorization", header)
        connection.endheaders()
        assert connection.getresponse().status == 401, header
        connection.close()
    token = base64.b64encode(b"ann:pw").decode()
    for scheme in ("basic", "BASIC", "Basic"):
        assert requests.get(api + "/sdapi/v1/options", headers={"Authorization": f"{scheme} {token}"},
                            timeout=30).status_code == 200


def test_a_prompt_file_line_with_a_lone_surrogate_is_one_line(tiny_ckpts, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a \\ud800 cube"}\n')
    code = main(["txt2img", *tiny_args(tiny_ckpts, "--from-file", str(tmp_path / "p.jsonl"),
                                       "--outdir", str(tmp_path / "o"))])
    one_line_error(code, capsys.readouterr().err, "lone surrogate U+D800")


def test_unclip_weights_that_would_overflow_their_sum_are_one_line():
    from ldm.models.diffusion.conditioned import check_mix_weights

    for weights in ([1e308, 1e308], [float("nan"), 1.0], [2000.0, 1.0]):
        with pytest.raises(SDError, match="finite numbers up to 1000"):
            check_mix_weights(weights, 2)
    check_mix_weights([1000.0, -3.0], 2)


@pytest.mark.parametrize("where", ["cache/sd/openvino", "cache/sd", "cache"])
def test_an_openvino_cache_folder_that_is_a_file_is_one_line(tmp_path, monkeypatch, where):
    from ldm.runtime.openvino import _ready_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / where).write_text("not a folder")
    with pytest.raises(SDError, match="the OpenVINO cache: cannot write to .*(exists and is not a folder|Not a "
                                      "directory).*XDG_CACHE_HOME"):
        _ready_cache_dir()
    from ldm.runtime.fastpath import compile_cache_dir, enable_compile_cache

    if where != "cache/sd/openvino":  # --compile's cache is cache/sd/inductor
        with pytest.raises(SDError, match="--compile's cache: cannot write to"):
            enable_compile_cache(compile_cache_dir())


# -- 6. files that would cost more than they say ---------------------------------------------------------------
def deflated_copy(source: Path, target: Path) -> Path:
    """The torch zip `source` re-written with every entry deflated (what no torch.save makes)."""
    with zipfile.ZipFile(source) as inner, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as outer:
        for entry in inner.infolist():
            outer.writestr(entry.filename, inner.read(entry.filename))
    return target


def test_a_small_deflated_file_claiming_a_huge_tensor_is_refused_unread(tmp_path):
    from ldm.adapters.lora import read_lora
    from ldm.adapters.textual_inversion import load_embedding

    big = tmp_path / "big.pt"
    torch.save({"string_to_param": {"*": torch.zeros(80 * 2 ** 20 // 4)}}, big)
    small = deflated_copy(big, tmp_path / "bomb.pt")
    big.unlink()
    assert small.stat().st_size < 2 ** 20
    with pytest.raises(SDError, match="compressed data, more than a torch file ever compresses"):
        load_embedding(small, 1024)
    with pytest.raises(SDError, match="compressed data"):  # the same file offered as a LoRA
        read_lora(small)


def test_a_tensor_claiming_more_than_it_stores_is_refused_before_any_copy(tmp_path):
    from ldm.loading.checkpoint import read_state_dict
    from ldm.adapters.textual_inversion import load_embedding

    torch.save({"state_dict": {"x": torch.zeros(1).expand(100000, 100000, 1, 1)}}, tmp_path / "expand.ckpt")
    with pytest.raises(SDError, match=r"claims shape \(100000, 100000, 1, 1\) \(40000000000 bytes\) but stores 4"):
        read_state_dict(tmp_path / "expand.ckpt")
    torch.save({"string_to_param": {"*": torch.zeros(1).expand(75, 100000)}}, tmp_path / "expand.pt")
    with pytest.raises(SDError, match="claims shape"):
        load_embedding(tmp_path / "expand.pt", 1024)


def test_sd_prompt_skips_a_fifo_named_like_an_embedding(tmp_path):
    folder = tmp_path / "emb"
    folder.mkdir()
    os.mkfifo(folder / "trap.pt")
    out = finishes(f"from ldm.cli import main\nprint(main(['prompt', 'a trap cube', '--embeddings', {str(folder)!r}]))",
                   90)
    assert out.strip().splitlines()[-1] == "0"


# -- 7. the OpenVINO cache is checked, shared and repaired ------------------------------------------------------
@pytest.fixture
def ov_cache(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sd" / "openvino"


def test_damaged_cached_models_are_noticed_and_converted_again(tiny_ckpts, ov_cache, capsys):
    entry = tiny_ckpts["eps"]
    settings = dict(seed=5, steps=2, width=256, height=256)

    def run():
        pipe = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", precision="full",
                             backend="openvino", quiet=True)
        return pipe.txt2img("a red cube", **settings)[0].png()

    fresh = run()
    capsys.readouterr()
    unet_bin = next(ov_cache.glob("unet-*.bin"))
    weights = np.fromfile(unet_bin, dtype=np.float32)
    weights[::7] = 1e30  # every 7th float of the cached weights, as the attack did
    weights.tofile(unet_bin)
    decoder_xml = next(ov_cache.glob("decoder-*.xml"))
    decoder_xml.write_bytes(decoder_xml.read_bytes()[: len(decoder_xml.read_bytes()) // 2])  # truncated
    assert run() == fresh
    err = capsys.readouterr().err
    assert err.count("is damaged, incomplete or unrecorded") == 2 and "converting the unet" in err
    assert "converting the decoder" in err and "converting the text" not in err


def test_two_processes_converting_one_model_share_the_conversion(tiny_ckpts, ov_cache, tmp_path):
    entry = tiny_ckpts["eps"]
    code = (f"from ldm.pipeline import Pipeline\nimport ldm.loading.detect\n"
            f"ldm.loading.detect.probe_parameterization = lambda m: (m.parameterization, 1.0)\n"
            f"p = Pipeline.load({str(entry['safetensors'])!r}, {entry['config']!r}, device='cpu', precision='full', "
            f"backend='openvino', quiet=True)\n"
            f"import sys; sys.stdout.buffer.write(p.txt2img('a red cube', seed=5, steps=2, width=256, height=256)[0].png())")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                             env=env) for _ in range(2)]
    outs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [o[1][-500:] for o in outs]
    assert outs[0][0] == outs[1][0]
    converted = sum(o[1].decode().count("converting the unet") for o in outs)
    assert converted == 1  # the second waited for the first's conversion and read it


# -- 8. pictures that would load black ---------------------------------------------------------------------------
def test_32_bit_integer_and_float_pictures_load_by_their_range(tmp_path, capsys):
    from ldm.files.imageio import load_image

    ramp = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.float64)
    cases = {"i8.tif": Image.fromarray(ramp.astype(np.int32), "I"),
             "i16.tif": Image.fromarray((ramp * 257).astype(np.int32), "I"),
             "i32.tif": Image.fromarray((ramp * 2 ** 23).astype(np.int32), "I"),
             "f01.tif": Image.fromarray((ramp / 255).astype(np.float32), "F"),
             "f255.tif": Image.fromarray(ramp.astype(np.float32), "F")}
    for name, picture in cases.items():
        picture.save(tmp_path / name)
        got = np.asarray(load_image(tmp_path / name))[..., 0].astype(np.float64)
        assert np.abs(got - ramp).max() <= 1, name
    assert "32-bit integer image with values 0..2139095040" in capsys.readouterr().err
    for name, values, says in (("neg.tif", ramp - 10, "values from -10 to 245"),
                               ("nan.tif", np.where(ramp > 100, np.nan, ramp / 255), "NaN or infinite"),
                               ("hot.tif", ramp * 1000, "values up to 255000")):
        Image.fromarray(values.astype(np.float32), "F").save(tmp_path / name)
        with pytest.raises(SDError, match=re.escape(says)):
            load_image(tmp_path / name)
