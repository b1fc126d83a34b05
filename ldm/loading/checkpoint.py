"""Checkpoint files: reading them safely, and the strict build-on-meta and assignment steps of loading.

A checkpoint is read without running any code from it: .safetensors by parsing its header and mapping
the file into memory, .ckpt through torch.load(weights_only=True, mmap=True). The model is built on the
meta device (no random init of ~1.3B parameters) and the checkpoint tensors are assigned in place, so
the weights exist once in memory (ldm.loading.build puts these steps in order). Every key must match: missing, unexpected or mis-shaped keys fail
with a message that names them and, where the keys tell, which config fits.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import mmap
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from ldm.errors import SDError, note
from ldm.limits import is_whole
from ldm.util import instantiate_from_config

# Keys a checkpoint may carry that an inference model does not use: EMA copies (the released
# checkpoints already hold the EMA weights as the main ones) and training state.
IGNORED_PREFIXES = ("model_ema.",)
IGNORED_KEYS = ("logvar",)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _validate_safetensors(path: Path) -> None:
    """Let the safetensors library check the header (a JSON object; known dtypes; shapes and offsets of
    non-negative integers; tensors that tile the data without gaps or overlaps, inside the file).

    Only the header is parsed here; the tensors are then mapped by read_safetensors, because the library's
    get_tensor copies every tensor into memory (measured: 1.2 s and the whole file resident for 800 MB,
    against a 2 ms mapping whose pages the loader hands back as it casts).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as exc:
        detail = str(exc).replace("Error while deserializing header: ", "").splitlines()[0][:200]
        raise SDError(f"{path} is not a valid safetensors file ({detail})") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise SDError(f"cannot read {path} as safetensors: {str(exc).splitlines()[0][:200] if str(exc) else exc}") from None


def _header_entry(path: Path, name: str, info) -> tuple[torch.dtype, int, int, list[int]]:
    """(dtype, start, end, shape) of one header entry, each checked for type and sign."""
    if not isinstance(info, dict) or info.get("dtype") not in _SAFETENSORS_DTYPES:
        raise SDError(f"{path}: tensor '{name}' has a malformed header entry or a dtype sd does not read")
    offsets, shape = info.get("data_offsets"), info.get("shape")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_whole, offsets))
            or not isinstance(shape, list) or not all(map(is_whole, shape))):
        raise SDError(f"{path}: tensor '{name}' has malformed offsets or shape")
    return _SAFETENSORS_DTYPES[info["dtype"]], offsets[0], offsets[1], shape


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Map a .safetensors file into memory; tensors are views of the (copy-on-write) mapping."""
    _validate_safetensors(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise SDError(f"{path} is not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8 or header_len > 100_000_000:
            raise SDError(f"{path} is not a valid safetensors file (header length {header_len} exceeds the file)")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, UTF-8, or an int of 4300+ digits
            raise SDError(f"{path} is not a valid safetensors file (bad header: {exc})") from None
        if not isinstance(header, dict):
            raise SDError(f"{path} is not a valid safetensors file (its header is not a JSON object)")
        # ACCESS_COPY: private pages, so torch gets a writable buffer without touching the file.
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + header_len
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, start, end, shape = _header_entry(path, name, info)
        if base + end > size or start > end:
            raise SDError(f"{path} is truncated: tensor '{name}' ends past the end of the file")
        count = (end - start) // dtype.itemsize
        if math.prod(shape) != count or count * dtype.itemsize != end - start:
            raise SDError(f"{path}: tensor '{name}' has {end - start} bytes but shape {shape} of {info['dtype']}")
        tensor = torch.frombuffer(data, dtype=dtype, count=count, offset=base + start) if count else torch.empty(0, dtype=dtype)
        tensors[name] = tensor.reshape(shape)
    return tensors


@contextlib.contextmanager
def _content_path(path: Path):
    """A name for `path` that torch.load reads by content: torch.load hands any name ending in
    ".safetensors" to the safetensors reader, whatever the file holds, so such a name is passed as the
    process's /proc/self/fd entry of the open file instead (Linux), or the file object elsewhere."""
    if not str(path).endswith(".safetensors"):
        yield path
        return
    with open(path, "rb") as f:
        fd_path = f"/proc/self/fd/{f.fileno()}"
        yield fd_path if os.path.exists(fd_path) else f


# torch.save stores a file's tensors uncompressed (and torch.load maps them); compressed entries are
# inflated into memory at the size their header gives, so a small crafted file could claim gigabytes.
MAX_INFLATED_BYTES = 64 * 2 ** 20


