"""ldm.runtime.policy: precision resolution, the low-memory bf16 loader, the fast-path wrappers, and the
accuracy of the bf16 path (pinned on tiny models; full-size numbers are in docs/benchmarks.md)."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.runtime import policy as runtime
from ldm.errors import SDError
from ldm.runtime import fastpath
from ldm.loading import build as loading
from ldm.loading.build import load_model
from ldm.runtime.policy import RuntimeOptions, autocast_context, resolve_precision

CPU = torch.device("cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double().clamp(-1, 1) - b.double().clamp(-1, 1)) ** 2).mean().item()
    return 10 * math.log10(4.0 / mse)  # images in [-1, 1]: peak-to-peak 2


# ------------------------------------------------------------------------ precision and device
@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU with native bf16 (AVX512-BF16), whatever this machine is and however CI caps oneDNN."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})


@pytest.fixture
def plain_cpu(monkeypatch):
    """An AVX2-only CPU: bf16 is emulated there, ~160x slower than float32."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "fma"})


def test_auto_precision_follows_the_hardware(monkeypatch, native_bf16):
    assert resolve_precision("auto", CPU).mode == "bf16"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert resolve_precision("auto", CPU).mode == "bf16"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "fma"})
    assert resolve_precision("auto", CPU).mode == "full"
    assert resolve_precision("auto", torch.device("cuda")).mode == "fp16"
    # oneDNN held below AVX512_CORE_BF16 (how CI emulates an AVX2 machine) emulates bf16: no native bf16
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not runtime.cpu_has_fast_bf16() and resolve_precision("auto", CPU).mode == "full"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert runtime.cpu_has_fast_bf16()


def test_amx_is_the_flag_under_any_cap_that_leaves_it(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16"})
    assert runtime.cpu_has_amx()
    for cap, amx in (("AVX512_CORE_AMX", True), ("AVX10_1_512_AMX", True), ("AVX512_CORE_BF16", False),
                     ("AVX2", False)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert runtime.cpu_has_amx() is amx, cap
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})  # Zen 5: bf16, no AMX
    assert not runtime.cpu_has_amx() and runtime.cpu_has_fast_bf16()


def test_bf16_only_where_native_and_a_warning_when_asked(plain_cpu, capsys):
    """On a plain CPU the reference's autocast falls back to float32 with a note; an explicit bf16 runs,
    with a warning that names the measured factor."""
    assert resolve_precision("autocast", CPU).mode == "full"
    assert capsys.readouterr().err.startswith("note: --precision autocast: float32 instead of bf16")
    assert resolve_precision("bf16", CPU).unet == torch.bfloat16
    err = capsys.readouterr().err
    assert err.startswith("warning: --precision bf16 in bf16 on a CPU without native bf16") and "160x slower" in err
    assert len(err.splitlines()) == 1


def test_evaluation_decodes_in_float32_without_native_bf16(plain_cpu, monkeypatch):
    """The demo evaluation's decoder ran under bf16 autocast everywhere; on AVX2 that took 30+ minutes."""
    from ldm.training import evaluate

    seen = []

    class Model:
        def decode_first_stage(self, z):
            seen.append(torch.is_autocast_enabled("cpu"))
            return z[:, :3]

    evaluate.decode(Model(), torch.zeros(1, 4, 8, 8))
    assert seen == [False]


def test_part_dtypes_of_each_mode(native_bf16):
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    got = {m: resolve_precision(m, CPU) for m in ("full", "autocast", "bf16", "fp16")}
    assert (got["full"].unet, got["full"].text, got["full"].vae, got["full"].autocast) == (f32, f32, f32, None)
    assert (got["autocast"].unet, got["autocast"].autocast) == (f32, bf16)
    assert resolve_precision("autocast", torch.device("cuda")).autocast == f16
    assert (got["bf16"].unet, got["bf16"].text, got["bf16"].vae, got["bf16"].autocast) == (bf16, bf16, bf16, None)
    assert (got["fp16"].unet, got["fp16"].text, got["fp16"].vae) == (f16, f16, f32)  # fp16 VAEs overflow
    assert runtime.part_dtype("model.diffusion_model.out.2.weight", got["bf16"]) == bf16
    assert runtime.part_dtype("cond_stage_model.model.ln_final.weight", got["bf16"]) == bf16
    assert runtime.part_dtype("first_stage_model.decoder.conv_in.weight", got["bf16"]) == bf16
    assert runtime.part_dtype("alphas_cumprod", got["bf16"]) is None


@pytest.mark.parametrize("opts, message", [
    (RuntimeOptions(precision="half"), "--precision must be one of auto, full, autocast, bf16, fp16"),
    (RuntimeOptions(device="tpu"), "unknown --device 'tpu'"),
    (RuntimeOptions(threads=0), "--threads must be from 1 to 1024"),
    (RuntimeOptions(compile=True, torchscript=True), "pick one"),
])
def test_bad_options_fail_with_one_line(opts, message):
    with pytest.raises(SDError, match=message.replace("(", r"\(")) as info:
        opts.check()
    assert "\n" not in str(info.value)


