"""ComfyUI's API on sd serve, replayed as its clients call it (shared/comfyui-facts.md A.2): ComfyUI's
websockets_api_example.py, SillyTavern's /history polling, comfy-api-simplified's img2img with an upload,
n8n's /queue polling, Dify's /history?prompt_id=, and the 400s a wrong graph gets."""
from __future__ import annotations

import base64
import io
import json
import time
import urllib.parse
import uuid

import numpy as np
import pytest
import requests
from PIL import Image

from tests.serving import serving

pytest.importorskip("websocket", reason="websocket-client (requirements-test.txt) drives the ComfyUI socket")

# ComfyUI's default API-format graph (script_examples), as its example and Open WebUI send it
DEFAULT = {
    "3": {"class_type": "KSampler", "inputs": {"cfg": 8, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0],
                                               "negative": ["7", 0], "positive": ["6", 0], "sampler_name": "euler",
                                               "scheduler": "normal", "seed": 8566257, "steps": 6}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "demo.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 256, "width": 256}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a red circle"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "blurry"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}
SAME_ON_A1111 = {"prompt": "a red circle", "negative_prompt": "blurry", "sampler_name": "Euler", "scheduler": "Normal",
                 "cfg_scale": 8, "seed": 8566257, "steps": 6, "width": 256, "height": 256}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    from ldm.pipeline import Pipeline
    from ldm.serve.app import Server

    server = Server(Pipeline.load(device="cpu", precision="full", quiet=True),
                    outdir=tmp_path_factory.mktemp("out"), preview_every=1)
    with serving(server) as (url, port):
        yield server, url, port


def graph(**changes) -> dict:
    prompt = json.loads(json.dumps(DEFAULT))
    for key, value in changes.items():
        node, name = key.split("__")
        prompt[node]["inputs"][name] = value
    return prompt


def messages_until_done(ws, prompt_id: str, seen: list | None = None) -> list:
    """The socket's messages until the prompt's end marker (`seen`: those read already, searched first)."""
    ws.settimeout(120)
    seen = list(seen or [])
    if any(kind == "executing" and data["node"] is None and data["prompt_id"] == prompt_id for kind, data in seen):
        return seen
    while True:
        out = ws.recv()
        if isinstance(out, bytes):
            seen.append(("binary", out[:8]))
            continue
        message = json.loads(out)
        seen.append((message["type"], message["data"]))
        if message["type"] == "executing" and message["data"]["node"] is None and \
                message["data"]["prompt_id"] == prompt_id:
            return seen


