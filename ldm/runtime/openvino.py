"""`--backend openvino`: the UNet, the VAE and the text encoder run by OpenVINO, Intel's live CPU inference runtime.

Each part is exported from the loaded PyTorch module with torch.export (not the deprecated tracer),
converted by `openvino.convert_model`, and compiled for the static shapes of each call it meets. The
converted model is saved under ~/.cache/sd/openvino/ keyed by checkpoint hash, part, input shapes and
versions, and OpenVINO caches its compiled blob beside it, so a second run of the same shape starts in
seconds. Float32 only (its bf16 hint measured 30x PyTorch's bf16 error); results differ from PyTorch fp32
only by rounding. The weights are baked into the converted model, so LoRA cannot be
merged afterwards (refused by the pipeline).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ldm.errors import SDError, note
from ldm.runtime.fastpath import falls_through

VERSION = 1  # bump when what is exported changes, so stale cached models are not reused


def openvino_module():
    # OpenVINO's converter reports usage to Google Analytics unless a consent file says no (no file counts
    # as yes when no dialog is shown). sd never phones home: without the telemetry package importable,
    # the converter falls back to its own no-op stub.
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None
    try:
        import openvino  # noqa: F401
        import openvino.tools.ovc.telemetry_stub as stub
    except ImportError as exc:
        raise SDError("--backend openvino needs the openvino package: pip install openvino") from exc
    for name in ("openvino.tools.ovc.telemetry_utils", "openvino.tools.ovc.convert_impl"):
        module = sys.modules.get(name)  # imported before us (by whoever imported openvino first): stub it too
        if module is not None and hasattr(module, "tm"):
            module.tm = stub
    return openvino


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "sd" / "openvino"


def _ready_cache_dir() -> Path:
    """The cache folder, created if needed; one SDError line when it cannot be (a file in its place)."""
    from ldm.files.imageio import ensure_writable_dir

    try:
        return ensure_writable_dir(cache_dir())
    except SDError as exc:
        raise SDError(f"the OpenVINO cache: {exc} (set XDG_CACHE_HOME to another folder)") from None


def _digest(xml: Path) -> str:
    """SHA-256 of a converted model's .xml and .bin together (what the cache records and checks)."""
    digest = hashlib.sha256()
    for path in (xml, xml.with_suffix(".bin")):
        with open(path, "rb") as f:
            while block := f.read(2 ** 22):
                digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(xml: Path):
    """Hold the converted model's lock file: runs that need the same model convert it once, one after the
    other, and compile it (OpenVINO writes its blob cache then) without meeting half-written files."""
    import fcntl

    with open(xml.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached(xml: Path, what: str) -> bool:
    """True when `xml` and its .bin are in the cache exactly as written (their digest, recorded at write
    time, matches). A damaged or unrecorded entry is removed with a note, so it is converted again."""
    if not xml.is_file():
        return False
    recorded = xml.with_suffix(".sha256")
    try:
        if recorded.read_text().strip() == _digest(xml):
            return True
    except OSError:  # no record, or no .bin
        pass
    note(f"the cached {what} in {xml.parent} is damaged, incomplete or unrecorded (an older sd); converting it again")
    for path in (xml, xml.with_suffix(".bin"), recorded):
        path.unlink(missing_ok=True)
    return False


# --precision int8-ptq: the UNet calls of the run recorded (in float32) before its activations are quantised:
# with guidance one call per step, so the first image's first 24 steps ("a few dozen latents of the run's own
# prompts"); the quantised model is cached per shape like the others and reused by later runs.
CALIBRATION_CALLS = 24
QUANT_LABEL = {None: "", "int8": " with int8 weights", "int8-ptq": " quantised to int8"}


class _Calibrating:
    """A part's float32 model while it records the inputs NNCF's post-training quantisation calibrates on."""

    def __init__(self, compiled, xml: Path, target: Path):
        self.compiled, self.xml, self.target, self.samples = compiled, xml, target, []

    def __call__(self, arrays: list) -> Any:
        self.samples.append([a.copy() for a in arrays])
        return self.compiled(arrays)


class OpenVINOPart(nn.Module):
    """A module run by OpenVINO, converted and compiled once per input signature (shapes and dtypes).

    quant: None (float32), "int8" (NNCF's int8 weight compression; activations stay float) or "int8-ptq"
    (weights and activations in int8: NNCF's post-training quantisation, calibrated on the first
    CALIBRATION_CALLS calls of the run, which run in float32). Attribute reads (out_channels ...) fall
    through to the PyTorch module, which stays for them and as the export source.
    """

    inner = "module"

    def __init__(self, module: nn.Module, part: str, checkpoint_hash: str, hint: str, quant: Optional[str] = None):
        super().__init__()
        self.module, self.part, self.checkpoint_hash, self.hint = module.eval(), part, checkpoint_hash, hint
        self.quant = quant
        self._compiled: dict[Any, Any] = {}

    __getattr__ = falls_through

    def forward(self, *args: Optional[torch.Tensor], **kwargs: Optional[torch.Tensor]) -> torch.Tensor:
        bound = inspect.signature(self.module.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        args = tuple(bound.arguments.values())  # in the module's order: (x, timesteps, context, y) for the UNet
        check = getattr(self.module, "_check_inputs", None)
        if check is not None:  # one-line errors, which a compiled graph cannot raise
            check(*args)
        given = tuple(a.float() if a.is_floating_point() else a for a in args if a is not None)
        if self.part == "unet" and given[1].ndim == 0:
            given = (given[0], given[1].expand(given[0].shape[0]), *given[2:])
        key = tuple((tuple(a.shape), str(a.dtype)) for a in given)
        if key not in self._compiled:
            self._compiled[key] = self._compile(given, key)
        compiled = self._compiled[key]
        outputs = compiled([a.detach().cpu().numpy() for a in given])
        if isinstance(compiled, _Calibrating) and len(compiled.samples) >= CALIBRATION_CALLS:
            self._compiled[key] = self._quantise(compiled)
        return torch.from_numpy(outputs[0].copy())

    def _xml(self, key, quant: Optional[str]) -> Path:
        ov = openvino_module()
        name = hashlib.sha256(repr((VERSION, self.checkpoint_hash, self.part, key, quant or False, ov.__version__,
                                    torch.__version__)).encode()).hexdigest()[:20]
        return cache_dir() / f"{self.part}-{name}.xml"

    def _compile(self, args: tuple, key) -> Any:
        _ready_cache_dir()
        if self.quant == "int8-ptq":
            target = self._xml(key, "int8-ptq")
            with _locked(target):
                if cached(target, f"int8 {self.part}"):  # calibrated and quantised by an earlier run
                    return self._load(target)
            xml = self._converted(args, key, None)
            with _locked(xml):
                return _Calibrating(self._load(xml), xml, target)
        xml = self._converted(args, key, self.quant)
        with _locked(xml):
            return self._load(xml)

    def _converted(self, args: tuple, key, quant: Optional[str]) -> Path:
        """The converted model's file (exported and converted now unless cached and intact)."""
        xml = self._xml(key, quant)
        with _locked(xml):
            if not cached(xml, self.part):
                self._convert(args, key, quant, xml)
        return xml

    def _convert(self, args: tuple, key, quant: Optional[str], xml: Path) -> None:
        ov = openvino_module()
        start = time.perf_counter()
        note(f"converting the {self.part} for OpenVINO ({' x '.join(str(tuple(s)) for s, _ in key)}; once, "
             f"cached in {cache_dir()})")
        with torch.no_grad():
            exported = torch.export.export(self.module, args)
        converted = ov.convert_model(exported)
        if quant == "int8":
            converted = _int8_weights(converted)
        self._save(converted, xml)
        note(f"{self.part} converted in {time.perf_counter() - start:.1f} s")

    def _quantise(self, calibrating: _Calibrating) -> Any:
        ov = openvino_module()
        start = time.perf_counter()
        note(f"quantising the {self.part} to int8 on {len(calibrating.samples)} of this run's calls (once, cached)")
        quantised = _int8_ptq(ov.Core().read_model(str(calibrating.xml)), calibrating.samples)
        with _locked(calibrating.target):
            self._save(quantised, calibrating.target)
            note(f"{self.part} quantised in {time.perf_counter() - start:.1f} s; the remaining steps run in int8")
            return self._load(calibrating.target)

    def _save(self, model, xml: Path) -> None:
        """Write a converted model into the cache atomically: under a temporary name, then .bin, its digest
        and .xml renamed (the .xml's presence means "cached"; the digest is checked on every read), so an
        interrupted or failed write leaves nothing to reuse."""
        ov = openvino_module()
        partial = xml.with_name(xml.stem + ".partial.xml")
        try:
            # compress_to_fp16 (save_model's default) would round every weight to fp16: keep them as they are
            ov.save_model(model, str(partial), compress_to_fp16=False)
            partial.with_suffix(".sha256").write_text(_digest(partial) + "\n")
            os.replace(partial.with_suffix(".bin"), xml.with_suffix(".bin"))
            os.replace(partial.with_suffix(".sha256"), xml.with_suffix(".sha256"))
            os.replace(partial, xml)
        except (RuntimeError, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise SDError(f"cannot write the converted {self.part} to {xml.parent} ({first}): is the disk full? "
                          "(the cache is $XDG_CACHE_HOME/sd/openvino, by default ~/.cache/sd/openvino)") from None
        finally:
            for leftover in (partial, partial.with_suffix(".bin"), partial.with_suffix(".sha256")):
                leftover.unlink(missing_ok=True)

    def _load(self, xml: Path) -> Any:
        ov = openvino_module()
        core = ov.Core()
        core.set_property({"CACHE_DIR": str(cache_dir())})
        try:
            return core.compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": self.hint})
        except RuntimeError:
            pass
        try:  # once more without OpenVINO's compiled-blob cache, in case its blob is what is damaged
            return ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": self.hint})
        except RuntimeError as exc:
            cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
            why = f" (ONEDNN_MAX_CPU_ISA={cap} hides instructions OpenVINO chose kernels for)" if cap else ""
            first = str(exc).strip().splitlines()[-1]
            raise SDError(f"OpenVINO cannot compile the {self.part}{QUANT_LABEL[self.quant]} on this CPU{why}: "
                          f"{first}") from None


def _nncf():
    import logging

    try:
        import nncf
    except ImportError as exc:
        raise SDError("--precision int8 / int8-ptq need NNCF: pip install nncf") from exc
    logging.getLogger("nncf").setLevel(logging.WARNING)  # its statistics table is not for sd's stderr
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime", on importing nncf
    return nncf


def _int8_ptq(model, samples: list):
    """Hybrid post-training quantisation (the recipe optimum-intel applies to diffusion models): int8 weights
    for the matrix products with constant weights, then weights and activations in int8 for the rest
    (the convolutions), calibrated on recorded inputs, with NNCF's transformer rules (without them it also
    quantises elementwise inputs such as the timestep before its sinusoid: UNet error 0.2-0.76 on the demo
    model; with them 5-8e-2) and SmoothQuant off."""
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters

    weighted = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"
                and any(op.input_value(i).get_node().get_type_name() == "Constant" for i in (0, 1))]
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):  # its progress bars
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                           ignored_scope=nncf.IgnoredScope(types=["Convolution"], validate=False))
        return nncf.quantize(compressed, nncf.Dataset(samples), subset_size=len(samples),
                             model_type=nncf.ModelType.TRANSFORMER, ignored_scope=nncf.IgnoredScope(names=weighted, validate=False),
                             advanced_parameters=nncf.AdvancedQuantizationParameters(
                                 smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1),
                                 # its per-layer statistics of the full-size UNet outgrew 24 GiB (killed); without
                                 # it the quantisation peaks at 18.8 GB RSS (measured, docs/benchmarks.md)
                                 disable_bias_correction=True))


