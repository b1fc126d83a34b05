"""Tiny original-format checkpoints for tests: the project's classes, small sizes, seeded random weights."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.util import instantiate_from_config, load_config

CONFIGS = Path(__file__).parent / "configs"
# The exact keys, shapes and dtypes of every real checkpoint (facts copied into the repository, so a fresh
# clone tests them with nothing beside it).
KEYS = Path(__file__).parent / "data" / "checkpoint-keys"


def manifest(name: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{key: shape} of a real checkpoint's manifest, the rows under `prefix` with the prefix removed."""
    rows = {}
    for line in (KEYS / f"{name}.tsv").read_text().splitlines():
        if not line:
            continue
        key, shape, _dtype = line.split("\t")
        if key.startswith(prefix):
            rows[key[len(prefix):]] = tuple(int(d) for d in shape.strip("()[]").split(",") if d.strip())
    return rows


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a seeded random value of a sensible scale.

    Default inits zero some output layers (as the reference does), which would make tests blind to
    whole blocks; these values keep activations bounded while exercising every weight.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim <= 1 and name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim <= 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def build_tiny(config_name: str = "tiny-v2-inference.yaml", seed: int = 0) -> torch.nn.Module:
    config = load_config(CONFIGS / config_name)
    model = instantiate_from_config(config.model)
    return randomize_(model, seed).eval()


def save_tiny(model: torch.nn.Module, path: Path) -> Path:
    """Save as the reference does: a .ckpt zip holding {"state_dict", "global_step"}, or .safetensors."""
    state_dict = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state_dict, str(path))
    else:
        torch.save({"state_dict": state_dict, "global_step": 0}, path)
    return path
