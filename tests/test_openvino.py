"""--backend openvino: the UNet, VAE and text encoder converted (torch.export -> OpenVINO), same numbers, cached;
--backend auto."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.errors import SDError
from ldm.pipeline import Pipeline
from ldm.runtime.policy import RuntimeOptions

pytest.importorskip("openvino")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sd" / "openvino"


def psnr(a, b):
    return 10 * np.log10(255.0 ** 2 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-12))


def test_openvino_gives_torchs_numbers_and_caches_its_conversion(tiny_ckpts, cache, capsys):
    entry = tiny_ckpts["eps"]
    torch_pipe = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", precision="full", quiet=True)
    ov_pipe = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", precision="full", backend="openvino",
                            quiet=True)
    unet, part = torch_pipe.model.model.diffusion_model, ov_pipe.model.model.diffusion_model
    assert type(part).__name__ == "OpenVINOPart" and part.out_channels == unet.out_channels
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([3.0, 801.0]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ours, theirs = part(x, t, context=c), unet(x, t, context=c)
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4  # measured 1.3e-6
    settings = dict(seed=5, steps=4, width=256, height=256)
    a = np.asarray(torch_pipe.txt2img("a red cube", **settings)[0].image)
    made = ov_pipe.txt2img("a red cube", **settings)[0]
    assert psnr(np.asarray(made.image), a) > 40 and "Backend: openvino f32" in made.parameters
    err = capsys.readouterr().err
    assert "converting the unet for OpenVINO" in err and "converting the decoder for OpenVINO" in err
    assert "converting the text for OpenVINO" in err
    assert len(list(cache.glob("unet-*.xml"))) == 1  # the call above and the pipeline's batches: one shape
    again = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", backend="openvino", precision="full",
                          quiet=True).txt2img("a red cube", **settings)[0]
    assert "converting" not in capsys.readouterr().err  # the second run reads the cache
    assert again.png() == made.png()


def test_openvino_refuses_what_it_cannot_do():
    for opts, says in ((RuntimeOptions("cpu", "full", backend="openvino", torchscript=True), "drop --compile"),
                       (RuntimeOptions("cuda", "full", backend="openvino"), "runs on the CPU"),
                       (RuntimeOptions("cpu", "full", backend="tensorrt"), "--backend must be one of"),
                       (RuntimeOptions("cpu", "bf16", backend="openvino"), "runs in float32"),
                       (RuntimeOptions("cpu", "int8"), "add --backend openvino")):
        with pytest.raises(SDError, match=says):
            opts.check()


def test_openvinos_converter_cannot_phone_home():
    """OpenVINO's converter sends usage to Google Analytics when no consent file says no; sd makes it use
    its own no-op stub instead."""
    from ldm.runtime.openvino import openvino_module

    openvino_module()
    import openvino.tools.ovc.telemetry_utils as telemetry

    assert telemetry.tm.__name__ == "openvino.tools.ovc.telemetry_stub"


@pytest.mark.skipif(bool(os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")),
                    reason="OpenVINO picks its int8 kernels by the real CPU; an oneDNN ISA cap (CI's AVX2 emulation) "
                           "breaks them (sd then says so in one line)")
def test_int8_weights_stay_close(tiny_ckpts, cache):
    pytest.importorskip("nncf")
    entry = tiny_ckpts["eps"]
    torch_pipe = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", precision="full", quiet=True)
    int8 = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", precision="int8", backend="openvino",
                         quiet=True)
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([3.0, 801.0]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ours, theirs = int8.model.model.diffusion_model(x, t, c), torch_pipe.model.model.diffusion_model(x, t, c)
    error = ((ours - theirs).norm() / theirs.norm()).item()
    assert 1e-4 < error < 0.1  # rounded weights (measured 0.033 on these random tiny weights), not float32's 1e-6
    made = int8.txt2img("a red cube", seed=5, steps=2, width=256, height=256)[0]
    assert "Backend: openvino int8" in made.parameters


def test_text_encoder_and_vae_encoder_on_openvino(tiny_ckpts, cache):
    entry = tiny_ckpts["eps"]
    torch_pipe = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", precision="full", quiet=True)
    ov_pipe = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", precision="full", backend="openvino",
                            quiet=True)
    ours, theirs = ov_pipe.model, torch_pipe.model
    assert type(ours.cond_stage_model.model).__name__ == "OpenVINOTextTower"
    with torch.no_grad():
        text_ov, text_pt = (m.get_learned_conditioning(["a red cube", "two blue spheres"]) for m in (ours, theirs))
        assert ((text_ov - text_pt).norm() / text_pt.norm()).item() < 1e-5
        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        z_ov, z_pt = (m.encode_mean(image) for m in (ours, theirs))
        assert ((z_ov - z_pt).norm() / z_pt.norm()).item() < 1e-5
        # a textual-inversion call (vectors) runs the PyTorch tower; attribute reads reach it too
        tokens = ours.cond_stage_model.tokenize(["a cube"])
        vector = torch.randn(ours.cond_stage_model.model.token_embedding.weight.shape[1])
        with_vector = ours.cond_stage_model.encode_tokens(tokens, vectors=[(2, vector)])
        assert torch.equal(with_vector, theirs.cond_stage_model.encode_tokens(tokens, vectors=[(2, vector)]))
    assert len(list(cache.glob("text-*.xml"))) == 1 and len(list(cache.glob("encoder-*.xml"))) == 1


def test_backend_auto_picks_openvino_on_a_cpu_and_torch_where_openvino_cannot_serve(capsys, monkeypatch):
    from ldm.runtime import policy

    monkeypatch.setattr(policy, "cpu_has_amx", lambda: False)
    opts = RuntimeOptions("cpu", "auto", backend="auto").check()
    assert opts.resolved().backend == "openvino" and "fastest fp32-accurate" in capsys.readouterr().err
    monkeypatch.setattr(policy, "cpu_has_amx", lambda: True)  # AMX: PyTorch's bf16 (precision auto resolves to it)
    assert opts.resolved().backend == "torch" and "this CPU has AMX" in capsys.readouterr().err
    assert RuntimeOptions("cpu", "full", backend="auto").resolved(quiet=True).backend == "openvino"  # fp32 asked
    assert RuntimeOptions("cpu", "bf16", backend="auto").resolved().backend == "torch"
    assert "bf16 is PyTorch's" in capsys.readouterr().err
    assert RuntimeOptions("cpu", "full", backend="auto", torchscript=True).resolved(quiet=True).backend == "torch"
    assert RuntimeOptions("cpu", "int8", backend="auto").check().resolved(quiet=True).backend == "openvino"
    assert RuntimeOptions("cpu", "full", backend="torch").resolved().backend == "torch"  # explicit stays


def test_backend_auto_runs_through_the_pipeline(tiny_ckpts, cache, monkeypatch):
    from ldm.runtime import policy

    monkeypatch.setattr(policy, "cpu_has_amx", lambda: False)  # every CPU kind takes this path in the test
    entry = tiny_ckpts["eps"]
    pipe = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", backend="auto", quiet=True)
    made = pipe.txt2img("a red cube", seed=5, steps=2, width=256, height=256)[0]
    assert "Backend: openvino f32" in made.parameters and pipe.model.runtime.precision.mode == "full"


@pytest.mark.skipif(bool(os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")),
                    reason="OpenVINO picks its int8 kernels by the real CPU; an oneDNN ISA cap (CI's AVX2 emulation) "
                           "hides instructions they use")
def test_int8_ptq_calibrates_on_the_runs_first_calls_then_quantises(tiny_ckpts, cache, capsys, monkeypatch):
    from ldm.runtime import openvino as openvino_backend

    monkeypatch.setattr(openvino_backend, "CALIBRATION_CALLS", 3)
    entry = tiny_ckpts["eps"]
    pipe = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", precision="int8-ptq", backend="openvino",
                         quiet=True)
    f32 = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", precision="full", backend="openvino",
                        quiet=True)
    made = pipe.txt2img("a red cube", seed=5, steps=5, width=256, height=256)[0]
    err = capsys.readouterr().err
    assert "quantising the unet to int8 on 3 of this run's calls" in err and "Backend: openvino int8-ptq" in made.parameters
    assert len(list(cache.glob("unet-*.xml"))) == 2  # the float32 conversion and the quantised model
    part = pipe.model.model.diffusion_model
    g = torch.Generator().manual_seed(3)
    x, t, c = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ours, theirs = part(x, t, context=c), f32.model.model.diffusion_model(x, t, context=c)
    err_rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert 1e-4 < err_rel < 0.3  # quantised (not float32), and still the same function roughly
    again = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", precision="int8-ptq", backend="openvino",
                          quiet=True).txt2img("a red cube", seed=5, steps=5, width=256, height=256)[0]
    assert "quantising" not in capsys.readouterr().err  # a later run reuses the quantised model
    assert again.png() != made.png()  # (it runs int8 from its first step, the first run only after calibrating)


def test_a_failed_cache_write_is_one_line_and_leaves_nothing_cached(tiny_ckpts, cache, monkeypatch):
    """A full disk (or any write error) while saving the converted model: one SDError, no half model in the cache."""
    from ldm.runtime import openvino as openvino_backend

    ov = openvino_backend.openvino_module()

    def failing_save(model, path, compress_to_fp16=True):
        Path(path).write_text("<half")  # what a full disk leaves behind
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(ov, "save_model", failing_save)
    entry = tiny_ckpts["eps"]
    pipe = Pipeline.load(entry["safetensors"], entry["config"], device="cpu", precision="full", backend="openvino",
                         quiet=True)
    with pytest.raises(SDError, match="cannot write the converted .* is the disk full"):
        pipe.txt2img("a red cube", seed=1, steps=1, width=256, height=256)
    assert not list(cache.glob("*.xml")) and not list(cache.glob("*.bin"))