def test_comfyuis_websocket_example_gets_the_a1111_routes_picture(comfy):
    import websocket

    server, url, port = comfy
    client_id = str(uuid.uuid4())
    ws = websocket.WebSocket()
    ws.connect(f"ws://127.0.0.1:{port}/ws?clientId={client_id}")
    first = json.loads(ws.recv())
    assert first["type"] == "status" and first["data"]["sid"] == client_id
    prompt_id = str(uuid.uuid4())  # the example sends its own id, as Krita needs honoured
    reply = requests.post(f"{url}/prompt", json={"prompt": DEFAULT, "client_id": client_id, "prompt_id": prompt_id})
    assert reply.status_code == 200 and reply.json()["prompt_id"] == prompt_id and reply.json()["node_errors"] == {}
    seen = messages_until_done(ws, prompt_id)
    ws.close()
    kinds = [kind for kind, _ in seen if kind not in ("status", "binary")]
    assert kinds == ["execution_start", "execution_cached", "executing"] + ["progress"] * 6 + \
        ["executing", "executed", "execution_success", "executing"]
    assert [data["value"] for kind, data in seen if kind == "progress"] == [1, 2, 3, 4, 5, 6]
    assert any(kind == "binary" and data[:8] == b"\x00\x00\x00\x01\x00\x00\x00\x02" for kind, data in seen)
    history = requests.get(f"{url}/history/{prompt_id}").json()[prompt_id]
    assert history["status"]["status_str"] == "success" and history["status"]["completed"] is True
    assert [m[0] for m in history["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    image = history["outputs"]["9"]["images"][0]
    assert image == {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}
    viewed = requests.get(f"{url}/view?" + urllib.parse.urlencode(image))
    assert viewed.headers["x-content-type-options"] == "nosniff"
    png = viewed.content
    a1111 = requests.post(f"{url}/sdapi/v1/txt2img", json=SAME_ON_A1111).json()
    same = Image.open(io.BytesIO(base64.b64decode(a1111["images"][0])))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(same))
    assert (server.outdir / "comfyui" / "output" / "ComfyUI_00001_.png").read_bytes() == png


def test_sillytaverns_calls_and_its_history_polling(comfy):
    server, url, _ = comfy
    stats = requests.get(f"{url}/system_stats").json()  # its ping
    assert stats["system"]["ram_total"] > 0 and stats["devices"][0]["type"] in ("cpu", "cuda")
    info = requests.get(f"{url}/object_info").json()
    assert "euler" in info["KSampler"]["input"]["required"]["sampler_name"][0]
    assert "karras" in info["KSampler"]["input"]["required"]["scheduler"][0]
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["demo.safetensors"]
    assert info["VAELoader"]["input"]["required"]["vae_name"][0] == []
    reply = requests.post(f"{url}/prompt", data=json.dumps({"prompt": graph(**{"3__seed": 5})}))  # its raw body
    prompt_id = reply.json()["prompt_id"]
    polls = 0
    while prompt_id not in (history := requests.get(f"{url}/history").json()):
        polls += 1
        time.sleep(0.1)  # SillyTavern polls the whole history every 100 ms
    entry = history[prompt_id]
    assert polls >= 1 and entry["status"]["status_str"] == "success"
    image = next(iter(entry["outputs"].values()))["images"][0]
    assert requests.get(f"{url}/view", params=image).headers["content-type"] == "image/png"


def test_comfy_api_simplifieds_img2img_with_an_upload(comfy):
    server, url, _ = comfy
    picture = Image.fromarray((np.indices((256, 256)).sum(0) % 256).astype(np.uint8)).convert("RGB")
    data = io.BytesIO()
    picture.save(data, format="PNG")
    uploaded = requests.post(f"{url}/upload/image", files={"image": ("start.png", data.getvalue(), "image/png")},
                             data={"overwrite": "true"}).json()
    assert uploaded == {"name": "start.png", "subfolder": "", "type": "input"}
    prompt = graph(**{"3__denoise": 0.5, "3__latent_image": ["11", 0]})
    prompt.update({"10": {"class_type": "LoadImage", "inputs": {"image": "start.png", "upload": "image"}},
                   "12": {"class_type": "ImageScale", "inputs": {"upscale_method": "nearest-exact", "width": 256,
                                                                 "height": 256, "crop": "disabled", "image": ["10", 0]}},
                   "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["12", 0], "vae": ["4", 2]}}})
    prompt_id = requests.post(f"{url}/prompt", json={"prompt": prompt, "client_id": "simplified"}).json()["prompt_id"]
    while not (entry := requests.get(f"{url}/history/{prompt_id}").json()):
        time.sleep(0.1)
    image = entry[prompt_id]["outputs"]["9"]["images"][0]
    png = requests.get(f"{url}/view", params=image).content
    same = requests.post(f"{url}/sdapi/v1/img2img", json={**SAME_ON_A1111, "denoising_strength": 0.5, "init_images": [
        base64.b64encode(data.getvalue()).decode()]}).json()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))),
                          np.asarray(Image.open(io.BytesIO(base64.b64decode(same["images"][0])))))
    # a second upload of other bytes under the same name is kept beside it, ComfyUI's way
    again = requests.post(f"{url}/upload/image", files={"image": ("start.png", b"\x89PNG other", "image/png")}).json()
    assert again["name"] == "start (1).png"


def test_n8n_polls_the_queue_and_dify_reads_history_by_query(comfy):
    server, url, _ = comfy
    long_id = requests.post(f"{url}/prompt", json={"prompt": graph(**{"3__steps": 60})}).json()["prompt_id"]
    short_id = requests.post(f"{url}/prompt", json={"prompt": graph(**{"3__seed": 2})}).json()["prompt_id"]
    queue = requests.get(f"{url}/queue").json()
    listed = [item[1] for item in queue["queue_running"] + queue["queue_pending"]]
    assert listed == [long_id, short_id] and all(len(item) == 5 for item in queue["queue_pending"])
    assert requests.get(f"{url}/prompt").json()["exec_info"]["queue_remaining"] == 2
    while short_id not in requests.get(f"{url}/history", params={"prompt_id": short_id}).json():  # Dify's read
        time.sleep(0.1)
    assert requests.get(f"{url}/history/{long_id}").json()[long_id]["status"]["completed"] is True
    assert requests.get(f"{url}/queue").json() == {"queue_running": [], "queue_pending": []}


