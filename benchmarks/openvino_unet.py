"""The UNet guidance step at 512x512 (batch 2) in PyTorch and in OpenVINO, on full-size random weights.

    .venv/bin/python benchmarks/openvino_unet.py

One process: the checkpoint (benchmarks/fullsize.py) is loaded once per backend, conversion and compile
are timed, then the steps are timed in turns (torch fp32, openvino f32: A B A B ...) and reported as
medians and ratios to torch fp32, with the relative error. (OpenVINO's bf16 hint, measured once at 0.28x
the time but 0.54 relative error, is not offered: docs/benchmarks.md.)
Not part of the tests.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fullsize import checkpoint_for  # noqa: E402

from ldm.loading.build import load_model  # noqa: E402
from ldm.runtime.policy import RuntimeOptions  # noqa: E402


def main(turns: int = 4) -> None:
    """argv: [--cache DIR] (reuse converted / quantised models there; default a cold cache, timed)
    [--variants a,b] (of: torch fp32, openvino f32, openvino int8 weights, openvino int8-ptq)."""
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    ckpt = checkpoint_for("v2-inference.yaml")  # (before moving the cache: the checkpoint stays where it is)
    os.environ["XDG_CACHE_HOME"] = args.get("--cache") or tempfile.mkdtemp(prefix="sd-ov-bench-")
    config = Path(__file__).resolve().parent.parent / "configs/stable-diffusion/v2-inference.yaml"
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 64, 64, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 1024, generator=g)
    variants = {"torch fp32": RuntimeOptions("cpu", "full")}
    variants["openvino f32"] = RuntimeOptions("cpu", "full", backend="openvino")
    variants["openvino int8 weights"] = RuntimeOptions("cpu", "int8", backend="openvino")
    variants["openvino int8-ptq"] = RuntimeOptions("cpu", "int8-ptq", backend="openvino")
    if "--variants" in args:  # torch fp32 always: the reference of the ratios and errors
        variants = {k: v for k, v in variants.items() if k == "torch fp32" or k in args["--variants"].split(",")}
    unets = {}
    for name, opts in variants.items():
        unet = load_model(config, ckpt, opts).model.diffusion_model
        start = time.perf_counter()
        with torch.inference_mode():
            unet(x, t, c)  # conversion and compile happen on the first call
            if opts.precision == "int8-ptq":  # calibration: the calls of a run, latents shrinking with t
                from ldm.runtime import openvino as openvino_backend

                for k in range(1, openvino_backend.CALIBRATION_CALLS):
                    level = 999.0 * (1 - k / openvino_backend.CALIBRATION_CALLS)
                    unet(torch.randn(2, 4, 64, 64, generator=g) * (0.3 + 0.7 * level / 999), torch.tensor([level] * 2), c)
        print(f"{name}: first call (convert + compile{' + calibrate + quantise' if 'ptq' in name else ''}) "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        unets[name] = unet
    times = {name: [] for name in unets}
    outputs = {}
    for _ in range(turns):
        for name, unet in unets.items():
            with torch.inference_mode():
                start = time.perf_counter()
                outputs[name] = unet(x, t, c).float()
                times[name].append(time.perf_counter() - start)
    ref = statistics.median(times["torch fp32"])
    for name, seconds in times.items():
        err = ((outputs[name] - outputs["torch fp32"]).norm() / outputs["torch fp32"].norm()).item()
        print(f"{name}: median {statistics.median(seconds):.2f} s (min {min(seconds):.2f}), "
              f"{statistics.median(seconds) / ref:.2f} x torch fp32, relative error {err:.1e}")


if __name__ == "__main__":
    main()
