"""Textual-inversion embeddings: a file's stem written as a word in a prompt stands for its vectors.

Formats (all read without running code: safetensors, or torch.load with weights_only):
- AUTOMATIC1111 .pt: {"string_to_param": {"*": (n, width)}, "name": ..., "step": ...};
- diffusers learned_embeds (.bin or .safetensors): {"<token>": (width,) or (n, width)};
- kohya-ss .safetensors: {"emb_params": (n, width)}.
SD 2.x vectors are 1024 wide (the OpenCLIP text tower); SD 1.x's 768-wide ones are refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ldm.errors import SDError
from ldm.files.metadata import model_hash

SUFFIXES = (".pt", ".bin", ".safetensors")
MAX_FILES = 1000
MAX_BYTES = 64 * 2 ** 20  # an embedding is a few KB; anything this large is not one
MAX_VECTORS = 75  # an embedding longer than a chunk could never be placed


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: torch.Tensor  # (n, width)
    hash: str  # A1111's short hash: the first 12 hex digits of the file's SHA-256


def _read(path: Path) -> dict:
    """An embedding file's tensors, read without running code and only once its size is that of one."""
    from ldm.files.reading import regular_size
    from ldm.loading.checkpoint import read_safetensors, read_torch_file

    size = regular_size(path, "embedding")
    if size > MAX_BYTES:
        raise SDError(f"embedding {path.name} is {size} bytes: too large to be an embedding")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_file(path, "embedding", MAX_BYTES)


def default_folder(ckpt) -> Optional[Path]:
    """embeddings/ beside the folder that holds the checkpoint (where sd looks without --embeddings)."""
    return Path(ckpt).resolve().parent.parent / "embeddings" if ckpt else None


def files_in(folder: Path) -> list[Path]:
    """The embedding files of a folder: regular files only (a FIFO named x.pt would block a read for ever),
    sorted, at most MAX_FILES."""
    import stat

    found = []
    for p in sorted(Path(folder).iterdir()):
        try:
            if p.suffix in SUFFIXES and stat.S_ISREG(p.stat().st_mode):
                found.append(p)
        except OSError:  # a dangling link
            continue
    return found[:MAX_FILES]


def vectors_of(data, name: str) -> torch.Tensor:
    """The (n, width) vectors of an embedding file's contents, whichever of the three formats it is."""
    if not isinstance(data, dict):
        raise SDError(f"embedding {name}: not an embedding file")
    if "clip_l" in data or "clip_g" in data:
        raise SDError(f"embedding {name} is for SDXL (clip_l/clip_g); sd runs SD 2.x")
    if isinstance(data.get("string_to_param"), dict) and data["string_to_param"]:
        tensor = next(iter(data["string_to_param"].values()))
    elif "emb_params" in data:
        tensor = data["emb_params"]
    else:
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise SDError(f"embedding {name}: not an A1111, diffusers or kohya embedding file")
        tensor = tensors[0]
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.ndim not in (1, 2):
        raise SDError(f"embedding {name}: its vectors are not a float tensor of shape (n, width)")
    return tensor.reshape(-1, tensor.shape[-1]).float()


def load_embedding(path: Path, width: int) -> Embedding:
    path = Path(path)
    vectors = vectors_of(_read(path), path.name)
    if vectors.shape[1] != width:
        what = "an SD 1.x embedding (768 wide)" if vectors.shape[1] == 768 else f"{vectors.shape[1]} wide"
        raise SDError(f"embedding {path.name} is {what}; this model's text encoder takes {width}-wide vectors")
    if not 1 <= vectors.shape[0] <= MAX_VECTORS or not bool(torch.isfinite(vectors).all()):
        raise SDError(f"embedding {path.name}: {vectors.shape[0]} vectors (1 to {MAX_VECTORS}, finite, expected)")
    return Embedding(path.stem, vectors, model_hash(path, length=12))


def load_folder(folder: Optional[Path], width: int, required: bool = False) -> dict[str, Embedding]:
    """Every embedding in `folder` by name (file stem); {} when the folder does not exist and is only
    the default (`required` False)."""
    if folder is None or not Path(folder).is_dir():
        if required and folder is not None:
            raise SDError(f"--embeddings {folder}: no such folder")
        return {}
    return {p.stem: load_embedding(p, width) for p in files_in(folder)}


def names_in(prompts: list[str], names) -> list[str]:
    """The names that appear as words in the prompts, sorted."""
    import re

    return [name for name in sorted(names)
            if any(re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", p) for p in prompts)]


def used_in(prompts: list[str], embeddings: dict[str, Embedding]) -> list[Embedding]:
    """The embeddings whose names appear as words in the prompts (for the "TI hashes" field)."""
    return [embeddings[name] for name in names_in(prompts, embeddings)]
