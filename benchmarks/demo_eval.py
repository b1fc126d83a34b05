"""Measure the shipped demo model as tests/test_demo_model.py does, and draw the docs' figures.

.venv/bin/python benchmarks/demo_eval.py [--ckpt checkpoints/demo/demo.safetensors] [--steps 20] [--scale 5]
Writes checkpoints/demo/samples.png (the 40 held-out samples) and checkpoints/demo/loss.png (training curves).
"""
import argparse
import time
from pathlib import Path

import torch

from ldm.loading.build import load_model
from ldm.training.evaluate import contact_sheet, evaluate
from ldm.training.plot import plot_losses, read_losses

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "checkpoints" / "demo" / "train-logs"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", default=str(ROOT / "checkpoints/demo/demo.safetensors"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=5.0)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(ROOT / "configs/demo/demo-inference.yaml", args.ckpt).float().eval()
    start = time.perf_counter()
    for wording in ("train", "heldout"):  # the held-out result (last) is the one drawn
        result = evaluate(model, 40, steps=args.steps, scale=args.scale, sampler=args.sampler, seed=args.seed,
                          wording=wording)
        print(f"{wording} wording, {args.sampler} steps {args.steps} scale {args.scale}: colours "
              f"{result.colors:.3f} shapes {result.shapes:.3f} background {result.backgrounds:.3f} "
              f"foreground {result.foregrounds:.3f} ({time.perf_counter() - start:.1f}s)")
        for prompt, reading in list(zip(result.prompts, result.readings))[:4]:
            print(f"  {prompt!r} -> {reading.color} {reading.shape} on {reading.background}")
    if args.no_figures:
        return
    contact_sheet(result.images).save(ROOT / "checkpoints/demo/samples.png")
    draw_losses()


def draw_losses():
    panels = []
    for name, title in (("demo-autoencoder-loss.csv", "autoencoder (L1 + L2 + KL, 128px shape crops)"),
                        ("demo-diffusion-loss.csv", "UNet + text tower (v-prediction MSE; lr to zero over the last "
                                                    "quarter)")):
        if (TRAIN / name).is_file():
            panels.append((title, read_losses(TRAIN / name)))
    plot_losses(panels, ROOT / "checkpoints/demo/loss.png")

if __name__ == "__main__":
    main()
