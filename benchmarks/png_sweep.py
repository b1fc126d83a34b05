"""Thirty PNGs through every front end, for before/after comparisons of refactors (not a test).

    python benchmarks/png_sweep.py OUT.json      # writes {name: [sha256 of the pixels, parameters text]}
    python benchmarks/png_sweep.py --compare A.json B.json

Runs the demo model and tiny random-weight checkpoints (tests/tinyckpt.py) through the commands (plain,
prompt files with their own settings, --fixed_code, --from-image, img2img, inpaint, upscale), the Python
API and the A1111 API, on a small fixed set of samplers and sizes. Pixels and the "parameters" text are
recorded separately, so a change of metadata is told apart from a change of pixels.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def digest(png: bytes) -> list[str]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        pixels = hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()[:16]
        return [pixels, im.info.get("parameters", "")]


def sweep(out: Path) -> dict:
    import numpy as np
    from PIL import Image

    import ldm.loading.detect as detect
    from ldm.cli.entry import main
    from tests.tinyckpt import build_tiny, save_tiny

    # tiny random UNets predict neither eps nor v: take the config's word (as the test suite does)
    detect.probe_parameterization = lambda model: (model.parameterization, 1.0)
    work = Path(tempfile.mkdtemp())
    ckpts = {}
    for kind, cfg in (("eps", "tiny-v2-inference.yaml"), ("inpaint", "tiny-v2-inpainting.yaml"),
                      ("x4", "tiny-x4-upscaling.yaml")):
        ckpts[kind] = (str(save_tiny(build_tiny(cfg, seed=3), work / f"{kind}.safetensors")),
                       str(ROOT / "tests" / "configs" / cfg))
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    photo = Image.fromarray((np.stack([xx, yy, xx * yy], -1) * 255).astype(np.uint8))
    photo.save(work / "photo.png")
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 192))
    mask.save(work / "mask.png")
    small = photo.resize((64, 64))
    small.save(work / "small.png")
    (work / "prompts.jsonl").write_text(
        '{"prompt": "a red circle", "seed": 5, "steps": 4}\n'
        '{"prompt": "a blue square", "sampler": "euler_a", "eta": 0.5, "size": "256x320"}\n'
        '{"prompt": "two green triangles", "negative_prompt": "blur", "scale": 3.0}\n')
    results: dict = {}

    def command(name: str, *argv: str) -> None:
        outdir = work / name
        rc = main([*argv, "--outdir", str(outdir)])
        if rc != 0:
            raise SystemExit(f"{name}: exit {rc}")
        for path in sorted((outdir / "samples").glob("*.png")):
            results[f"{name}/{path.name}"] = digest(path.read_bytes())

    demo = ["txt2img", "--prompt", "a red circle on a blue background", "--steps", "3", "--n_iter", "1"]
    command("demo-ddim", *demo, "--n_samples", "2")
    command("demo-euler_a", *demo, "--n_samples", "1", "--sampler", "euler_a")
    command("demo-eta0", *demo, "--n_samples", "1", "--sampler", "euler_a", "--ddim_eta", "0")
    command("demo-dpm", *demo, "--n_samples", "1", "--dpm", "--seed", "7", "--scale", "3")
    command("demo-fixed", *demo, "--n_samples", "2", "--fixed_code", "--plms", "--negative-prompt", "blur")
    command("demo-clipskip", *demo, "--n_samples", "1", "--clip-skip", "2", "--emphasis", "none",
            "--prompt", "a (red:1.3) circle")
    command("demo-file", "txt2img", "--from-file", str(work / "prompts.jsonl"), "--steps", "3", "--n_samples", "2",
            "--n_iter", "1", "--repeat", "2")
    first = sorted((work / "demo-ddim" / "samples").glob("*.png"))[1]
    command("demo-reproduce", "txt2img", "--from-image", str(first))
    eps, cfg = ckpts["eps"]
    command("tiny-txt2img", "txt2img", "--prompt", "a cat", "--ckpt", eps, "--config", cfg, "--H", "256", "--W", "320",
            "--steps", "2", "--n_samples", "1", "--n_iter", "2", "--sampler", "dpmpp_2m", "--schedule", "karras")
    command("tiny-img2img", "img2img", "--prompt", "a cat", "--init-img", str(work / "photo.png"), "--ckpt", eps,
            "--config", cfg, "--steps", "4", "--n_samples", "1", "--n_iter", "1", "--strength", "0.5")
    inpaint, icfg = ckpts["inpaint"]
    command("tiny-inpaint", "inpaint", "--prompt", "a cat", "--image", str(work / "photo.png"), "--mask",
            str(work / "mask.png"), "--ckpt", inpaint, "--config", icfg, "--steps", "3", "--n_samples", "2",
            "--n_iter", "1")
    x4, xcfg = ckpts["x4"]
    command("tiny-upscale", "upscale", "--prompt", "a cat", "--image", str(work / "small.png"), "--ckpt", x4,
            "--config", xcfg, "--steps", "2", "--n_samples", "1", "--n_iter", "1")

    from ldm.pipeline import Pipeline

    pipe = Pipeline.load(quiet=True)
    for i, image in enumerate(pipe.txt2img("a yellow star", seed=11, steps=3, batch_size=2, sampler="euler")):
        results[f"python/txt2img-{i}"] = digest(image.png())
    for i, image in enumerate(pipe.img2img(work / "photo.png", "a yellow star", seed=12, steps=4, strength=0.6)):
        results[f"python/img2img-{i}"] = digest(image.png())

    pipe.load_model(inpaint, icfg, quiet=True)
    for i, image in enumerate(pipe.inpaint(work / "photo.png", work / "mask.png", "a cat", seed=13, steps=3)):
        results[f"python/inpaint-{i}"] = digest(image.png())
    pipe.load_model(quiet=True)

    from fastapi.testclient import TestClient

    from ldm.serve.app import Server, build_app

    server = Server(pipe)
    client = TestClient(build_app(server, page=False))
    bodies = {
        "api/txt2img": ("txt2img", {"prompt": "a purple moon", "seed": 21, "steps": 3, "width": 256, "height": 256,
                                    "sampler_name": "DPM++ 2M", "scheduler": "Karras", "batch_size": 2}),
        "api/txt2img-euler_a": ("txt2img", {"prompt": "a purple moon", "seed": 22, "steps": 3, "sampler_name": "Euler a",
                                            "cfg_scale": 4, "eta": 1.0}),
        "api/img2img": ("img2img", {"prompt": "a purple moon", "seed": 23, "steps": 4, "denoising_strength": 0.5,
                                    "init_images": [base64.b64encode((work / "photo.png").read_bytes()).decode()]}),
        "api/inpaint": ("img2img", {"prompt": "a purple moon", "seed": 24, "steps": 3, "denoising_strength": 0.9,
                                    "init_images": [base64.b64encode((work / "photo.png").read_bytes()).decode()],
                                    "mask": base64.b64encode((work / "mask.png").read_bytes()).decode(),
                                    "inpaint_full_res": False}),
    }
    for name, (route, body) in bodies.items():
        reply = client.post(f"/sdapi/v1/{route}", json=body)
        if reply.status_code != 200:
            raise SystemExit(f"{name}: HTTP {reply.status_code} {reply.text}")
        for i, data in enumerate(reply.json()["images"]):
            results[f"{name}-{i}"] = digest(base64.b64decode(data))
    out.write_text(json.dumps(results, indent=1, sort_keys=True))
    return results


def compare(a: Path, b: Path) -> int:
    before, after = json.loads(a.read_text()), json.loads(b.read_text())
    pixels = [k for k in before if k in after and before[k][0] != after[k][0]]
    texts = [k for k in before if k in after and before[k][1] != after[k][1]]
    print(f"{len(before)} before, {len(after)} after; missing {sorted(set(before) - set(after))}, "
          f"new {sorted(set(after) - set(before))}")
    print(f"pixels differ: {pixels or 'none'}")
    for k in texts:
        print(f"parameters differ: {k}\n  before: {before[k][1]!r}\n  after:  {after[k][1]!r}")
    return 1 if pixels or texts or set(before) != set(after) else 0


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        raise SystemExit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    print(f"{len(sweep(Path(sys.argv[1])))} PNGs")