def test_interrupt_by_prompt_id_and_queue_delete(comfy):
    import websocket

    server, url, port = comfy
    ws = websocket.WebSocket()
    ws.connect(f"ws://127.0.0.1:{port}/ws?clientId=stopper")
    running = requests.post(f"{url}/prompt", json={"prompt": graph(**{"3__steps": 400}), "client_id": "stopper"}).json()
    waiting = requests.post(f"{url}/prompt", json={"prompt": graph(), "client_id": "stopper"}).json()
    assert requests.post(f"{url}/queue", json={"delete": [waiting["prompt_id"]]}).status_code == 200
    while server.jobs.find(running["prompt_id"]).step < 2:
        time.sleep(0.02)
    assert requests.post(f"{url}/interrupt", json={"prompt_id": running["prompt_id"]}).status_code == 200
    seen = messages_until_done(ws, running["prompt_id"])
    seen = messages_until_done(ws, waiting["prompt_id"], seen)  # the two end in either order
    mine = [(kind, data) for kind, data in seen if isinstance(data, dict) and data.get("prompt_id") == running["prompt_id"]]
    assert "execution_interrupted" in [kind for kind, _ in mine]
    history = requests.get(f"{url}/history/{running['prompt_id']}").json()[running["prompt_id"]]
    assert history["status"]["status_str"] == "error" and history["outputs"] == {}
    theirs = [kind for kind, data in seen if isinstance(data, dict) and data.get("prompt_id") == waiting["prompt_id"]]
    assert "execution_start" not in theirs and "progress" not in theirs  # deleted from the queue: it never ran
    assert server.jobs.find(waiting["prompt_id"]).status == "interrupted"
    ws.close()


@pytest.mark.parametrize("prompt, kind, says", [
    ({"1": {"class_type": "ETN_LoadImageCache", "inputs": {}}}, "invalid_prompt",
     "Cannot execute because node ETN_LoadImageCache does not exist."),
    ({"4": DEFAULT["4"]}, "prompt_no_outputs", "Prompt has no outputs"),
    ({}, "no_prompt", "No prompt provided"),
])
def test_graphs_that_are_not_prompts_get_comfyuis_400(comfy, prompt, kind, says):
    server, url, _ = comfy
    reply = requests.post(f"{url}/api/prompt", json={"prompt": prompt})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == kind
    assert reply.json()["error"]["message"].startswith(says)


@pytest.mark.parametrize("changes, node, says", [
    ({"4__ckpt_name": "v1-5.safetensors"}, "4", "Value not in list: ckpt_name"),
    ({"3__sampler_name": "uni_pc"}, "3", "Value not in list: sampler_name: 'uni_pc'"),
    ({"3__steps": 0}, "3", "steps must be from 1"),
    ({"3__cfg": float("nan")}, "3", "cfg must be a number"),
    ({"3__denoise": 0.5}, "3", "denoise below 1 needs a picture"),
    ({"8__vae": ["3", 0]}, "3", "sd reads a VAE only from CheckpointLoaderSimple"),
])
def test_nodes_that_do_not_reduce_are_named(comfy, changes, node, says):
    server, url, _ = comfy
    reply = requests.post(f"{url}/prompt", data=json.dumps({"prompt": graph(**changes)}, allow_nan=True))
    assert reply.status_code == 400, reply.text
    errors = reply.json()["node_errors"]
    assert list(errors) == [node] and says in errors[node]["errors"][0]["message"]


def test_view_and_upload_stay_in_their_folders(comfy):
    server, url, _ = comfy
    assert requests.get(f"{url}/view", params={"filename": "../../etc/passwd"}).status_code == 422
    assert requests.get(f"{url}/view", params={"filename": "passwd", "subfolder": "../../../etc"}).status_code == 403
    assert requests.get(f"{url}/view", params={"filename": "x.png", "type": "models"}).status_code == 422
    assert requests.get(f"{url}/view", params={"filename": "missing.png"}).status_code == 404
    bad = requests.post(f"{url}/upload/image", files={"image": ("x.html", b"<script>", "text/html")})
    assert bad.status_code == 422 and "uploads are pictures" in bad.json()["detail"]
    climbing = requests.post(f"{url}/upload/image", files={"image": ("x.png", b"png", "image/png")},
                             data={"subfolder": "../../x"})
    assert climbing.status_code == 422 and not (server.outdir / "x").exists()


