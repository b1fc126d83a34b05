"""Where a UNet guidance step's time goes: sd's and diffusers' UNets side by side under torch.profiler.

    python benchmarks/profile_unet.py [--size 512] [--precision bf16] [--rows 25]

Full-size random SD 2 base weights (benchmarks/fullsize.py), batch 2 (a guidance step), one warm-up call
each, then A B A B timing and one profiled call each; prints the median times and, per model, the ops that
take the most self CPU time. Not a test.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fullsize import checkpoint_for
    from run import BASE, build_unet_variants

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--reps", type=int, default=3)
    ns = parser.parse_args()
    names = [f"sd-{ns.precision}", f"diffusers-{ns.precision}"]
    calls = build_unet_variants(names, checkpoint_for(BASE.name))
    g = torch.Generator().manual_seed(0)
    latent = ns.size // 8
    inputs = (torch.randn(2, 4, latent, latent, generator=g), torch.tensor([500.0, 500.0]),
              torch.randn(2, 77, 1024, generator=g))
    times = {name: [] for name in names}
    with torch.inference_mode():
        for call in calls.values():
            call(*inputs)
        for _ in range(ns.reps):
            for name, call in calls.items():
                start = time.perf_counter()
                call(*inputs)
                times[name].append(time.perf_counter() - start)
        for name in names:
            print(f"{name}: median {statistics.median(times[name]):.2f} s, min {min(times[name]):.2f} s "
                  f"({torch.get_num_threads()} threads, {ns.size}x{ns.size}, batch 2)")
        for name, call in calls.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                call(*inputs)
            print(f"\n== {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=ns.rows))


if __name__ == "__main__":
    main()
