import os

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