def _int8_weights(converted):
    """NNCF's int8 weight compression (asymmetric, per output channel) of a converted model."""
    nncf = _nncf()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):  # its progress bar
        return nncf.compress_weights(converted, mode=nncf.CompressWeightsMode.INT8_ASYM)


class _TextAtDepth(nn.Module):
    """The text tower at the embedder's fixed depth, token ids in, features out: what OpenVINO converts."""

    def __init__(self, tower: nn.Module, skip_last: int):
        super().__init__()
        self.tower, self.skip_last = tower, skip_last

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower(tokens, skip_last=self.skip_last)  # (B, 77, W)


class OpenVINOTextTower(nn.Module):
    """The text tower (cond_stage_model.model) on OpenVINO for plain prompts; a call with textual-inversion
    vectors (or another depth) runs the PyTorch tower, which stays for it and for attribute reads."""

    inner = "tower"
    __getattr__ = falls_through

    def __init__(self, tower: nn.Module, skip_last: int, checkpoint_hash: str, hint: str):
        super().__init__()
        self.tower, self.skip_last = tower, skip_last
        self.part = OpenVINOPart(_TextAtDepth(tower, skip_last), "text", checkpoint_hash, hint)

    def forward(self, tokens: torch.Tensor, skip_last: int = 0, vectors=()) -> torch.Tensor:
        if vectors or skip_last != self.skip_last:
            return self.tower(tokens, skip_last=skip_last, vectors=vectors)
        return self.part(tokens)


