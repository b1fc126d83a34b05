"""The UNet's fast paths, applied after loading: torch.compile (oneDNN fusions, cached on disk),
TorchScript trace-and-freeze, and Intel Extension for PyTorch. None changes the model's results beyond
float rounding; each is asked for by its flag (--compile, --torchscript, --ipex), never by default.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ldm.errors import SDError
from ldm.runtime.policy import Precision, RuntimeOptions, ipex_module


def compile_cache_dir(opts: Optional[RuntimeOptions] = None) -> Path:
    if opts is not None and opts.compile_cache is not None:
        return Path(opts.compile_cache)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "sd" / "inductor"


# Whether the user chose inductor's cache folder: read at import, because inductor writes its default
# into the environment the first time anything asks for it (importing some libraries does).
_USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def enable_compile_cache(path: Path) -> None:
    """Point inductor's on-disk caches at `path` (unless the user set TORCHINDUCTOR_CACHE_DIR) and turn
    on the FX-graph and AOTAutograd caches, so a second run reuses the compiled graphs and kernels."""
    from ldm.files.imageio import ensure_writable_dir

    try:
        ensure_writable_dir(path)
    except SDError as exc:
        raise SDError(f"--compile's cache: {exc} (set XDG_CACHE_HOME to another folder)") from None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _USER_INDUCTOR_CACHE or str(path)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True


def falls_through(self, name: str):
    """__getattr__ of a wrapper module: its own attributes, else those of the module it wraps (`inner`)."""
    try:
        return nn.Module.__getattr__(self, name)
    except AttributeError:
        return getattr(nn.Module.__getattr__(self, type(self).inner), name)


class FastUNet(nn.Module):
    """The UNet behind a faster callable (compiled, traced or IPEX-optimised), with the same interface.

    Attribute reads (in_channels, out_channels, ...) fall through to the original module. Traced graphs
    are specialised to the input shapes they saw, so one is traced per shape/dtype signature.
    """

    inner = "unet"

    def __init__(self, unet: nn.Module, kind: str, build: Callable[[nn.Module, tuple], Callable]):
        super().__init__()
        self.unet = unet
        self.kind = kind
        self._build = build
        self._graphs: dict[Any, Callable] = {}

    __getattr__ = falls_through

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None) -> torch.Tensor:
        check = getattr(self.unet, "_check_inputs", None)
        if check is not None:  # one-line errors, which a graph cannot raise
            check(x, timesteps, context, y)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        args = (x, timesteps, context) if y is None else (x, timesteps, context, y)
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._build(self.unet, args)
        return graph(*args)


def _trace_and_freeze(unet: nn.Module, args: tuple) -> Callable:
    # The tracer warns about every shape check it records as a constant, and that it is deprecated: both are
    # expected here (FastUNet traces once per input shape), so they stay off the user's terminal.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(unet, args, check_trace=False, strict=False)
        frozen = torch.jit.freeze(traced.eval())
        frozen(*args)  # the first runs of a frozen graph optimise it; do one here, not in the first step
    return frozen


def speed_up(unet: nn.Module, opts: RuntimeOptions, prec: Precision, device: torch.device) -> nn.Module:
    """Apply --ipex, --compile or --torchscript to the UNet (nothing when none is asked)."""
    if opts.ipex:
        ipex = ipex_module()
        dtype = prec.unet if prec.unet != torch.float32 else (prec.autocast or torch.float32)
        unet = ipex.optimize(unet.eval(), dtype=dtype, inplace=True, level="O1", auto_kernel_selection=True)
    if opts.compile:
        enable_compile_cache(compile_cache_dir(opts))
        import torch._inductor.config as inductor_config

        if device.type == "cpu":
            # Freezing turns weights into constants so oneDNN can pre-pack them and fuse conv/linear
            # with their bias and activation.
            inductor_config.freezing = True
        compiled = torch.compile(unet, dynamic=False)
        return FastUNet(unet, "compile", lambda module, args: compiled)
    if opts.torchscript:
        return FastUNet(unet, "torchscript", _trace_and_freeze)
    return unet
