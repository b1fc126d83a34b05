"""Where and in what precision a model runs, and how it is made fast: the one model loader of the commands.

`RuntimeOptions` holds the user's choices (--device, --precision, --compile, --torchscript, --ipex,
--threads); `load_for_inference(config, ckpt, opts)` reads the checkpoint, builds the model on the meta
device, casts weights as the precision asks (tensor by tensor while loading, handing each memory-mapped
float32 source page back to the kernel, so peak memory stays near the size of the cast model), and
applies the CPU fast path to the UNet; `autocast_context(model)` is the context the commands run the
model under. Nothing else decides device or dtype.

Precision modes (resolved from "auto" by `resolve_precision`):
- full:     float32 everywhere.
- autocast: the reference's mode: float32 weights under torch.autocast (bf16 on CPU, fp16 on CUDA).
- bf16:     UNet and text encoder weights cast once to bfloat16 (the VAE stays float32: see
            VAE_DTYPE below); no autocast, so no per-call casts. bf16 has float32's exponent range, so
            attention needs no float32 upcast (ATTN_PRECISION set explicitly still wins).
- fp16:     as bf16 with float16 (CUDA); attention keeps the ATTN_PRECISION upcast that SD 2.1-v needs.
"auto" is bf16 on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX), full on other CPUs, fp16 on CUDA.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ldm.errors import SDError, note, warning

DEVICES = ("auto", "cpu", "cuda")
MAX_THREADS = 1024  # a thread pool past this is a typo, and its stacks alone would take gigabytes
PRECISIONS = ("auto", "full", "autocast", "bf16", "fp16")

# Parts of a LatentDiffusion by checkpoint key prefix.
UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a model: the commands' --device/--precision/--compile/--torchscript/--ipex/--threads.

    ipex: None (default) uses IPEX for the bf16 CPU path when it is installed, because it measured faster
    than the native path (docs/benchmarks.md); True requires it, False never uses it.
    channels_last: None picks the measured default (on for the UNet on CPU), True/False forces it.
    compile_cache: where torch.compile keeps its artefacts (default ~/.cache/sd/inductor).
    """
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    torchscript: bool = False
    ipex: Optional[bool] = None
    threads: Optional[int] = None
    channels_last: Optional[bool] = None
    compile_cache: Optional[Path] = None
    trust_config: bool = False  # --trust-config: the config may name classes outside ldm.* (ldm.util.check_target)

    def check(self) -> "RuntimeOptions":
        """Validate everything that needs no model; raises SDError with one line."""
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise SDError(f"unknown --device '{self.device}' (auto, cpu or cuda)")
        if self.precision not in PRECISIONS:
            raise SDError(f"--precision must be one of {', '.join(PRECISIONS)} (got '{self.precision}')")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise SDError(f"--threads must be from 1 to {MAX_THREADS} (got {self.threads})")
        if self.compile and self.torchscript:
            raise SDError("--compile and --torchscript are two ways to the same end; pick one")
        if self.ipex and self.compile:
            raise SDError("--ipex and --compile cannot be combined (IPEX brings its own graph optimisations)")
        if self.ipex:
            ipex_module()  # fails early, with the way to get it
        return self

    def use_ipex(self, device: torch.device, precision: "Precision") -> bool:
        """Whether the UNet goes through IPEX: as asked, or by default on the bf16 CPU path when installed."""
        if self.ipex is not None:
            return self.ipex
        return (device.type == "cpu" and precision.mode == "bf16" and not self.compile
                and importlib.util.find_spec("intel_extension_for_pytorch") is not None)


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the mode and the weight dtype of each part."""
    mode: str  # full | autocast | bf16 | fp16
    unet: torch.dtype
    text: torch.dtype
    vae: torch.dtype
    autocast: Optional[torch.dtype]  # dtype of torch.autocast, None when not autocasting


# -- hardware -------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# oneDNN's ISA levels (ONEDNN_MAX_CPU_ISA caps them) from which bf16 matrix work runs on native instructions.
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
              "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT", "")

# Measured on a 2-core AMD EPYC Zen 3 (AVX2, no AVX512-BF16): a 4x64x256x256 3x3 convolution took 1.3 s in
# float32 and 204 s under bf16 autocast; oneDNN emulates bf16 there.
BF16_SLOWDOWN_WITHOUT_NATIVE = 160


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX) that oneDNN may use.

    ONEDNN_MAX_CPU_ISA set below AVX512_CORE_BF16 (how CI emulates an AVX2-only machine, and how a user
    keeps oneDNN off those instructions) counts as no native bf16: oneDNN then emulates it, two orders of
    magnitude slower than float32.
    """
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    if cap not in _BF16_ISAS:
        return False
    flags = cpu_flags()
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    mkldnn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(mkldnn()) if mkldnn is not None else False


