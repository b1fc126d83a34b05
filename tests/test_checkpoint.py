"""Checkpoint loading: safe, strict, exact, and the keys of the reference checkpoints."""
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from ldm.loading.checkpoint import build_on_meta, read_state_dict
from ldm.loading.build import load_model
from ldm.errors import SDError
from ldm.util import load_config
from tests.tinyckpt import CONFIGS, build_tiny, manifest, save_tiny

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["v2-inference", "v2-inference-v"])
def test_full_size_model_has_exactly_the_reference_keys(name):
    model = build_on_meta(load_config(ROOT / "configs/stable-diffusion" / f"{name}.yaml").model)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = manifest(name)
    assert sorted(set(ours) - set(theirs)) == []
    assert sorted(set(theirs) - set(ours)) == []
    assert {k: s for k, s in ours.items() if theirs[k] != s} == {}
    # Built on meta: no weight was allocated or randomly initialised (schedule buffers are real).
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 1_200_000_000


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs/stable-diffusion/intel").glob("*.yaml")))
def test_intel_configs_build_the_same_model_as_the_reference(name):
    base = "v2-inference-v" if "-v-" in name else "v2-inference"
    ours = build_on_meta(load_config(ROOT / "configs/stable-diffusion/intel" / name).model)
    ref = build_on_meta(load_config(ROOT / "configs/stable-diffusion" / f"{base}.yaml").model)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.parameterization == ("v" if "-v-" in name else "eps")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = build_tiny("tiny-v2-inference.yaml", seed=3)
    return model, save_tiny(model, root / "m.ckpt"), save_tiny(model, root / "m.safetensors")


@pytest.mark.parametrize("fmt", [1, 2])
def test_loaded_weights_equal_the_saved_ones_bit_for_bit(tiny, fmt):
    model, *paths = tiny
    loaded = load_model(CONFIGS / "tiny-v2-inference.yaml", paths[fmt - 1])
    ref = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert not any(t.is_meta for t in got.values())


def test_safetensors_tensors_are_views_of_the_mapped_file(tiny):
    _, _, path = tiny
    sd = read_state_dict(path)
    # No copy: every tensor points into one mapping of the file, so their data spans no more than it.
    ptrs = [t.data_ptr() for t in sd.values() if t.numel()]
    end = max(t.data_ptr() + t.numel() * t.element_size() for t in sd.values() if t.numel())
    assert end - min(ptrs) <= path.stat().st_size
    assert len(ptrs) > 100


def test_truncated_files_fail_with_one_line(tiny, tmp_path):
    _, ckpt, st = tiny
    for src in (ckpt, st):
        bad = tmp_path / ("cut" + src.suffix)
        bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        with pytest.raises(SDError) as err:
            read_state_dict(bad)
        assert "\n" not in str(err.value) and str(bad) in str(err.value)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SD_TEST_MARKER']}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SD_TEST_MARKER", str(marker))
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(SDError, match="refusing to load"):
        read_state_dict(path)
    assert not marker.exists()
    legacy = tmp_path / "legacy.ckpt"
    legacy.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(SDError, match="legacy pickle"):
        read_state_dict(legacy)
    assert not marker.exists()


def test_wrong_config_names_the_keys_and_the_config_that_fits(tiny):
    _, ckpt, _ = tiny
    with pytest.raises(SDError) as err:
        load_model(CONFIGS / "tiny-v2-inpainting.yaml", ckpt)
    msg = str(err.value)
    assert "model.diffusion_model.input_blocks.0.0.weight (32, 4, 3, 3) vs (32, 9, 3, 3)" in msg
    assert "txt2img checkpoint" in msg and "\n" not in msg


def test_missing_and_unexpected_keys_are_counted_and_named(tiny, tmp_path):
    model, _, _ = tiny
    sd = dict(model.state_dict())
    sd.pop("model.diffusion_model.out.2.bias")
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    path = tmp_path / "odd.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(SDError) as err:
        load_model(CONFIGS / "tiny-v2-inference.yaml", path)
    msg = str(err.value)
    assert "1 missing (model.diffusion_model.out.2.bias)" in msg
    assert "1 unexpected (model.diffusion_model.extra.weight)" in msg


def test_ema_copies_are_ignored_with_a_note(tiny, tmp_path, capsys):
    model, _, _ = tiny
    sd = dict(model.state_dict())
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(5)
    path = save_tiny_dict(sd, tmp_path / "ema.ckpt")
    loaded = load_model(CONFIGS / "tiny-v2-inference.yaml", path)
    assert torch.equal(loaded.state_dict()["betas"], model.state_dict()["betas"])
    assert "ignoring 2 training-only entries" in capsys.readouterr().err


def save_tiny_dict(sd, path):
    torch.save({"state_dict": sd}, path)
    return path


def test_describe_sd1_checkpoint(tmp_path):
    from ldm.loading.keys import describe_checkpoint
    sd = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(1)}
    assert "1.x" in describe_checkpoint(sd)
    assert "inpainting" in describe_checkpoint({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)})
    assert "x4 upscaler" in describe_checkpoint({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(256, 7, 3, 3)})


def test_meta_build_of_a_full_size_model_is_cheap_and_leaves_torch_init_alone():
    """Building SD 2.x on meta runs no initialiser: nn.init.normal_ on a meta tensor would import
    torch._dynamo (seconds at every load) through its decomposition's wrapper; nor open_clip/timm/torchvision."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from ldm.loading.checkpoint import build_on_meta\n"
        "from ldm.util import load_config\n"
        "init_before = torch.nn.init.normal_\n"
        "model = build_on_meta(load_config('configs/stable-diffusion/v2-inference-v.yaml').model)\n"
        "assert torch.nn.init.normal_ is init_before\n"
        "t = torch.empty(3); torch.nn.init.constant_(t, 2.0); assert t.tolist() == [2.0] * 3\n"
        "print(sum(p.numel() for p in model.parameters()), sorted(m for m in ('torch._dynamo', 'open_clip', 'timm', "
        "'torchvision') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    count, modules = out.stdout.split(" ", 1)
    assert int(count) > 1_200_000_000 and modules.strip() == "[]"


def test_a_safetensors_header_length_ending_in_0x80_is_not_taken_for_a_pickle(tmp_path):
    """The first byte of a safetensors file is its header length's low byte; 0x80 is also the pickle marker."""
    import struct

    from safetensors.torch import save_file

    from ldm.loading.checkpoint import read_state_dict

    path = tmp_path / "w.safetensors"
    for pad in range(300):
        save_file({"w": torch.ones(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80 and struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80
    assert torch.equal(read_state_dict(path)["w"], torch.ones(2))