def use_openvino(model: nn.Module, checkpoint_hash: str, quant: Optional[str] = None) -> None:
    """Put the UNet, the VAE decoder and encoder and the text encoder of a loaded fp32 model on OpenVINO, in
    float32; `quant` ("int8", "int8-ptq") quantises the UNet only. MiDaS and unCLIP's image tower stay in PyTorch.

    Not bf16: on the full-size UNet its bf16 inference hint measured 0.54 relative error against fp32
    (PyTorch's bf16: 1.8e-2), 2 times faster than its f32 (docs/benchmarks.md)."""
    openvino_module()
    hint = "f32"
    holder = model.model
    # int8 weights for the UNet only: the decoder's pixels stay float32
    holder.diffusion_model = OpenVINOPart(holder.diffusion_model, "unet", checkpoint_hash, hint, quant)
    vae = getattr(model, "first_stage_model", None)
    if vae is not None:
        vae.decoder = OpenVINOPart(vae.decoder, "decoder", checkpoint_hash, hint)
        vae.encoder = OpenVINOPart(vae.encoder, "encoder", checkpoint_hash, hint)
    text = getattr(model, "cond_stage_model", None)
    if text is not None and hasattr(text, "layer_idx"):
        text.model = OpenVINOTextTower(text.model, text.layer_idx, checkpoint_hash, hint)
