"""The GPU check (issue 17): sd on one NVIDIA GPU against diffusers, written as a markdown report.

    benchmarks/gpu_check.sh [REPORT.md]          # on a GPU machine: full-size random weights, built here
    .venv/bin/python benchmarks/gpu_check.py --dry-run --out report.md   # the same steps on the CPU, tiny

Sections: the UNet guidance step (batch 2) at 512 and 768 in fp16 and bf16, torch.compile off and on,
against diffusers' UNet2DConditionModel holding the same weights (benchmarks/peer.py), timed in turns
with CUDA synchronisation; the 2.1-v-shaped model in fp16 with and without the float32 attention upcast
(finite or not); end to end 768x768 25-step txt2img, one image and a batch of 8; peak GPU memory of each;
one image of each task (tiny checkpoints: the tasks' GPU paths, not their quality).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ldm.loading.build import load_model  # noqa: E402
from ldm.runtime.policy import RuntimeOptions  # noqa: E402


class Check:
    """The run's settings: full size on CUDA, or the tiny dry run on the CPU."""

    def __init__(self, dry: bool, folder: Path):
        self.dry, self.folder = dry, folder
        self.device = "cpu" if dry else "cuda"
        self.sizes = [256] if dry else [512, 768]
        self.precisions = ["full"] if dry else ["fp16", "bf16"]
        self.compiles = [False] if dry else [False, True]
        self.turns = 2 if dry else 5
        self.lines: list[str] = []

    def checkpoint(self, kind: str) -> tuple[Path, Path]:
        """(config, checkpoint) of a txt2img kind ("eps" or "v"): tiny ones built here, or full-size random ones."""
        if self.dry:
            from tests.tinyckpt import build_tiny, save_tiny

            name = {"eps": "tiny-v2-inference.yaml", "v": "tiny-v2-inference-v.yaml"}[kind]
            return ROOT / "tests/configs" / name, save_tiny(build_tiny(name, 1), self.folder / f"{kind}.safetensors")
        from fullsize import checkpoint_for

        name = {"eps": "v2-inference.yaml", "v": "v2-inference-v.yaml"}[kind]
        return ROOT / "configs/stable-diffusion" / name, checkpoint_for(name)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def peak(self) -> str:
        if self.device != "cuda":
            return "-"
        value = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
        return f"{value:.2f} GiB"

    def timed(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def unet_steps(check: Check) -> None:
    """sd's UNet against diffusers' on the same weights, per precision, size and compile setting."""
    from peer import diffusers_unet

    from ldm.loading.checkpoint import read_state_dict

    config, ckpt = check.checkpoint("eps")
    check.lines += ["## UNet guidance step (batch 2)", "",
                    "| precision | size | compile | sd | diffusers | sd / diffusers | peak |", "| --- " * 7 + "|"]
    for precision in check.precisions:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "full": torch.float32}[precision]
        peer = diffusers_unet(config, read_state_dict(ckpt), dtype).to(check.device)
        for compile_ in check.compiles:
            ours = load_model(config, ckpt, RuntimeOptions(check.device, precision, compile=compile_))
            unet = ours.model.diffusion_model
            theirs = torch.compile(peer) if compile_ else peer
            for size in check.sizes:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(check.device, dtype)
                t = torch.tensor([500.0, 500.0], device=check.device)
                c = torch.randn(2, 77, unet.context_dim, generator=g).to(check.device, dtype)
                times = {"sd": [], "diffusers": []}
                with torch.inference_mode():
                    unet(x, t, c), theirs(x, t, encoder_hidden_states=c)  # warm-up (and compile)
                    for _ in range(check.turns):  # A B A B
                        times["sd"].append(check.timed(lambda: unet(x, t, c)))
                        times["diffusers"].append(check.timed(lambda: theirs(x, t, encoder_hidden_states=c)))
                a, b = statistics.median(times["sd"]), statistics.median(times["diffusers"])
                check.lines.append(f"| {precision} | {size} | {'on' if compile_ else 'off'} | {a * 1000:.1f} ms | "
                                   f"{b * 1000:.1f} ms | {a / b:.2f} | {check.peak()} |")
            ours = unet = None  # free this variant before the next loads
        peer = None
    check.lines.append("")


