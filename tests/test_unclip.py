"""Stable unCLIP's model: keys of the real checkpoints, and numbers against independent implementations.

- the models built from the two reference configs have exactly the keys and shapes of the checkpoints;
- the image towers equal transformers' CLIPVisionModelWithProjection (what diffusers'
  StableUnCLIPImg2ImgPipeline embeds with) holding the same weights, GELU (H) and QuickGELU (L);
- the embedding noise equals diffusers' StableUnCLIPImg2ImgPipeline.noise_image_embeddings (its
  StableUnCLIPImageNormalizer and DDPMScheduler), and the UNet conditioned on it equals diffusers' UNet;
- the weighted mix, level 0's near-identity, the statistics rule and bad inputs.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldm.loading.checkpoint import build_on_meta
from ldm.errors import SDError
from ldm.util import load_config
from tests.test_unet import diffusers_twin, rel_err
from tests.tinyckpt import CONFIGS, build_tiny, manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variant", ["h", "l"])
def test_full_size_model_has_the_checkpoint_keys(variant):
    name = f"v2-1-stable-unclip-{variant}-inference"
    model = build_on_meta(load_config(ROOT / "configs" / "stable-diffusion" / f"{name}.yaml").model)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = manifest(name)
    assert sorted(ours.keys() - ref.keys()) == [] and sorted(ref.keys() - ours.keys()) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}
    # the non-persistent buffers (pixel and embedding statistics) are real, not meta
    assert not model.embedder.mean.is_meta and not model.noise_augmentor.data_mean.is_meta


def hf_vision_twin(embedder, act: str):
    """transformers' CLIPVisionModelWithProjection holding the tower's weights (HF's own layout)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    visual = embedder.model.visual
    width = visual.conv1.weight.shape[0]
    blocks = visual.transformer.resblocks
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.weight.shape[0],
                              num_hidden_layers=len(blocks), num_attention_heads=blocks[0].attn.heads,
                              image_size=visual.image_size, patch_size=visual.conv1.weight.shape[-1],
                              projection_dim=visual.proj.shape[1], hidden_act=act, layer_norm_eps=1e-5)
    twin = CLIPVisionModelWithProjection(config).eval()
    sd = {"vision_model.embeddings.class_embedding": visual.class_embedding,
          "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
          "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
          "vision_model.pre_layrnorm.weight": visual.ln_pre.weight, "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
          "vision_model.post_layernorm.weight": visual.ln_post.weight,
          "vision_model.post_layernorm.bias": visual.ln_post.bias, "visual_projection.weight": visual.proj.T}
    for i, block in enumerate(blocks):
        p = f"vision_model.encoder.layers.{i}."
        for name, w, b in zip("qkv", block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)):
            sd[p + f"self_attn.{name}_proj.weight"], sd[p + f"self_attn.{name}_proj.bias"] = w, b
        pairs = {"self_attn.out_proj": block.attn.out_proj, "layer_norm1": block.ln_1, "layer_norm2": block.ln_2,
                 "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        for name, module in pairs.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = module.weight, module.bias
    missing, unexpected = twin.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return twin


@pytest.mark.parametrize("variant, act", [("h", "gelu"), ("l", "quick_gelu")])
def test_image_tower_matches_transformers(variant, act):
    model = build_tiny(f"tiny-unclip-{variant}.yaml", seed=3)
    twin = hf_vision_twin(model.embedder, act)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 28, 28, generator=g)
    with torch.no_grad():
        ours = model.embedder.model.visual(pixels)
        theirs = twin(pixel_values=pixels).image_embeds
    assert ours.shape == (3, 16)
    assert rel_err(ours, theirs) < 1e-5
    other = hf_vision_twin(model.embedder, "gelu" if act == "quick_gelu" else "quick_gelu")
    with torch.no_grad():  # the activation matters: the other one is measurably different
        assert rel_err(ours, other(pixel_values=pixels).image_embeds) > 1e-3