def test_the_socket_needs_the_servers_credentials(tmp_path):
    import websocket

    from ldm.pipeline import Pipeline
    from ldm.serve.app import Server

    server = Server(Pipeline.load(device="cpu", precision="full", quiet=True), outdir=tmp_path)
    with serving(server, auth=("user", "pass")) as (url, port):
        with pytest.raises(websocket.WebSocketBadStatusException):
            websocket.create_connection(f"ws://127.0.0.1:{port}/ws?clientId=x")
        token = base64.b64encode(b"user:pass").decode()
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws?clientId=x", header=[f"Authorization: Basic {token}"])
        assert json.loads(ws.recv())["type"] == "status"
        ws.close()
        assert requests.get(f"{url}/object_info").status_code == 401


def test_controlnet_nodes_draw_what_the_a1111_controlnet_unit_draws(comfy, tmp_path):
    """ControlNetLoader + ControlNetApplyAdvanced (issue 35's ComfyUI nodes) against the same unit through
    alwayson_scripts.controlnet: the same pixels; ControlNetApply on the positive prompt alone is refused."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ldm.control.apply import controlnet_config
    from ldm.loading.families import DEMO_CONFIG
    from ldm.modules.diffusionmodules.controlnet import ControlNet
    from ldm.util import load_config
    from tests.tinyckpt import randomize_

    server, url, _ = comfy
    params = OmegaConf.to_container(load_config(DEMO_CONFIG).model.params.unet_config.params, resolve=True)
    net = randomize_(ControlNet(**controlnet_config(params, 3, 4)["params"]), 0)
    folder = tmp_path / "controlnet"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "control_demo.safetensors"))
    server.controlnet_dir = folder
    edges = np.zeros((256, 256, 3), np.uint8)
    edges[64:192, 64:192] = 255
    data = io.BytesIO()
    Image.fromarray(edges).save(data, format="PNG")
    requests.post(f"{url}/upload/image", files={"image": ("edges.png", data.getvalue(), "image/png")},
                  data={"overwrite": "true"})
    info = requests.get(f"{url}/object_info/ControlNetLoader").json()
    assert info["ControlNetLoader"]["input"]["required"]["control_net_name"][0] == ["control_demo.safetensors"]
    prompt = graph(**{"3__positive": ["21", 0], "3__negative": ["21", 1]})
    prompt.update({"20": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "control_demo.safetensors"}},
                   "22": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}},
                   "21": {"class_type": "ControlNetApplyAdvanced", "inputs": {
                       "positive": ["6", 0], "negative": ["7", 0], "control_net": ["20", 0], "image": ["22", 0],
                       "strength": 0.8, "start_percent": 0.0, "end_percent": 0.5}}})
    prompt_id = requests.post(f"{url}/prompt", json={"prompt": prompt}).json()["prompt_id"]
    while not (entry := requests.get(f"{url}/history/{prompt_id}").json()):
        time.sleep(0.1)
    assert entry[prompt_id]["status"]["status_str"] == "success", entry[prompt_id]["status"]
    png = requests.get(f"{url}/view", params=entry[prompt_id]["outputs"]["9"]["images"][0]).content
    unit = {"model": "control_demo", "module": "none", "image": base64.b64encode(data.getvalue()).decode(),
            "weight": 0.8, "guidance_start": 0.0, "guidance_end": 0.5, "control_mode": "Balanced",
            "resize_mode": "Crop and Resize"}
    same = requests.post(f"{url}/sdapi/v1/txt2img", json={**SAME_ON_A1111, "alwayson_scripts": {
        "controlnet": {"args": [unit]}}}).json()
    plain = requests.post(f"{url}/sdapi/v1/txt2img", json=SAME_ON_A1111).json()
    drawn = np.asarray(Image.open(io.BytesIO(png)))
    assert np.array_equal(drawn, np.asarray(Image.open(io.BytesIO(base64.b64decode(same["images"][0])))))
    assert not np.array_equal(drawn, np.asarray(Image.open(io.BytesIO(base64.b64decode(plain["images"][0])))))
    one_sided = graph(**{"3__positive": ["23", 0]})
    one_sided.update({"20": prompt["20"], "22": prompt["22"], "23": {"class_type": "ControlNetApply", "inputs": {
        "conditioning": ["6", 0], "control_net": ["20", 0], "image": ["22", 0], "strength": 1.0}}})
    reply = requests.post(f"{url}/prompt", json={"prompt": one_sided})
    assert reply.status_code == 400 and "sd applies a ControlNet to both prompts" in \
        reply.json()["node_errors"]["23"]["errors"][0]["message"]
    server.controlnet_dir = None