def v_model_half(check: Check) -> None:
    """The 2.1-v-shaped model in fp16: finite outputs with the float32 attention upcast, and without."""
    config, ckpt = check.checkpoint("v")
    precision = "full" if check.dry else "fp16"
    model = load_model(config, ckpt, RuntimeOptions(check.device, precision))
    g = torch.Generator().manual_seed(1)
    size = check.sizes[-1] // 8
    x = torch.randn(2, 4, size, size, generator=g).to(check.device)
    cond = model.make_cond(model.get_learned_conditioning(["a photograph", ""]).to(check.device))
    check.lines += ["## 2.1-v shape in fp16", "", "| attention | finite outputs |", "| --- | --- |"]
    for upcast in ("fp32", "fp16"):
        os.environ["ATTN_PRECISION"] = upcast
        with torch.inference_mode():
            out = model.apply_model(x, torch.tensor([999.0, 999.0], device=check.device), cond)
        check.lines.append(f"| ATTN_PRECISION={upcast} | {bool(torch.isfinite(out).all())} |")
    os.environ.pop("ATTN_PRECISION", None)
    check.lines.append("")


def end_to_end(check: Check) -> None:
    """txt2img of the v model at its size: one image and a batch of 8, time and peak memory."""
    from ldm.pipeline import Pipeline

    config, ckpt = check.checkpoint("v")
    pipe = Pipeline.load(ckpt, config, device=check.device, precision="full" if check.dry else "fp16", quiet=True)
    size, steps = (256, 2) if check.dry else (768, 25)
    check.lines += [f"## End to end txt2img {size}x{size}, {steps} steps (fp16)", "",
                    "| images | seconds | peak |", "| --- | --- | --- |"]
    for batch in (1, 2 if check.dry else 8):
        seconds = check.timed(lambda: pipe.txt2img("a lighthouse at dawn", seed=1, steps=steps, width=size,
                                                   height=size, batch_size=batch))
        check.lines.append(f"| {batch} | {seconds:.1f} | {check.peak()} |")
    check.lines.append("")


def every_task(check: Check) -> None:
    """One image of each task on the device (tiny checkpoints: the code paths, not the pictures)."""
    from PIL import Image

    from ldm.pipeline import Pipeline
    from tests.tinyckpt import build_tiny, save_tiny

    picture = Image.new("RGB", (256, 256), (120, 80, 40))
    mask = Image.new("L", (256, 256))
    mask.paste(255, (64, 64, 192, 192))
    runs = {"txt2img": ("tiny-v2-inference.yaml", lambda p: p.txt2img("x", width=256, height=256, steps=2, seed=1)),
            "img2img": ("tiny-v2-inference.yaml", lambda p: p.img2img(picture, "x", steps=2, seed=1)),
            "inpaint": ("tiny-v2-inpainting.yaml", lambda p: p.inpaint(picture, mask, "x", steps=2, seed=1)),
            "depth2img": ("tiny-v2-midas.yaml", lambda p: p.depth2img(picture, "x", steps=2, seed=1)),
            "upscale": ("tiny-x4-upscaling.yaml", lambda p: p.upscale(picture.resize((64, 64)), "x", steps=2, seed=1))}
    check.lines += ["## One image of each task (tiny checkpoints)", "", "| task | image | seconds |", "| --- | --- | --- |"]
    for task, (name, run) in runs.items():
        ckpt = save_tiny(build_tiny(name, 2), check.folder / f"{task}.safetensors")
        pipe = Pipeline.load(ckpt, ROOT / "tests/configs" / name, device=check.device, precision="full", quiet=True)
        start = time.perf_counter()
        image = run(pipe)[0]
        path = check.folder / f"{task}.png"
        path.write_bytes(image.png())
        check.lines.append(f"| {task} | {image.image.size[0]}x{image.image.size[1]} | {time.perf_counter() - start:.1f} |")
    check.lines.append("")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU (what CI can run)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.md"))
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the CPU rehearsal", file=sys.stderr)
        return 1
    check = Check(args.dry_run, Path(tempfile.mkdtemp(prefix="sd-gpu-check-")))
    name = "CPU dry run (tiny models)" if args.dry_run else torch.cuda.get_device_name(0)
    check.lines += [f"# sd GPU check: {name}", "", f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}", ""]
    for section in (unet_steps, v_model_half, end_to_end, every_task):
        start = time.perf_counter()
        section(check)
        print(f"{section.__name__}: {time.perf_counter() - start:.1f} s", flush=True)
    args.out.write_text("\n".join(check.lines) + "\n")
    print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