def test_ipex_without_the_package_says_how_to_get_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ipex(name, *args, **kwargs):
        if name == "intel_extension_for_pytorch":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ipex)
    with pytest.raises(SDError, match="make install-ipex"):
        RuntimeOptions(ipex=True).check()


def test_threads_option_and_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert runtime.set_threads(None) == 1
        assert runtime.set_threads(2) == 2  # --threads wins over the environment
    finally:
        torch.set_num_threads(before)


def test_more_threads_than_allowed_cpus_is_said_once(monkeypatch, capsys):
    """numactl --physcpubind / taskset leave a process fewer CPUs: more threads than those is one warning."""
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    try:
        assert runtime.set_threads(2) == 2 and capsys.readouterr().err == ""
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert runtime.set_threads(None) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["warning: OMP_NUM_THREADS 3 is more than the 2 CPUs this process may run on (taskset, numactl "
                       "or its container): threads would take turns on a core and run slower; use --threads 2"]
    finally:
        torch.set_num_threads(before)


def test_autocast_context_per_mode(native_bf16):
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context(CPU, "autocast"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast_context(CPU, "full"):
        assert (a @ b).dtype == torch.float32


# ------------------------------------------------------------------------ loading
def test_cast_keeps_values_and_releases_mapped_sources(tmp_path):
    """Casting from a memory-mapped file: bf16 values are the rounded fp32 ones, and the fp32 source,
    whose pages were handed back to the kernel, still reads its true values (clean pages re-fault)."""
    from safetensors.torch import save_file

    from ldm.loading.checkpoint import read_state_dict

    g = torch.Generator().manual_seed(0)
    tensors = {"model.diffusion_model.w": torch.randn(256, 1024, generator=g),
               "first_stage_model.w": torch.randn(3, 5, generator=g), "betas": torch.rand(7, generator=g)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    mapped = read_state_dict(tmp_path / "x.safetensors")
    source = mapped["model.diffusion_model.w"]
    cast = loading.cast_state_dict(mapped, lambda k: runtime.part_dtype(k, resolve_precision("full", CPU))
                                   if k.startswith("first") else runtime.part_dtype(k, resolve_precision("bf16", CPU)))
    assert cast["model.diffusion_model.w"].dtype == torch.bfloat16
    assert torch.equal(cast["model.diffusion_model.w"], tensors["model.diffusion_model.w"].to(torch.bfloat16))
    assert cast["first_stage_model.w"] is mapped["first_stage_model.w"]  # kept as stored: no copy
    assert cast["betas"] is mapped["betas"]
    assert torch.equal(source, tensors["model.diffusion_model.w"])  # released pages read back from the file


def test_bf16_load_casts_unet_text_and_vae(tiny_ckpts):
    entry = tiny_ckpts["eps"]
    model = load_model(entry["config"], entry["safetensors"], RuntimeOptions(device="cpu", precision="bf16"))
    reference = entry["model"].state_dict()
    state = model.state_dict()
    for key, value in state.items():
        expected = reference[key]
        if key.startswith(("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")):
            assert value.dtype == torch.bfloat16, key
            assert torch.equal(value, expected.to(torch.bfloat16)), key
        else:
            assert value.dtype == expected.dtype, key
            assert torch.equal(value, expected), key
    assert model.runtime.precision.mode == "bf16"
    # the bf16 VAE takes and gives float32
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image = model.decode_first_stage(z)
        moments = model.first_stage_model.encode(image).mean
        reference = entry["model"].decode_first_stage(z)
    assert image.dtype == torch.float32 and moments.dtype == torch.float32
    assert psnr(image, reference) > 30.0
    # bf16 cannot overflow as fp16 does: the attention upcast is off unless ATTN_PRECISION says otherwise
    assert all(not m.upcast for m in model.modules() if hasattr(m, "to_q"))


def test_legacy_signature_and_channels_last(tiny_ckpts):
    entry = tiny_ckpts["eps"]
    model = load_model(entry["config"], entry["ckpt"], RuntimeOptions("cpu", "full"))
    conv = model.model.diffusion_model.input_blocks[0][0].weight
    assert conv.dtype == torch.float32 and conv.is_contiguous(memory_format=torch.channels_last)
    assert model.runtime.precision.mode == "full"


# ------------------------------------------------------------------------ accuracy of the fast path
def tiny_unet_inputs(batch: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.tensor([981.0, 1.0])[:batch]
    context = torch.randn(batch, 77, 32, generator=g)
    return x, t, context


def test_bf16_unet_error_is_what_bf16_rounding_explains(tiny_ckpts):
    """The bf16 path's error against fp32 is of the size that rounding to bf16 (8 significant bits,
    unit roundoff 2^-9) explains: a few times the error of the fp32 UNet whose weights alone were
    rounded to bf16, and far from fp32's own agreement (so the path really runs in bf16)."""
    entry = tiny_ckpts["eps"]
    opts = dict(device="cpu", channels_last=False)
    full = load_model(entry["config"], entry["safetensors"], RuntimeOptions(precision="full", **opts))
    half = load_model(entry["config"], entry["safetensors"], RuntimeOptions(precision="bf16", **opts))
    rounded = load_model(entry["config"], entry["safetensors"], RuntimeOptions(precision="full", **opts))
    with torch.no_grad():
        for p in rounded.model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        x, t, c = tiny_unet_inputs()
        ref = full.apply_model(x, t, {"c_crossattn": c})
        out = half.apply_model(x, t, {"c_crossattn": c})
        weights_only = rounded.apply_model(x, t, {"c_crossattn": c})
    assert out.dtype == torch.float32
    err, err_weights = rel_err(out, ref), rel_err(weights_only, ref)
    assert 2.0 ** -9 < err_weights < 2.0 ** -9 * 16  # rounding the weights alone: a few unit roundoffs
    assert err < 4 * err_weights, (err, err_weights)
    assert err > 1e-4  # fp32 would agree to ~1e-7
    # pinned: 0.0171 (weights alone 0.0101) when written; loose, as bf16 kernels differ between CPU ISAs
    assert err == pytest.approx(0.0171, rel=0.5)


def test_tiny_images_of_bf16_and_fp32_runs_agree(tiny_ckpts):
    """A short txt2img run (DDIM, CFG) in bf16 and in fp32: the decoded images agree by PSNR."""
    from ldm.plan import Item
    from ldm.request import SamplingSettings
    from ldm.sampling import sample_latents, start_noise
    from ldm.text.encoder import PromptEncoder

    entry = tiny_ckpts["v"]
    images = {}
    for precision in ("full", "bf16"):
        model = load_model(entry["config"], entry["safetensors"], RuntimeOptions("cpu", precision))
        items = [Item(0, "a red cube on a table", "", 7)]
        with torch.inference_mode(), autocast_context(model):
            encoder = PromptEncoder(model)
            c, uc = encoder([items[0].prompt]), encoder([""])
            noise, gens = start_noise([item.seed for item in items], (4, 16, 16))
            latents = sample_latents(model, noise, gens, c, uc, SamplingSettings(steps=4, sampler="ddim", scale=5.0),
                                     )
            images[precision] = model.decode_first_stage(latents).float()
    value = psnr(images["bf16"], images["full"])
    assert value > 30.0, value
    assert images["full"].std() > 0.05  # not a blank image that would agree trivially


# ------------------------------------------------------------------------ graph paths
def test_torchscript_traces_per_shape_and_matches_eager(tiny_ckpts):
    entry = tiny_ckpts["eps"]
    traced = load_model(entry["config"], entry["safetensors"],
                                RuntimeOptions("cpu", "full", torchscript=True))
    unet = traced.model.diffusion_model
    assert isinstance(unet, fastpath.FastUNet) and unet.out_channels == 4  # attributes fall through
    with torch.no_grad():
        for size in (16, 8):
            x, t, c = tiny_unet_inputs(size=size)
            expected = unet.unet(x, t, c)  # the eager module inside the wrapper
            got = traced.apply_model(x, t, {"c_crossattn": c})
            assert rel_err(got, expected) < 1e-5
    assert len(unet._graphs) == 2
    with pytest.raises(SDError, match="expected"):  # input errors still come out as one line
        traced.apply_model(torch.randn(2, 3, 16, 16), t, {"c_crossattn": c})


def test_compile_cache_points_inductor_at_the_cache_dir(tmp_path, monkeypatch):
    for name in ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/inductor-default")  # as inductor leaves it once asked
    monkeypatch.setattr(fastpath, "_USER_INDUCTOR_CACHE", None)
    opts = RuntimeOptions(compile=True, compile_cache=tmp_path / "cc")
    fastpath.enable_compile_cache(fastpath.compile_cache_dir(opts))
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cc")
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
    assert (tmp_path / "cc").is_dir()


def test_intel_bf16_configs_use_bf16_only_where_it_is_native(monkeypatch, capsys):
    from ldm.util import load_config

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    root = __import__("pathlib").Path(__file__).parent.parent / "configs" / "stable-diffusion"
    hint = runtime.config_precision_hint(load_config(root / "intel" / "v2-inference-v-bf16.yaml"))
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})
    assert hint == "bf16" and resolve_precision("auto", CPU, hint).mode == "full"
    assert "float32 instead of bf16" in capsys.readouterr().err
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert resolve_precision("auto", CPU, hint).mode == "bf16"
    hint = runtime.config_precision_hint(load_config(root / "intel" / "v2-inference-v-fp32.yaml"))
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})
    assert hint is None and resolve_precision("auto", CPU, hint).mode == "full"


def test_ipex_is_never_a_default(monkeypatch):
    """IPEX is end-of-life: even installed, only --ipex uses it."""
    import importlib.util

    bf16 = resolve_precision("bf16", CPU)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # "installed"
    assert RuntimeOptions().use_ipex(CPU, bf16) is False
    assert RuntimeOptions(ipex=False).use_ipex(CPU, bf16) is False
    assert RuntimeOptions(ipex=True).use_ipex(CPU, bf16) is True
