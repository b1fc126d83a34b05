"""Where and in what precision a model runs: device choice, precision modes, the model loader.

The commands call `load_for_inference` and `precision_context`; nothing else decides device or dtype.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ldm.errors import SDError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SDError("--device cuda was asked for, but no CUDA device is available (use --device cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise SDError(f"unknown --device '{device}' (cpu, cuda or auto)")
    return torch.device(device)


def precision_context(device: torch.device, precision: str):
    """The reference's --precision: 'autocast' runs under torch.autocast (bf16 on CPU, fp16 on CUDA)."""
    if precision == "autocast":
        dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def load_for_inference(config: Path, ckpt: Path, device: torch.device, precision: str):
    """The one model loader of the commands: strict load, then move to the device."""
    from ldm.checkpoint import load_model

    loaded = load_model(config, ckpt)
    model = loaded.model.float().to(device)  # fp32 masters; autocast picks per-op precision
    return model
