"""The one loading path: read -> check keys -> cast -> build on meta -> assign, then device and fast path.

`load_model(config, ckpt, opts)` reads the checkpoint (ldm.loading.checkpoint: safe readers, memory-mapped),
builds the config's model on the meta device (no weight is allocated or initialised), casts each tensor
as the precision asks while loading (tensor by tensor, handing each memory-mapped float32 source page back
to the kernel, so peak memory stays near the size of the cast model), assigns them strictly, moves the
model to its device and applies the fast path (ldm.runtime.fastpath) to the UNet. The policy it follows (device,
precision, threads) is ldm.runtime.policy's; which config fits a checkpoint is ldm.loading.detect's.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from ldm.runtime.policy import (OPENVINO_INT8, UNET_PREFIX, RuntimeOptions, RuntimeState, Precision, config_precision_hint,
                         part_dtype, resolve_device, resolve_precision, set_threads)


_MADV_DONTNEED = 4


def _release_pages(tensor: torch.Tensor) -> None:
    """Hand the whole pages under a memory-mapped tensor back to the kernel once it has been copied.

    The checkpoint is mapped privately and never written, so the pages are clean file pages: dropping
    them loses nothing (a later read would fault them in again from the file) and takes them out of
    this process's resident set. Pages shared with a neighbouring tensor are kept (the range is
    rounded inwards). A no-op where madvise is not available.
    """
    if not sys.platform.startswith("linux") or not tensor.is_contiguous() or tensor.device.type != "cpu":
        return
    page = 4096
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last - first < page:
        return
    try:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
    except (OSError, AttributeError):
        pass


_LIBC: list = []


def release_memory() -> None:
    """Give the memory of dropped models back to the system: collect them, then let glibc trim its heaps
    (glibc keeps freed heap memory for reuse; measured after dropping a 2.5 GiB bf16 model: 0.7 to 1.6 GiB
    still resident without the trim, varying from run to run)."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            _libc().malloc_trim(0)


def _libc():
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def cast_state_dict(state_dict: Mapping[str, torch.Tensor], dtype_of: Callable[[str], Optional[torch.dtype]],
                    channels_last: Callable[[str], bool] = lambda key: False) -> dict[str, torch.Tensor]:
    """Cast floating-point tensors to dtype_of(key) (and 4-D ones to channels_last where asked) one at a
    time, releasing each mapped source, so cast and layout change cost one copy and no second peak.

    Tensors already as asked are kept as they are (memory-mapped, no copy).
    """
    out: dict[str, torch.Tensor] = {}
    for key in list(state_dict):
        tensor = state_dict[key]
        dtype = dtype_of(key)
        if dtype is None or not tensor.is_floating_point():
            dtype = tensor.dtype
        layout = torch.channels_last if tensor.ndim == 4 and channels_last(key) else torch.contiguous_format
        if tensor.dtype == dtype and tensor.is_contiguous(memory_format=layout):
            out[key] = tensor
            continue
        out[key] = tensor.to(dtype, memory_format=layout)
        _release_pages(tensor)
    return out


