"""How much the input picture matters at each unCLIP noise level, on a demo-sized unCLIP model.

No trained unCLIP weights can be had offline, so this builds the demo model's architecture (configs/demo)
as an unCLIP model (a small OpenAI-style ViT image tower, the embedding noise, the UNet's label MLP) with
seeded random weights, and measures, per noise level, the mean absolute pixel difference (0..255)
between variations of two different pictures made with the same seed. With the embedding noised to level
l, the picture's share of the conditioning is sqrt(alphas_cumprod[l]), so the gap should fall with l and
vanish near 999. Also: the same picture mixed with itself (weights 1, 1) against the picture alone.

    .venv/bin/python benchmarks/unclip_noise_level.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.pipeline import Pipeline  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402
from tests.conftest import smooth_photo  # noqa: E402
from tests.tinyckpt import randomize_, save_tiny  # noqa: E402

LEVELS = (0, 100, 250, 500, 750, 900, 999)


def demo_sized_unclip_config():
    config = OmegaConf.load(ROOT / "configs" / "demo" / "demo-inference.yaml")
    params = config.model.params
    config.model.target = "ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion"
    params.conditioning_key = "crossattn-adm"
    params.unet_config.params.num_classes = "sequential"
    params.unet_config.params.adm_in_channels = 128  # a 64-wide image embedding and its level embedding
    params.embedder_config = {"target": "ldm.modules.encoders.modules.ClipImageEmbedder", "params": {
        "model": "ViT-L/14", "vision_cfg": {"image_size": 224, "layers": 4, "width": 128, "head_width": 64,
                                            "patch_size": 14, "embed_dim": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}}
    params.noise_aug_config = {"target": "ldm.modules.encoders.modules.CLIPEmbeddingNoiseAugmentation", "params": {
        "timestep_dim": 64, "noise_schedule_config": {"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}}}
    return config


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = demo_sized_unclip_config()
        OmegaConf.save(config, tmp / "demo-unclip.yaml")
        model = randomize_(instantiate_from_config(config.model), 0).eval()
        ckpt = save_tiny(model, tmp / "demo-unclip.safetensors")
        rgb = smooth_photo()
        Image.fromarray(rgb).save(tmp / "a.png")
        Image.fromarray(np.ascontiguousarray(rgb[::-1, ::-1, [2, 0, 1]])).save(tmp / "b.png")
        pipe = Pipeline.load(ckpt, tmp / "demo-unclip.yaml", device="cpu", precision="full", quiet=True)
        settings = dict(width=256, height=256, steps=20, seed=1, batch_size=1)
        start = time.perf_counter()
        print("| noise level | mean |pixel difference| between the variations of two pictures, same seed |")
        print("| --- | --- |")
        for level in LEVELS:
            a, b = (np.asarray(pipe.variations(tmp / name, noise_level=level, **settings)[0].image, dtype=np.float64)
                    for name in ("a.png", "b.png"))
            print(f"| {level} | {np.abs(a - b).mean():.3f} |")
        one = np.asarray(pipe.variations(tmp / "a.png", **settings)[0].image)
        two = np.asarray(pipe.variations([tmp / "a.png", tmp / "a.png"], weights=[1, 1], **settings)[0].image)
        print(f"\nthe picture mixed with itself vs alone: {'identical' if np.array_equal(one, two) else 'DIFFERENT'} "
              f"({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