def test_preprocessing_is_the_references():
    """A constant image stays constant through the antialiased resize: (c + 1) / 2, CLIP-normalised."""
    model = build_tiny("tiny-unclip-h.yaml")
    image = torch.full((1, 3, 90, 70), 0.25)
    x = model.embedder.preprocess(image)
    assert x.shape == (1, 3, 28, 28)
    expected = (0.625 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(x[0, :, 5, 9], expected, atol=1e-5)


def diffusers_noise(embedding, level, noise, mean, std):
    """diffusers' own noising: StableUnCLIPImg2ImgPipeline.noise_image_embeddings on its components."""
    from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    normalizer = StableUnCLIPImageNormalizer(embedding_dim=embedding.shape[1])
    normalizer.mean.data.copy_(mean[None])
    normalizer.std.data.copy_(std[None])
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    pipe = SimpleNamespace(image_normalizer=normalizer, image_noising_scheduler=scheduler)
    return StableUnCLIPImg2ImgPipeline.noise_image_embeddings(pipe, embedding, level, noise=noise)


@pytest.mark.parametrize("level", [0, 1, 250, 999])
def test_noise_augmentation_and_conditioned_unet_match_diffusers(tmp_path, level):
    model = build_tiny("tiny-unclip-l.yaml", seed=1)
    g = torch.Generator().manual_seed(level)
    mean, std = torch.randn(16, generator=g), 0.5 + torch.rand(16, generator=g)
    stats = tmp_path / "stats.th"
    torch.save((mean, std), stats)
    model.noise_augmentor.use_stats(stats)
    embedding = torch.randn(2, 16, generator=g) * 2
    noise = torch.randn(2, 16, generator=g)
    ours = model.build_conditioning(embedding, level, noise=noise)["c_adm"]
    theirs = diffusers_noise(embedding, level, noise, mean, std)
    assert ours.shape == (2, 32)
    assert rel_err(ours, theirs) < 1e-5

    original = load_config(CONFIGS / "tiny-unclip-l.yaml")
    from omegaconf import OmegaConf
    twin = diffusers_twin(OmegaConf.to_container(original, resolve=True), model.model.diffusion_model)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 421.0])
    context = model.get_learned_conditioning(["a house", ""])
    with torch.no_grad():
        mine = model.apply_model(x, t, {"c_crossattn": context, "c_adm": ours})
        other = twin(x, t, encoder_hidden_states=context, class_labels=theirs).sample
    assert rel_err(mine, other) < 1e-4


def test_level_zero_keeps_the_embedding_and_the_unconditional_is_zero():
    model = build_tiny("tiny-unclip-h.yaml")
    e = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    noise = torch.ones(1, 16)
    c = model.build_conditioning(e, 0, noise=noise)["c_adm"]
    # sqrt(alphas_cumprod[0]) = 0.99998, sqrt(1 - alphas_cumprod[0]) = 0.0064 (squaredcos_cap_v2)
    assert torch.allclose(c[:, :16], 0.9999794 * e + 0.0064253 * noise, atol=1e-6)
    assert torch.allclose(c[0, 16:], torch.cat([torch.ones(8), torch.zeros(8)]))  # level 0: cos 1, sin 0
    assert torch.equal(model.uncond_extra({"c_adm": c})["c_adm"], torch.zeros_like(c))


def test_mix_is_the_weighted_mean():
    model = build_tiny("tiny-unclip-h.yaml")
    a, b = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    mixed = model.mix(torch.stack([a, b]), [0.75, 0.25])
    assert torch.allclose(mixed[0], 0.75 * a + 0.25 * b, atol=1e-6)
    assert torch.allclose(model.mix(torch.stack([a, b]), [3.0, -1.0])[0], (3 * a - b) / 2, atol=1e-5)
    assert torch.equal(model.mix(torch.stack([a, a]), [1.0, 1.0])[0], a)
    for weights in ([1.0, -1.0], [0.0, 0.0], [float("nan"), 1.0]):
        with pytest.raises(SDError, match="sum to 0"):
            model.mix(torch.stack([a, b]), weights)


def test_statistics_rule_of_unclip_l(tmp_path):
    model = build_tiny("tiny-unclip-l.yaml")
    e = torch.zeros(1, 16)
    assert model.build_conditioning(e, 0, noise=torch.zeros(1, 16))["c_adm"].shape == (1, 32)
    with pytest.raises(SDError, match="ViT-L-14_stats.th.*--clip-stats"):
        model.build_conditioning(e, 1)
    with pytest.raises(SDError, match="0..999"):
        model.build_conditioning(e, 1000)
    bad = tmp_path / "bad.th"
    torch.save((torch.zeros(3), torch.ones(3)), bad)
    with pytest.raises(SDError, match="3 / 3 values"):
        model.noise_augmentor.use_stats(bad)
    bad.write_bytes(b"not a zip")
    with pytest.raises(SDError, match="not a torch zip CLIP statistics"):
        model.noise_augmentor.use_stats(bad)
