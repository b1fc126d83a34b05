"""What choosing the config from a checkpoint costs, and what switching models in one Pipeline takes.

    .venv/bin/python benchmarks/detect_and_switch.py [auto|full]

On two full-size random-weight v2-inference checkpoints (benchmarks/fullsize.py): load without --config
(keys + eps/v probe), the probe timed in turns with one guided UNet step at 512x512 (the sampler's
per-step cost), then Pipeline.load_model to the second checkpoint and the resident memory around it.
Random weights make the probe's answer meaningless; its cost is what is measured. Not part of the tests.
"""
from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fullsize import checkpoint_for  # noqa: E402

from ldm.loading import detect  # noqa: E402
from ldm.pipeline import Pipeline  # noqa: E402
from ldm.runtime.policy import autocast_context  # noqa: E402


def resident_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 30


def peak_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2 ** 20


def probe_against_step(model, turns: int = 3) -> None:
    x, t = torch.randn(2, 4, 64, 64), torch.full((2,), 500.0)
    with torch.inference_mode(), autocast_context(model):
        cond = model.make_cond(model.get_learned_conditioning(["", ""]))
    for _ in range(turns):  # A B A B: the cores are shared and noisy
        start = time.perf_counter()
        detect.probe_parameterization(model)
        probe = time.perf_counter() - start
        with torch.inference_mode(), autocast_context(model):
            start = time.perf_counter()
            model.apply_model(x, t, cond)
            step = time.perf_counter() - start
        print(f"probe {probe:.3f} s, guided UNet step at 512x512 {step:.3f} s, ratio {probe / step:.2f}", flush=True)


def main() -> None:
    precision = sys.argv[1] if len(sys.argv) > 1 else "auto"
    first, second = checkpoint_for("v2-inference.yaml", seed=0), checkpoint_for("v2-inference.yaml", seed=1)
    before = resident_gib()
    start = time.perf_counter()
    pipe = Pipeline.load(first, device="cpu", precision=precision)
    print(f"load without --config ({pipe.model.runtime.precision.mode}): {time.perf_counter() - start:.1f} s, "
          f"resident {before:.2f} -> {resident_gib():.2f} GiB", flush=True)
    probe_against_step(pipe.model)
    gc.collect()
    held = resident_gib()
    start = time.perf_counter()
    pipe.load_model(second)
    print(f"load_model(second): {time.perf_counter() - start:.1f} s, resident {held:.2f} -> {resident_gib():.2f} GiB, "
          f"peak {peak_gib():.2f} GiB", flush=True)
    pipe.close()
    print(f"Pipeline.close(): resident {resident_gib():.2f} GiB")


if __name__ == "__main__":
    main()
