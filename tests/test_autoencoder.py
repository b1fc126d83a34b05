"""AutoencoderKL: checkpoint key layout, agreement with diffusers' VAE, the posterior's sampling rule."""
import os
from pathlib import Path

import pytest
import torch

from ldm.errors import SDError
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config, load_config
from tests.tinyckpt import manifest, randomize_

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers must never reach the hub here

ROOT = Path(__file__).resolve().parents[1]
tsv_shapes = manifest  # {key without prefix: shape} of a real checkpoint's rows under a prefix


def meta_shapes(config_path: Path, stage: str) -> dict[str, tuple]:
    """{key: shape} of the stage built on the meta device from a config file."""
    with torch.device("meta"):
        module = instantiate_from_config(load_config(config_path).model.params[stage])
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ["v2-inference", "x4-upscaling"])
def test_full_size_vae_keys_and_shapes_equal_the_checkpoint(name):
    expected = tsv_shapes(name, "first_stage_model.")
    assert len(expected) > 200  # the tsv really lists the VAE
    got = meta_shapes(ROOT / "configs/stable-diffusion" / f"{name}.yaml", "first_stage_config")
    assert got == expected


def tiny_vae(config_name: str, seed: int = 0) -> tuple[AutoencoderKL, dict]:
    """The tiny VAE of a test config with seeded random weights (norm scales and biases included)."""
    config = load_config(ROOT / "tests/configs" / config_name)
    vae = instantiate_from_config(config.model.params.first_stage_config)
    return randomize_(vae, seed).eval(), config


def diffusers_twin(vae: AutoencoderKL, config) -> torch.nn.Module:
    """diffusers' AutoencoderKL holding the same weights, converted by diffusers' own single-file code."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
    from omegaconf import OmegaConf

    checkpoint = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    original_config = OmegaConf.to_container(config, resolve=True)
    dconfig = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    twin = DiffusersVAE(**dconfig).eval()
    twin.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, dconfig), strict=True)
    return twin


@pytest.mark.parametrize("config_name, factor", [("tiny-v2-inference.yaml", 8), ("tiny-x4-upscaling.yaml", 4)])
def test_tiny_vae_matches_diffusers(config_name, factor):
    vae, config = tiny_vae(config_name)
    twin = diffusers_twin(vae, config)
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 32, 24, generator=generator) * 2 - 1  # non-square catches H/W mix-ups
    z = torch.randn(2, 4, 32 // factor, 24 // factor, generator=generator)
    with torch.no_grad():
        posterior = vae.encode(image)
        reference = twin.encode(image).latent_dist
        decoded, decoded_twin = vae.decode(z), twin.decode(z).sample

    assert posterior.mean.shape == (2, 4, 32 // factor, 24 // factor)
    assert rel_err(posterior.mean, reference.mean) < 1e-4
    assert rel_err(posterior.logvar, reference.logvar) < 1e-4
    assert decoded.shape == (2, 3, 32, 24)
    assert rel_err(decoded, decoded_twin) < 1e-4


def test_attention_block_is_single_head_softmax_attention():
    """The SDPA attention against the written-out formula softmax(q k^T / sqrt(C)) v."""
    from ldm.modules.diffusionmodules.model import AttnBlock

    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(1, 32, 3, 5)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # (1, 32, 15)
        weights = torch.softmax(q.transpose(1, 2) @ k / 32**0.5, dim=-1)  # (1, 15, 15)
        expected = x + block.proj_out((v @ weights.transpose(1, 2)).view(1, 32, 3, 5))
        assert rel_err(block(x), expected) < 1e-5


def test_ckpt_path_is_refused_not_loaded():
    ddconfig = dict(load_config(ROOT / "tests/configs/tiny-v2-inference.yaml")
                    .model.params.first_stage_config.params.ddconfig)
    with pytest.raises(SDError, match="main checkpoint"):
        AutoencoderKL(ddconfig=ddconfig, embed_dim=4, ckpt_path="vae.ckpt")


def test_posterior_sample_uses_the_generator_and_mode_is_the_mean():
    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    posterior = DiagonalGaussianDistribution(moments)
    mean, logvar = moments[:, :4], moments[:, 4:]
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))

    assert torch.equal(posterior.sample(torch.Generator().manual_seed(7)), posterior.mean + posterior.std * eps)
    assert torch.allclose(posterior.std, torch.exp(0.5 * logvar))
    assert torch.equal(posterior.mode(), mean)
    # logvar is clamped to [-30, 20] as in the reference
    assert DiagonalGaussianDistribution(torch.full((1, 2, 1, 1), 50.0)).logvar.item() == 20.0
