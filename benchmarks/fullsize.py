"""Full-size random-weight checkpoints for benchmarks, built once and cached outside the repository.

The file has exactly the keys and shapes of a released SD 2.x checkpoint for the config (taken from a
meta-device build of the project's own classes, so nothing is allocated or initialised), float32 like
the released files, with seeded random values streamed straight into a .safetensors file tensor by
tensor: a 5 GB checkpoint is written in well under a minute with a few hundred MB of memory.

Values: matrices and kernels ~ N(0, 1/fan_in) so activations stay O(1) through the depth of the
network (bf16-vs-fp32 errors are then meaningful), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.05^2).
The noise-schedule buffers get their true values (samplers divide by them).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "stable-diffusion"
BUILDER_VERSION = 1  # bump when the values change, so stale cached files are not reused


def cache_dir() -> Path:
    base = os.environ.get("SD_BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sd-bench")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_layout(config_path: Path) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, torch.Tensor]]:
    """(key -> (shape, dtype)) of the config's model, and the true values of its schedule buffers."""
    from ldm.loading.checkpoint import build_on_meta
    from ldm.modules.diffusionmodules.noise_schedule import make_beta_schedule, register_schedule
    from ldm.util import load_config

    config = load_config(config_path)
    model = build_on_meta(config.model)
    layout = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    params = config.model.params
    holder = torch.nn.Module()
    betas = make_beta_schedule(params.get("beta_schedule", "linear"), int(params.get("timesteps", 1000)),
                               float(params.get("linear_start", 1e-4)), float(params.get("linear_end", 2e-2)))
    register_schedule(holder, np.asarray(betas, dtype=np.float64), posterior=True)
    schedule = {k: v.float() for k, v in holder.state_dict().items() if k in layout}
    return layout, schedule


def random_value(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) <= 1:
        if name.endswith("weight"):  # norm scales
            return 1.0 + 0.1 * torch.randn(shape, generator=gen)
        return 0.05 * torch.randn(shape, generator=gen)
    if name.endswith("embedding") or name.endswith("token_embedding.weight"):
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) * (1.0 / math.sqrt(fan_in))


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def write_random_checkpoint(config_path: Path, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Stream a seeded random checkpoint for `config_path` into the .safetensors file `out`."""
    layout, schedule = model_layout(config_path)
    names = sorted(layout)
    header: dict[str, object] = {"__metadata__": {"format": "pt", "sd-bench": "random weights"}}
    offset = 0
    dtypes = {}
    for name in names:
        shape, _ = layout[name]
        dt = torch.float32 if name in schedule else dtype
        dtypes[name] = dt
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    tmp = out.with_suffix(".partial")
    gen = torch.Generator().manual_seed(seed)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            shape, _ = layout[name]
            value = schedule[name] if name in schedule else random_value(name, shape, gen)
            f.write(value.to(dtypes[name]).reshape(-1).view(torch.uint8).numpy().tobytes())
    tmp.rename(out)
    return out


def checkpoint_for(config_name: str, seed: int = 0) -> Path:
    """The cached full-size random checkpoint of configs/stable-diffusion/<config_name>, built if missing."""
    config_path = CONFIGS / config_name
    layout, _ = model_layout(config_path)
    digest = hashlib.sha256(json.dumps(
        [BUILDER_VERSION, seed, sorted((k, list(s)) for k, (s, _) in layout.items())]).encode()).hexdigest()[:12]
    out = cache_dir() / f"{Path(config_name).stem}-random-{digest}.safetensors"
    if not out.exists():
        print(f"building {out} (once)...", flush=True)
        write_random_checkpoint(config_path, out, seed)
    return out


if __name__ == "__main__":
    import sys
    import time

    start = time.perf_counter()
    for name in sys.argv[1:] or ["v2-inference.yaml"]:
        path = checkpoint_for(name)
        print(f"{path} ({path.stat().st_size / 1e9:.2f} GB)")
    print(f"{time.perf_counter() - start:.1f} s")