def _check_zip_costs(path: Path, what: str, max_bytes: Optional[int]) -> None:
    """SDError when the zip's entries would cost more memory than such a file may (read from its
    directory before torch opens it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:
        raise SDError(f"cannot read {what} {path} (truncated or corrupt?): {exc}") from None
    inflated = sum(e.file_size for e in entries if e.compress_type != zipfile.ZIP_STORED)
    if inflated > MAX_INFLATED_BYTES:
        raise SDError(f"{what} {path} holds {inflated} bytes of compressed data, more than a torch file ever "
                      f"compresses ({MAX_INFLATED_BYTES}): refused")
    total = sum(e.file_size for e in entries)
    if max_bytes is not None and total > max_bytes:
        raise SDError(f"{what} {path} holds {total} bytes, more than a {what} can be ({max_bytes}): refused")


def check_storage(tensors, path) -> None:
    """SDError for a tensor that claims more elements than its storage holds: torch.save keeps
    `zeros(1).expand(10**5, 10**5)` as one float, and the first copy of it (a cast, a contiguous())
    would allocate the whole claimed shape. Looks into nested dicts and lists."""
    stack = [("", tensors)]
    while stack:
        name, value = stack.pop()
        if isinstance(value, Mapping):
            stack.extend((f"{name}.{k}" if name else str(k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{name}[{k}]", v) for k, v in enumerate(value))
        elif isinstance(value, torch.Tensor) and value.numel():
            need = (value.storage_offset() + value.numel()) * value.element_size()
            held = value.untyped_storage().nbytes()
            if held < need:
                raise SDError(f"{path}: tensor '{name}' claims shape {tuple(value.shape)} ({need} bytes) but "
                              f"stores {held} bytes: refused")


def read_torch_file(path: Path, what: str = "checkpoint", max_bytes: Optional[int] = None):
    """torch.load of a torch zip file that may hold only tensors and plain containers (weights_only),
    after checking what it will cost (at most `max_bytes` in all) and that no tensor claims more than it
    stores. Every failure is one SDError line; nothing in the file is ever run."""
    if not zipfile.is_zipfile(path):
        raise SDError(
            f"{path} is not a torch zip {what} (truncated, or a legacy pickle, which is refused "
            "because unpickling can run code); convert it to .safetensors with a trusted tool"
        )
    _check_zip_costs(path, what, max_bytes)
    try:
        with _content_path(path) as source, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on old pickle protocols: our errors say enough
            data = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        # torch's message names the offending global on its first lines; keep only that.
        detail = next((line.strip() for line in str(exc).splitlines() if "global" in line.lower()), "")
        raise SDError(
            f"refusing to load {path}: it holds Python objects besides tensors, and unpickling them could run code"
            + (f" ({detail})" if detail else "")
        ) from exc
    except Exception as exc:  # a crafted zip can fail torch.load in any way; all mean "not a checkpoint"
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SDError(f"cannot read {what} {path} (truncated or corrupt?): {first}") from exc
    check_storage(data, path)
    return data


def read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """Load a torch .ckpt zip holding {"state_dict": ...} without unpickling arbitrary objects."""
    obj = read_torch_file(path)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SDError(f"{path} does not hold a state_dict of tensors")
    return dict(obj)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint by its content (.safetensors or torch zip), whatever its file name says."""
    path = Path(path)
    from ldm.files.reading import open_regular

    if not path.exists():
        raise SDError(f"checkpoint not found: {path} (put weights in checkpoints/, see checkpoints/README.md)")
    if not path.is_file():
        raise SDError(f"checkpoint path is not a file: {path}")
    with open_regular(path, "checkpoint") as f:
        head = f.read(9)
    if not head:
        raise SDError(f"{path} is empty, not a checkpoint")
    if head[:2] == b"PK":
        return read_ckpt(path)
    # A safetensors file starts with its header's length (8 bytes, little-endian) and then "{": a length whose
    # low byte is 0x80 must not read as the pickle protocol marker of torch's legacy (pre-zip) format.
    if head[:1] == b"\x80" and head[8:9] != b"{":
        raise SDError(f"{path} is a legacy pickle checkpoint, refused because unpickling can run code; "
                      "convert it to .safetensors with a trusted tool")
    return read_safetensors(path)


# What the keys of a checkpoint say about the config it needs.
def _first(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def check_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], ckpt: str, config: str) -> dict[str, torch.Tensor]:
    """Return the state_dict restricted to the model's keys, or raise SDError naming every mismatch."""
    expected = model.state_dict()
    ignored = [k for k in state_dict if k not in expected and (k.startswith(IGNORED_PREFIXES) or k in IGNORED_KEYS)]
    if ignored:
        note(f"ignoring {len(ignored)} training-only entries of the checkpoint (EMA copies / logvar)")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and k not in ignored]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} with another shape (checkpoint vs model: {_first(wrong_shape, 2)})")
        from ldm.loading.keys import describe_checkpoint

        hint = describe_checkpoint(state_dict)
        fit = f"; the checkpoint looks like {hint}" if hint else ""
        raise SDError(f"checkpoint {ckpt} does not fit config {config}: keys " + "; ".join(parts) + fit)
    return {k: state_dict[k] for k in expected}


# torch.nn.init functions that modules call from their constructors. On the meta device they have nothing
# to do, but some still cost: normal_ on a meta tensor goes through a decomposition whose wrapper imports
# torch._dynamo (~2 s on these cores) the first time.
_INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "constant_", "zeros_", "ones_", "orthogonal_")


@contextlib.contextmanager
def _skip_init_of_meta_tensors():
    originals = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}

    def skipping(original):
        @functools.wraps(original)
        def init(tensor, *args, **kwargs):
            return tensor if tensor.is_meta else original(tensor, *args, **kwargs)
        return init

    try:
        for name, original in originals.items():
            setattr(nn.init, name, skipping(original))
        yield
    finally:
        for name, original in originals.items():
            setattr(nn.init, name, original)


def build_on_meta(model_config) -> nn.Module:
    """Instantiate a model config without allocating or initialising any weight."""
    with torch.device("meta"), _skip_init_of_meta_tensors():
        return instantiate_from_config(model_config)


def assign_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], ckpt: str, config: str) -> nn.Module:
    """Strictly assign checkpoint tensors into a meta-built model (no copies)."""
    checked = check_keys(model, state_dict, ckpt, config)
    # Keep each parameter's dtype as stored in the checkpoint for now; precision is chosen afterwards.
    model.load_state_dict(checked, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # strict loading covers every key, so this is a bug in a model class, not bad input
        raise SDError(f"internal error: {len(leftover)} tensors were not loaded ({_first(leftover)})")
    model.eval()
    model.requires_grad_(False)
    return model
