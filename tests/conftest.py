import os

import numpy as np
import pytest

# Tests never touch the network; libraries that could try must know it up front.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """Tiny eps and v txt2img checkpoints in both formats, built once per test session."""
    from tests.tinyckpt import build_tiny, save_tiny

    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for kind, cfg in (("eps", "tiny-v2-inference.yaml"), ("v", "tiny-v2-inference-v.yaml")):
        model = build_tiny(cfg, seed=1 if kind == "eps" else 2)
        out[kind] = {
            "config": os.path.join(os.path.dirname(__file__), "configs", cfg),
            "ckpt": save_tiny(model, root / f"tiny-{kind}.ckpt"),
            "safetensors": save_tiny(model, root / f"tiny-{kind}.safetensors"),
            "model": model,
        }
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    """monkeypatch for a module's fixtures (a server built once per test module)."""
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(autouse=True)
def agreeing_probe(request, monkeypatch):
    """Tiny random-weight UNets predict neither eps nor v, so ldm.loading.detect's probe would call every explicit
    tiny config wrong. Unless a test is marked `real_probe`, the probe agrees with the loaded config; the
    probe itself is tested on analytic UNets and the demo model (tests/test_detect.py)."""
    if request.node.get_closest_marker("real_probe"):
        return
    import ldm.loading.detect

    monkeypatch.setattr(ldm.loading.detect, "probe_parameterization",
                        lambda model: (model.parameterization, 1.0 if model.parameterization == "eps" else 0.0))


def pytest_configure(config):
    config.addinivalue_line("markers", "real_probe: run ldm.loading.detect's eps/v probe for real (see agreeing_probe)")


def smooth_photo() -> np.ndarray:
    """A smooth 260x300 test picture (uint8 (300, 260, 3); sides not multiples of 8)."""
    yy, xx = np.mgrid[0:300, 0:260] / 300.0
    rgb = np.stack([128 + 100 * np.sin(6 * xx), 128 + 100 * np.cos(5 * yy), 255 * xx * yy], -1).clip(0, 255)
    return rgb.astype(np.uint8)