def bf16_on_cpu(asked: bool, what: str) -> bool:
    """Whether `what` may run in bf16 on this CPU: only with native bf16, else float32 with one note.

    `asked` is True for an explicit user request (--bf16, --precision bf16): it is honoured, with a warning
    that says how much slower it will be; a default or a config's choice falls back to float32.
    """
    if cpu_has_fast_bf16():
        return True
    if asked:
        warning(f"{what} in bf16 on a CPU without native bf16 (no AVX512-BF16/AMX) runs about "
             f"{BF16_SLOWDOWN_WITHOUT_NATIVE}x slower than float32 (measured on AVX2); drop it for float32")
        return True
    note(f"{what}: float32 instead of bf16, since this CPU has no native bf16 (no AVX512-BF16/AMX), where bf16 "
         f"runs about {BF16_SLOWDOWN_WITHOUT_NATIVE}x slower")
    return False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SDError("--device cuda was asked for, but no CUDA device is available (use --device cpu)")
    if device != "cpu" and not str(device).startswith("cuda"):
        raise SDError(f"unknown --device '{device}' (cpu, cuda or auto)")
    return torch.device(device)


# The VAE in the half modes: measured on the full-size random-weight model (docs/benchmarks.md), a bf16
# decode is 1.5x faster than float32 and agrees with it at 47 dB PSNR, and it halves the decoder's
# activations (the peak of a 768x768 run). Its inputs and outputs stay float32 (cast_vae_io).
VAE_DTYPE_IN_HALF_MODES = {"bf16": torch.bfloat16, "fp16": torch.float32}  # fp16 decodes overflow: kept fp32


def resolve_precision(precision: str, device: torch.device, config_hint: Optional[str] = None) -> Precision:
    """Turn --precision (auto|full|autocast|bf16|fp16) into per-part weight dtypes for `device`.

    bf16 on a CPU only where the CPU has it natively (bf16_on_cpu): "auto" and the reference's "autocast"
    (and a config's use_bf16, `config_hint` "bf16", from the reference's intel/*-bf16.yaml) fall back to
    float32 with one note elsewhere; an explicit "bf16" is honoured with a warning.
    """
    if precision == "auto":
        if device.type == "cuda":
            precision = "fp16"
        elif config_hint == "bf16":
            precision = "bf16" if bf16_on_cpu(False, "the config asks for use_bf16") else "full"
        else:
            precision = "bf16" if cpu_has_fast_bf16() else "full"
    elif device.type == "cpu" and precision == "autocast" and not bf16_on_cpu(False, "--precision autocast"):
        precision = "full"
    elif device.type == "cpu" and precision == "bf16":
        bf16_on_cpu(True, "--precision bf16")
    f32 = torch.float32
    if precision == "full":
        return Precision("full", f32, f32, f32, None)
    if precision == "autocast":
        return Precision("autocast", f32, f32, f32, torch.bfloat16 if device.type == "cpu" else torch.float16)
    if precision in ("bf16", "fp16"):
        half = torch.bfloat16 if precision == "bf16" else torch.float16
        return Precision(precision, half, half, VAE_DTYPE_IN_HALF_MODES[precision], None)
    raise SDError(f"--precision must be one of {', '.join(PRECISIONS)} (got '{precision}')")


def set_threads(threads: Optional[int]) -> int:
    """Use `threads` intra-op threads; without it, OMP_NUM_THREADS if set, else torch's default (all cores)."""
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if env.isdigit() and int(env) > 0:
            threads = int(env)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# -- loading --------------------------------------------------------------------------------------
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


def _libc():
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def part_dtype(key: str, precision: Precision) -> Optional[torch.dtype]:
    """The weight dtype of checkpoint key `key` under `precision` (None: leave as stored)."""
    if key.startswith(UNET_PREFIX):
        return precision.unet
    if key.startswith(TEXT_PREFIX):
        return precision.text
    if key.startswith(VAE_PREFIX):
        return precision.vae
    return None  # the schedule buffers stay float32


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


def read_weights(config: Path, ckpt: Path, precision: Precision, unet_channels_last: bool = False,
                 loaded_config=None):
    """Meta-built model of `config` holding `ckpt`'s weights cast per `precision` (CPU, eval mode)."""
    from ldm.checkpoint import assign_weights, build_on_meta, read_state_dict
    from ldm.util import load_config

    loaded_config = loaded_config if loaded_config is not None else load_config(config)
    import_targets(loaded_config)
    state_dict = read_state_dict(ckpt)
    state_dict = cast_state_dict(state_dict, lambda key: part_dtype(key, precision),
                                 lambda key: unet_channels_last and key.startswith(UNET_PREFIX))
    model = build_on_meta(loaded_config.model)
    return assign_weights(model, state_dict, str(ckpt), str(config))


