"""Where and in what precision a model runs: the device and precision policy.

`RuntimeOptions` holds the user's choices (--device, --precision, --compile, --torchscript, --ipex,
--threads); `resolve_device` and `resolve_precision` turn them into a device and per-part dtypes, which
the loader (ldm.loading.build) applies while it loads; `autocast_context(model)` is the context a loaded model
runs under. Nothing else decides device or dtype. The fast paths live beside this, in ldm.runtime.fastpath.

Precision modes (resolved from "auto" by `resolve_precision`):
- full:     float32 everywhere.
- autocast: the reference's mode: float32 weights under torch.autocast (bf16 on CPU, fp16 on CUDA).
- bf16:     UNet, text encoder and VAE weights cast once to bfloat16 (the VAE's inputs and outputs stay
            float32: see VAE_DTYPE_IN_HALF_MODES below); no autocast, so no per-call casts. bf16 has float32's exponent range, so
            attention needs no float32 upcast (ATTN_PRECISION set explicitly still wins).
- fp16:     as bf16 with float16 (CUDA); attention keeps the ATTN_PRECISION upcast that SD 2.1-v needs.
"auto" is bf16 on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX), full on other CPUs, fp16 on CUDA.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from ldm.errors import SDError, note, warning

DEVICES = ("auto", "cpu", "cuda")
MAX_THREADS = 1024  # a thread pool past this is a typo, and its stacks alone would take gigabytes
PRECISIONS = ("auto", "full", "autocast", "bf16", "fp16", "int8", "int8-ptq")
OPENVINO_INT8 = ("int8", "int8-ptq")  # OpenVINO's quantisations: weights only, or weights and activations
BACKENDS = ("torch", "openvino", "auto")

# Parts of a LatentDiffusion by checkpoint key prefix.
UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a model: the commands' --device/--precision/--compile/--torchscript/--ipex/--threads.

    ipex: True uses Intel Extension for PyTorch (end-of-life: Intel stopped it after 2.8), never by default.
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
    backend: str = "torch"  # --backend: torch, openvino (ldm.runtime.openvino), or auto (resolved())

    def check(self) -> "RuntimeOptions":
        """Validate everything that needs no model; raises SDError with one line."""
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise SDError(f"unknown --device '{self.device}' (auto, cpu or cuda)")
        if self.precision not in PRECISIONS:
            raise SDError(f"--precision must be one of {', '.join(PRECISIONS)} (got '{self.precision}')")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise SDError(f"--threads must be from 1 to {MAX_THREADS} (got {self.threads})")
        if self.backend not in BACKENDS:
            raise SDError(f"--backend must be one of {', '.join(BACKENDS)} (got '{self.backend}')")
        if self.backend == "openvino" and (self.compile or self.torchscript or self.ipex):
            raise SDError("--backend openvino runs the UNet itself: drop --compile, --torchscript and --ipex")
        if self.precision in OPENVINO_INT8 and self.backend == "torch":
            raise SDError(f"--precision {self.precision} is OpenVINO's quantisation: add --backend openvino")
        if self.backend == "openvino" and self.precision not in ("auto", "full", *OPENVINO_INT8):
            # measured on the full-size UNet (docs/benchmarks.md): OpenVINO's bf16 inference hint gave 0.54
            # relative error against fp32, 30x PyTorch's bf16 (1.8e-2)
            raise SDError(f"--backend openvino runs in float32 (its bf16 measured 30x PyTorch's bf16 error): "
                          f"use --precision full or auto, not {self.precision}")
        if self.backend == "openvino" and str(self.device).startswith("cuda"):
            raise SDError("--backend openvino runs on the CPU: use --device cpu (or --backend torch on CUDA)")
        if self.compile and self.torchscript:
            raise SDError("--compile and --torchscript are two ways to the same end; pick one")
        if self.ipex and self.compile:
            raise SDError("--ipex and --compile cannot be combined (IPEX brings its own graph optimisations)")
        if self.ipex:
            ipex_module()  # fails early, with the way to get it
        return self

    def resolved(self, quiet: bool = False) -> "RuntimeOptions":
        """These options with --backend auto made concrete, from the measurements recorded in docs/benchmarks.md:
        on a CPU with AMX, PyTorch in bf16 (a 512 guidance step of the SD 2 UNet in 1.9 s against OpenVINO
        float32's 5.8 s on a 2-core Xeon; relative error 1.8e-2, as diffusers' bf16); on other CPUs OpenVINO in
        float32 (0.54-0.62x PyTorch fp32's time on Zen 5, 0.77x on Zen 3, error 4e-6; PyTorch's bf16, about as
        fast on Zen 5, has 1.8e-2); PyTorch where OpenVINO cannot serve: CUDA, --compile / --torchscript /
        --ipex, an explicit bf16/fp16/autocast, or no openvino package."""
        if self.backend != "auto":
            return self
        device = resolve_device(self.device)
        why = ("the device is CUDA" if device.type != "cpu" else
               "--compile/--torchscript/--ipex ask for PyTorch" if self.compile or self.torchscript or self.ipex else
               f"--precision {self.precision} is PyTorch's" if self.precision not in ("auto", "full", *OPENVINO_INT8) else
               "this CPU has AMX, where PyTorch's bf16 is 3x OpenVINO float32's speed (docs/benchmarks.md)"
               if self.precision == "auto" and cpu_has_amx() else None)
        # find_spec, not an import: openvino is imported once, by ldm.runtime.openvino, which first keeps its
        # telemetry off
        if why is None and importlib.util.find_spec("openvino") is None:
            why = "the openvino package is not installed"
        backend = "torch" if why else "openvino"
        if not quiet:
            note(f"--backend auto: {backend}" + (f" ({why})" if why else " in float32, the fastest fp32-accurate "
                                                 "path measured on CPUs without AMX (docs/benchmarks.md)"))
        return replace(self, backend=backend)

    def use_ipex(self, device: torch.device, precision: "Precision") -> bool:
        """Whether the UNet goes through IPEX: only when asked (--ipex). Intel ended IPEX after 2.8 (its
        issue #867, October 2025), so it is never a default; --backend openvino is the live CPU path."""
        return bool(self.ipex)


def ipex_module():
    """intel_extension_for_pytorch, or an SDError that says how to get it."""
    try:
        import intel_extension_for_pytorch as ipex  # noqa: F401
    except ImportError as exc:
        raise SDError(
            f"--ipex needs intel_extension_for_pytorch, which is not installed for torch {torch.__version__}: "
            "run `make install-ipex` and use .venv-ipex/bin/sd (IPEX 2.8 needs torch 2.8)") from exc
    return ipex



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


def cpu_has_amx() -> bool:
    """True on CPUs with AMX bf16 matrix units that oneDNN may use (an ONEDNN_MAX_CPU_ISA cap below AMX hides them)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    return (cap in ("", "ALL", "DEFAULT") or "AMX" in cap) and "amx_bf16" in cpu_flags()


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


def allowed_cpus() -> int:
    """How many CPUs this process may run on: what taskset, numactl --physcpubind or a cgroup left it."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(threads: Optional[int]) -> int:
    """Use `threads` intra-op threads; without it, OMP_NUM_THREADS if set, else torch's default (the CPUs this
    process may run on). More threads than those CPUs is said in one line: they would take turns on a core."""
    source = "--threads"
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if env.isdigit() and int(env) > 0:
            threads, source = int(env), "OMP_NUM_THREADS"
    if threads is not None:
        allowed = allowed_cpus()
        if threads > allowed:
            warning(f"{source} {threads} is more than the {allowed} CPUs this process may run on (taskset, numactl "
                    f"or its container): threads would take turns on a core and run slower; use --threads {allowed}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def part_dtype(key: str, precision: Precision) -> Optional[torch.dtype]:
    """The weight dtype of checkpoint key `key` under `precision` (None: leave as stored)."""
    if key.startswith(UNET_PREFIX):
        return precision.unet
    if key.startswith(TEXT_PREFIX):
        return precision.text
    if key.startswith(VAE_PREFIX):
        return precision.vae
    return None  # the schedule buffers stay float32


def config_precision_hint(config) -> Optional[str]:
    """"bf16" when the config's UNet asks for use_bf16 (the reference's intel/*-bf16.yaml), else None."""
    unet = config.model.get("params", {}).get("unet_config", {}).get("params", {})
    return "bf16" if unet.get("use_bf16", False) else None


@dataclass(frozen=True)
class RuntimeState:
    device: torch.device
    precision: Precision
    options: RuntimeOptions


def autocast_context(model_or_device: Any, precision: Optional[str] = None):
    """The context to run a loaded model under: torch.autocast in the autocast mode, else nothing.

    Call as autocast_context(model) with a model from ldm.loading.build.load_model, or as
    autocast_context(device, precision_string).
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