def import_targets(config) -> None:
    """Import the config's classes before the meta-device build: under torch 2.8 (the IPEX environment)
    torch._dynamo, which those imports pull in, fails to initialise inside a `torch.device("meta")`
    context. The imports happen anyway; only earlier."""
    import importlib

    from omegaconf import OmegaConf

    targets: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("target"), str):
                targets.append(node["target"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(OmegaConf.to_container(config.model, resolve=True))
    from ldm.util import check_target

    for target in targets:
        check_target(target)  # nothing a config names is imported before it passes the allow-list
        module = target.rsplit(".", 1)[0]
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


def cast_vae_io(vae: nn.Module, dtype: torch.dtype) -> None:
    """Let a VAE whose weights are `dtype` take and give float32: its first layers cast their input to
    `dtype`, its last layers cast their output back (hooks; the VAE module itself is dtype-agnostic)."""

    def cast_in(module, args):
        return (args[0].to(dtype),) + tuple(args[1:])

    def cast_out(module, args, output):
        return output.float()

    vae.post_quant_conv.register_forward_pre_hook(cast_in)  # decode: z -> post_quant_conv -> decoder
    vae.decoder.register_forward_hook(cast_out)
    vae.encoder.register_forward_pre_hook(cast_in)  # encode: image -> encoder -> quant_conv -> moments
    vae.quant_conv.register_forward_hook(cast_out)


def _set_attention_upcast(module: nn.Module, precision: Precision) -> None:
    """bf16 keeps float32's exponent range, so its attention logits cannot overflow as fp16's do: unless the
    user set ATTN_PRECISION, the bf16 mode skips the float32 upcast of attention (one rounding of the
    attention probabilities to bf16; torch's fused CPU kernel still accumulates in float32)."""
    if precision.mode != "bf16" or "ATTN_PRECISION" in os.environ:
        return
    for m in module.modules():
        if hasattr(m, "upcast") and hasattr(m, "to_q"):
            m.upcast = False


def load_model(config: str | Path, ckpt: str | Path, opts: Optional[RuntimeOptions] = None, *,
               state_dict: Optional[Mapping[str, torch.Tensor]] = None, loaded_config=None,
               inspect: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """Load `ckpt` into the model `config` describes, strictly (every key, nothing extra, shapes named).

    Without `opts` the weights keep the checkpoint's dtypes on the CPU and nothing else is done (training,
    evaluation). With `opts` (RuntimeOptions) the precision's casts, the device and the fast path apply,
    and the model gets a `runtime` attribute (RuntimeState) that autocast_context reads. `state_dict`
    passes a checkpoint already read (ldm.loading.detect reads it to choose the config), `loaded_config` a
    config already parsed; `inspect(model)` runs on the placed model before the fast path (ldm.loading.detect's
    probe, which must not be what a compiled or traced UNet specialises to).
    """
    from ldm.loading.checkpoint import assign_weights, build_on_meta, read_state_dict
    from ldm.util import load_config, trusted_config

    opts = opts.resolved(quiet=True) if opts is not None else None  # --backend auto (Pipeline resolves it first)

    if opts is not None:
        opts.check()
        set_threads(opts.threads)
    loaded_config = loaded_config if loaded_config is not None else load_config(config)
    state_dict = state_dict if state_dict is not None else read_state_dict(ckpt)
    with trusted_config(opts is not None and opts.trust_config):
        import_targets(loaded_config)
        if opts is None:
            model = assign_weights(build_on_meta(loaded_config.model), state_dict, str(ckpt), str(config))
            if inspect is not None:
                inspect(model)
            return model
        device = resolve_device(opts.device)
        # OpenVINO converts and runs float32 modules (int8 is its own weight compression after conversion)
        prec = resolve_precision("full" if opts.backend == "openvino" else opts.precision, device,
                                 config_precision_hint(loaded_config))
        # channels_last: oneDNN's convolutions and torch's CPU group norm work on NHWC without reorders;
        # the UNet's attention blocks then reshape (B, C, H, W) -> (B, HW, C) as a free view.
        channels_last = opts.channels_last if opts.channels_last is not None else device.type == "cpu"
        state_dict = cast_state_dict(state_dict, lambda key: part_dtype(key, prec),
                                     lambda key: channels_last and key.startswith(UNET_PREFIX))
        model = assign_weights(build_on_meta(loaded_config.model), state_dict, str(ckpt), str(config))
        model.runtime_ckpt = Path(ckpt)  # what a backend keys its converted models by
    del state_dict
    return _place(model, opts, device, prec, channels_last, inspect)


def _place(model: nn.Module, opts: RuntimeOptions, device: torch.device, prec: Precision, channels_last: bool,
           inspect: Optional[Callable[[nn.Module], None]]) -> nn.Module:
    """Move a loaded model to its device, set its attention and VAE dtypes, and speed its UNet up."""
    from ldm.runtime.fastpath import speed_up

    if device.type != "cpu":
        model = model.to(device)
        if channels_last:
            model.model.diffusion_model.to(memory_format=torch.channels_last)
    _set_attention_upcast(model, prec)
    vae = getattr(model, "first_stage_model", None)
    if vae is not None and prec.vae != torch.float32:
        cast_vae_io(vae, prec.vae)
    model.runtime = RuntimeState(device, prec, opts)
    if inspect is not None:
        inspect(model)
    if opts.backend == "openvino":
        from ldm.files.metadata import model_hash
        from ldm.runtime.openvino import use_openvino

        quant = opts.precision if opts.precision in OPENVINO_INT8 else None
        use_openvino(model, model_hash(model.runtime_ckpt), quant=quant)
        return model
    unet_holder = getattr(model, "model", None)
    unet = getattr(unet_holder, "diffusion_model", None)
    if unet is not None:
        unet_holder.diffusion_model = speed_up(unet, replace(opts, ipex=opts.use_ipex(device, prec)), prec, device)
    return model