def config_precision_hint(config) -> Optional[str]:
    """"bf16" when the config's UNet asks for use_bf16 (the reference's intel/*-bf16.yaml), else None."""
    unet = config.model.get("params", {}).get("unet_config", {}).get("params", {})
    return "bf16" if unet.get("use_bf16", False) else None


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


def ipex_module():
    """intel_extension_for_pytorch, or an SDError that says how to get it."""
    try:
        import intel_extension_for_pytorch as ipex  # noqa: F401
    except ImportError as exc:
        raise SDError(
            f"--ipex needs intel_extension_for_pytorch, which is not installed for torch {torch.__version__}: "
            "run `make install-ipex` and use .venv-ipex/bin/sd (IPEX 2.8 needs torch 2.8)") from exc
    return ipex


def _set_attention_upcast(module: nn.Module, precision: Precision) -> None:
    """bf16 keeps float32's exponent range, so its attention logits cannot overflow as fp16's do: unless the
    user set ATTN_PRECISION, the bf16 mode skips the float32 upcast of attention (one rounding of the
    attention probabilities to bf16; torch's fused CPU kernel still accumulates in float32)."""
    if precision.mode != "bf16" or "ATTN_PRECISION" in os.environ:
        return
    for m in module.modules():
        if hasattr(m, "upcast") and hasattr(m, "to_q"):
            m.upcast = False


def load_for_inference(config: str | Path, ckpt: str | Path, opts: RuntimeOptions | torch.device | str | None = None,
                       precision: Optional[str] = None) -> nn.Module:
    """The one model loader of the commands: strict, safe, low-memory load, then the fast path.

    `opts` is a RuntimeOptions; the older call `load_for_inference(config, ckpt, device, precision)`
    still works. The model gets a `runtime` attribute (RuntimeState) that autocast_context reads.
    """
    if opts is None or isinstance(opts, (torch.device, str)):
        opts = RuntimeOptions(device=str(opts or "auto"), precision=precision or "auto")
    opts.check()
    set_threads(opts.threads)
    from ldm.util import load_config

    device = resolve_device(opts.device)
    loaded_config = load_config(config)
    prec = resolve_precision(opts.precision, device, config_precision_hint(loaded_config))
    # channels_last: oneDNN's convolutions and torch's CPU group norm work on NHWC without reorders;
    # the UNet's attention blocks then reshape (B, C, H, W) -> (B, HW, C) as a free view.
    channels_last = opts.channels_last if opts.channels_last is not None else device.type == "cpu"
    from ldm.util import trusted_config

    with trusted_config(opts.trust_config):
        model = read_weights(Path(config), Path(ckpt), prec, unet_channels_last=channels_last,
                             loaded_config=loaded_config)
    if device.type != "cpu":
        model = model.to(device)
        if channels_last:
            model.model.diffusion_model.to(memory_format=torch.channels_last)
    _set_attention_upcast(model, prec)
    vae = getattr(model, "first_stage_model", None)
    if vae is not None and prec.vae != torch.float32:
        cast_vae_io(vae, prec.vae)
    unet_holder = getattr(model, "model", None)
    unet = getattr(unet_holder, "diffusion_model", None)
    if unet is not None:
        unet_holder.diffusion_model = speed_up(unet, replace(opts, ipex=opts.use_ipex(device, prec)), prec, device)
    model.runtime = RuntimeState(device, prec, opts)
    return model


@dataclass(frozen=True)
class RuntimeState:
    device: torch.device
    precision: Precision
    options: RuntimeOptions


# -- the fast path ---------------------------------------------------------------------------------
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
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _USER_INDUCTOR_CACHE or str(path)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True


class FastUNet(nn.Module):
    """The UNet behind a faster callable (compiled, traced or IPEX-optimised), with the same interface.

    Attribute reads (in_channels, out_channels, ...) fall through to the original module. Traced graphs
    are specialised to the input shapes they saw, so one is traced per shape/dtype signature.
    """

    def __init__(self, unet: nn.Module, kind: str, build: Callable[[nn.Module, tuple], Callable]):
        super().__init__()
        self.unet = unet
        self.kind = kind
        self._build = build
        self._graphs: dict[Any, Callable] = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)

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
    with torch.no_grad():
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


def autocast_context(model_or_device: Any, precision: Optional[str] = None):
    """The context to run a loaded model under: torch.autocast in the autocast mode, else nothing.

    Call as autocast_context(model) with a model from load_for_inference; the older
    autocast_context(device, precision_string) still works.
    """
    state = getattr(model_or_device, "runtime", None)
    if isinstance(state, RuntimeState):
        prec, device = state.precision, state.device
    else:
        device = torch.device(model_or_device) if isinstance(model_or_device, str) else model_or_device
        prec = resolve_precision(precision or "full", device)
    if prec.autocast is not None:
        return torch.autocast(device.type, dtype=prec.autocast)
    return contextlib.nullcontext()


# The name generate.py imports.
precision_context = autocast_context
