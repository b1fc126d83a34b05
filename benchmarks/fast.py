"""Time to a picture on the CPU: whole Pipeline.generate() seconds at 512 after loading, for the settings people
choose when they want a picture fast, on full-size random SD 2.x base weights (benchmarks/fullsize.py) and a
random TAESD of the published shapes; then token merging against none, per UNet step at 512 and 768.

Rows (each on PyTorch and on --backend openvino; one pipeline per backend, its shapes converted and warmed up
before any timing, then the rows timed in turns A B C D E A B C D E ... and reported as medians):
  sd-25-ddim        25 DDIM steps, guidance 9, the full VAE (sd's defaults for an SD 2 checkpoint)
  dpmpp-2m-15       DPM++ 2M Karras, 15 steps, guidance 9, full VAE
  turbo-1-full      SD-Turbo's way: 1 Euler a step, trailing, no guidance, full VAE
  turbo-1-taesd     the same, decoded by TAESD
  turbo-4-taesd     4 steps, TAESD
Targets (issue 32): turbo-1-taesd at most 0.03x sd-25-ddim; ToMe 0.5 at 768 at most 0.75x per step.

    .venv/bin/python benchmarks/fast.py [--reps 2] [--backends torch,openvino] [--rows ...] [--tome-sizes 512,768]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PROMPT = "a professional photograph of an astronaut riding a horse"
ROWS = {
    "sd-25-ddim": dict(steps=25, sampler="ddim", scale=9.0),
    "dpmpp-2m-15": dict(steps=15, sampler="dpmpp_2m", schedule="karras", scale=9.0),
    "turbo-1-full": dict(steps=1, sampler="euler_a", schedule="trailing", scale=1.0),
    "turbo-1-taesd": dict(steps=1, sampler="euler_a", schedule="trailing", scale=1.0, decode="taesd"),
    "turbo-4-taesd": dict(steps=4, sampler="euler_a", schedule="trailing", scale=1.0, decode="taesd"),
}


def random_taesd(folder: Path) -> Path:
    """A TAESD decoder/encoder pair of the published shapes with seeded random weights (timing only)."""
    import torch

    from ldm.models.taesd import TinyAutoencoder
    from tests.tinyckpt import randomize_

    decoder = folder / "taesd_decoder.pth"
    if not decoder.exists():
        model = randomize_(TinyAutoencoder(), 0)
        torch.save(model.decoder.state_dict(), decoder)
        torch.save(model.encoder.state_dict(), folder / "taesd_encoder.pth")
    return decoder


def time_rows(backend: str, rows: list[str], reps: int, ckpt: Path, taesd: Path) -> dict:
    import torch

    from ldm.pipeline import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.load(ckpt, REPO / "configs" / "stable-diffusion" / "v2-inference.yaml", device="cpu",
                         precision="full", backend=backend, quiet=True, taesd=taesd)
    loaded = time.perf_counter() - start
    settings = {name: dict(ROWS[name], width=512, height=512, seed=1) for name in rows}
    start = time.perf_counter()
    for guided in (True, False):  # every shape converted and compiled (OpenVINO) before any timing
        pipe.txt2img(PROMPT, width=512, height=512, steps=1, sampler="euler", scale=9.0 if guided else 1.0,
                     decode="full")
    pipe.txt2img(PROMPT, width=512, height=512, steps=1, sampler="euler", scale=1.0, decode="taesd")
    warm = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(reps):
        for name in rows:
            t0 = time.perf_counter()
            image, = pipe.txt2img(PROMPT, **settings[name])
            times[name].append(time.perf_counter() - t0)
    return {"load_s": loaded, "warmup_s": warm, "times": times, "threads": torch.get_num_threads()}


def time_tome(sizes: list[int], reps: int, ckpt: Path, ratio: float = 0.5) -> dict:
    """One guided UNet call (batch 2) with and without token merging, alternated."""
    import torch

    from ldm.modules.tome import token_merging
    from ldm.pipeline import Pipeline

    pipe = Pipeline.load(ckpt, REPO / "configs" / "stable-diffusion" / "v2-inference.yaml", device="cpu",
                         precision="full", quiet=True)
    unet = pipe.model.model.diffusion_model
    out = {}
    for size in sizes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, size // 8, size // 8, generator=g)
        t = torch.tensor([500.0, 500.0])
        c = torch.randn(2, 77, 1024, generator=g)
        times = {"none": [], f"tome-{ratio}": []}
        with torch.inference_mode():
            for rep in range(reps + 1):  # the first round warms up
                for name in times:
                    t0 = time.perf_counter()
                    with token_merging(unet, ratio if name != "none" else 0.0):
                        unet(x, t, context=c)
                    if rep:
                        times[name].append(time.perf_counter() - t0)
        out[str(size)] = times
    return out


def machine() -> str:
    from run import machine as describe

    return describe()


def report(res: dict) -> str:
    med = statistics.median
    lines = [f"date: {res['date']}", f"machine: {res['machine']}", f"command: {res['command']}", "",
             "Time to a picture: whole generate() at 512x512, one image, after loading (median of "
             f"{res['reps']}; seconds)", "",
             "| row | " + " | ".join(res["backends"]) + " | ratio to sd-25-ddim (" + res["backends"][0] + ") |",
             "| --- | " + " | ".join("---" for _ in res["backends"]) + " | --- |"]
    first = res["rows"][res["backends"][0]]
    for name in first["times"]:
        cells = [f"{med(res['rows'][b]['times'][name]):.2f}" for b in res["backends"]]
        base = first["times"].get("sd-25-ddim")
        ratio = f"{med(first['times'][name]) / med(base):.4f}" if base else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    lines += ["", "load / warm-up s: " + ", ".join(f"{b} {res['rows'][b]['load_s']:.1f} / "
                                                  f"{res['rows'][b]['warmup_s']:.1f}" for b in res["backends"]), ""]
    if res.get("tome"):
        lines += ["Token merging (tomesd's rules, ratio 0.5) per guided UNet step (batch 2), PyTorch fp32", "",
                  "| size | none s | ToMe 0.5 s | ratio |", "| --- | --- | --- | --- |"]
        for size, times in res["tome"].items():
            none, merged = med(times["none"]), med(next(v for k, v in times.items() if k != "none"))
            lines.append(f"| {size} | {none:.2f} | {merged:.2f} | {merged / none:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--backends", default="torch,openvino")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--tome-sizes", default="512,768", help="'' to skip the token merging rows")
    parser.add_argument("--tome-reps", type=int, default=2)
    ns = parser.parse_args()
    from fullsize import cache_dir, checkpoint_for

    ckpt = checkpoint_for("v2-inference.yaml")
    taesd = random_taesd(cache_dir())
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "command": " ".join(["python"] + sys.argv),
           "reps": ns.reps, "backends": ns.backends.split(","), "rows": {}}
    for backend in res["backends"]:
        print(f"- {backend}", file=sys.stderr, flush=True)
        res["rows"][backend] = time_rows(backend, ns.rows.split(","), ns.reps, ckpt, taesd)
    if ns.tome_sizes:
        print("- token merging", file=sys.stderr, flush=True)
        res["tome"] = time_tome([int(s) for s in ns.tome_sizes.split(",")], ns.tome_reps, ckpt)
    out = cache_dir() / f"fast-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=1))
    print(report(res))
    print(f"\n(raw results: {out})")


if __name__ == "__main__":
    main()
