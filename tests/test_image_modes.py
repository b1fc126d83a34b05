"""Inpainting, depth-to-image and x4-upscaler conditioning, pinned by independent computations."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.loading.checkpoint import build_on_meta
from ldm.errors import SDError
from ldm.modules.diffusionmodules.upscaling import ImageConcatWithNoiseAugmentation
from ldm.util import instantiate_from_config, load_config
from tests.tinyckpt import CONFIGS, manifest, randomize_

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod"]


def reference_alphas_cumprod(start=1e-4, end=2e-2, steps=1000) -> np.ndarray:
    """The reference's linear schedule, written out here in float64: linear in sqrt(beta)."""
    betas = np.linspace(start ** 0.5, end ** 0.5, steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas), betas


def build(config_name: str, seed: int, **param_overrides):
    config = load_config(CONFIGS / config_name)
    for key, value in param_overrides.items():
        config.model.params[key] = value
    return randomize_(instantiate_from_config(config.model), seed).eval()


def capture_unet_input(model, x_t, cond):
    """Run apply_model and return what the UNet was called with: (x_in, y)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["x"], seen["y"] = args[0], kwargs.get("y")

    handle = model.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.apply_model(x_t, torch.full((x_t.shape[0],), 500.0), cond)
    finally:
        handle.remove()
    return seen["x"], seen["y"]


def text_context(model, batch, seed=0):
    width = model.model.diffusion_model.context_dim
    return torch.randn((batch, 77, width), generator=torch.Generator().manual_seed(seed))


# -- the whole model's checkpoint keys ------------------------------------------------------------
@pytest.mark.parametrize("name", ["v2-inpainting-inference", "v2-midas-inference", "x4-upscaling"])
def test_full_size_model_has_exactly_the_reference_keys(name):
    model = build_on_meta(load_config(ROOT / "configs/stable-diffusion" / f"{name}.yaml").model)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = manifest(name)
    assert sorted(set(theirs) - set(ours)) == [], "missing keys"
    assert sorted(set(ours) - set(theirs)) == [], "unexpected keys"
    assert {k: (s, theirs[k]) for k, s in ours.items() if theirs[k] != s} == {}


# -- noise augmentation -----------------------------------------------------------------------------
def test_noise_augmentation_buffers_follow_the_reference_formula():
    aug = ImageConcatWithNoiseAugmentation({"linear_start": 1e-4, "linear_end": 2e-2}, max_noise_level=350)
    a, betas = reference_alphas_cumprod()
    a_prev = np.append(1.0, a[:-1])
    expected = {
        "betas": betas, "alphas_cumprod": a, "alphas_cumprod_prev": a_prev, "sqrt_alphas_cumprod": np.sqrt(a),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - a), "log_one_minus_alphas_cumprod": np.log(1 - a),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(a), "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / a - 1),
    }
    # Exactly these keys (low_scale_model.* in the checkpoint): no posterior buffers.
    assert sorted(aug.state_dict()) == sorted(SCHEDULE_BUFFERS)
    for name, values in expected.items():
        buf = getattr(aug, name)
        assert buf.dtype == torch.float32 and buf.shape == (1000,)
        torch.testing.assert_close(buf.double(), torch.from_numpy(values), rtol=1e-7, atol=1e-7, msg=name)
    assert aug.max_noise_level == 350 and aug.num_timesteps == 1000


def test_noise_augmentation_is_q_sample_at_the_given_level():
    aug = ImageConcatWithNoiseAugmentation({"linear_start": 1e-4, "linear_end": 2e-2}, max_noise_level=350)
    g = torch.Generator().manual_seed(5)
    x = torch.rand((3, 3, 8, 6), generator=g) * 2 - 1
    noise = torch.randn(x.shape, generator=g)
    a, _ = reference_alphas_cumprod()
    for level in (0, 20, 349, torch.tensor([0, 100, 999])):
        z, out_level = aug(x, level, noise=noise)
        levels = np.broadcast_to(np.asarray(level), (3,))
        ak = torch.from_numpy(a[levels]).view(3, 1, 1, 1)
        expected = ak.sqrt() * x.double() + (1 - ak).sqrt() * noise.double()
        torch.testing.assert_close(z.double(), expected, rtol=0, atol=1e-6)
        assert out_level.dtype == torch.long and out_level.tolist() == levels.tolist()
    with pytest.raises(SDError):
        aug(x, 1000, noise=noise)


def test_noise_augmentation_draws_from_the_generator_and_random_levels_below_max():
    aug = ImageConcatWithNoiseAugmentation({"linear_start": 1e-4, "linear_end": 2e-2}, max_noise_level=350)
    x = torch.zeros((2, 3, 4, 4))
    z, _ = aug(x, 999, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, aug.sqrt_one_minus_alphas_cumprod[999] * noise)
    _, levels = aug(torch.zeros((4000, 1, 1, 1)), generator=torch.Generator().manual_seed(0))
    assert int(levels.min()) == 0 and int(levels.max()) == 349


# -- inpainting ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inpaint_model():
    return build("tiny-v2-inpainting.yaml", seed=11)


def test_inpainting_c_concat_is_mask_then_masked_image_latent(inpaint_model):
    model = inpaint_model
    g = torch.Generator().manual_seed(1)
    image = torch.rand((2, 3, 64, 64), generator=g) * 2 - 1
    mask = torch.zeros((2, 1, 64, 64))
    mask[0, :, 5:37, 11:50] = 1.0   # edges off the 8-pixel grid: a wrong resize would show
    mask[1, :, 20:64, 0:29] = 0.7   # soft values: >= 0.5 means repaint, as the reference binarizes
    mask[1, :, 0:20, 40:64] = 0.3   # < 0.5: kept
    cond = model.build_conditioning(image, mask)
    c_concat = cond["c_concat"]
    assert set(cond) == {"c_concat"} and c_concat.shape == (2, 5, 8, 8)

    binary = (mask >= 0.5).float()
    # Nearest resize by an integer factor 8 picks pixel (8i, 8j).
    torch.testing.assert_close(c_concat[:, :1], binary[:, :, ::8, ::8], rtol=0, atol=0)
    # Masked-image latent: the encoder's posterior mean of the kept pixels (repaint area zero), scaled.
    with torch.no_grad():
        vae = model.first_stage_model
        moments = vae.quant_conv(vae.encoder(image * (1 - binary)))  # (B, 8, 8, 8) = [mean, logvar]
    torch.testing.assert_close(c_concat[:, 1:], 0.18215 * moments[:, :4], rtol=1e-5, atol=1e-5)

    # The UNet sees [noisy latent 4, mask 1, masked-image latent 4] = 9 channels.
    x_t = torch.randn((2, 4, 8, 8), generator=g)
    x_in, y = capture_unet_input(model, x_t, {**model.make_cond(text_context(model, 2)), **cond})
    assert x_in.shape == (2, 9, 8, 8) and y is None
    assert torch.equal(x_in[:, :4], x_t) and torch.equal(x_in[:, 4:], c_concat)
    uncond = model.uncond_extra(cond)
    assert set(uncond) == {"c_concat"} and torch.equal(uncond["c_concat"], c_concat)


def test_inpainting_rejects_mismatched_inputs(inpaint_model):
    image = torch.zeros((1, 3, 64, 64))
    with pytest.raises(SDError, match="does not match"):
        inpaint_model.build_conditioning(image, torch.zeros((1, 1, 64, 32)))
    with pytest.raises(SDError, match="multiple of 8"):
        inpaint_model.build_conditioning(torch.zeros((1, 3, 60, 64)), torch.zeros((1, 1, 60, 64)))


# -- depth-to-image -------------------------------------------------------------------------------------
def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """(n_out, n_in) float64 weights of 1-D cubic-convolution resampling, half-pixel centres, edge clamp."""
    def kernel(s):
        s = abs(s)
        if s <= 1:
            return ((a + 2) * s - (a + 3)) * s * s + 1
        if s < 2:
            return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(src))
        for k in range(base - 1, base + 3):
            m[o, min(max(k, 0), n_in - 1)] += kernel(src - k)
    return m


@pytest.fixture(scope="module")
def depth_model_without_midas():
    """The depth class with a stand-in depth stage, for the parts that do not involve MiDaS."""
    return build("tiny-v2-midas.yaml", seed=12, depth_stage_config={"target": "torch.nn.Identity"})


def test_depth_is_resized_bicubic_and_scaled_per_image_to_minus_one_one(depth_model_without_midas):
    model = depth_model_without_midas
    g = torch.Generator().manual_seed(2)
    image = torch.zeros((2, 3, 64, 48))
    depth = torch.rand((2, 1, 40, 30), generator=g) * torch.tensor([3.0, 50.0]).view(2, 1, 1, 1) + 1
    cond = model.build_conditioning(image, depth=depth)
    c_concat = cond["c_concat"]
    assert set(cond) == {"c_concat"} and c_concat.shape == (2, 1, 8, 6)

    mh, mw = bicubic_matrix(40, 8), bicubic_matrix(30, 6)
    for b in range(2):
        d = mh @ depth[b, 0].double().numpy() @ mw.T
        expected = 2 * (d - d.min()) / (d.max() - d.min()) - 1
        torch.testing.assert_close(c_concat[b, 0].double(), torch.from_numpy(expected), rtol=0, atol=1e-5)
        assert float(c_concat[b].min()) == -1.0 and abs(float(c_concat[b].max()) - 1.0) < 1e-6

    x_t = torch.randn((2, 4, 8, 6), generator=g)
    x_in, y = capture_unet_input(model, x_t, {**model.make_cond(text_context(model, 2)), **cond})
    assert x_in.shape == (2, 5, 8, 6) and y is None
    assert torch.equal(x_in[:, :4], x_t) and torch.equal(x_in[:, 4:], c_concat)
    assert torch.equal(model.uncond_extra(cond)["c_concat"], c_concat)


def test_depth_from_midas_goes_through_the_midas_input_and_the_same_scaling():
    from ldm.modules.midas.api import prepare_midas_input

    model = build("tiny-v2-midas.yaml", seed=14)
    # An elongated image keeps MiDaS's input small: 32x256 -> 64x384 (the 256 side goes to 384).
    image = torch.rand((1, 3, 32, 256), generator=torch.Generator().manual_seed(8)) * 2 - 1
    seen = {}
    handle = model.depth_model.register_forward_hook(lambda m, args, out: seen.update(x=args[0], depth=out))
    try:
        cond = model.build_conditioning(image)
    finally:
        handle.remove()
    assert torch.equal(seen["x"], prepare_midas_input(image))
    raw = seen["depth"]
    assert raw.shape == (1, 1, 64, 384) and float(raw.std()) > 0  # MiDaS's own size
    assert cond["c_concat"].shape == (1, 1, 4, 32)
    torch.testing.assert_close(cond["c_concat"], model.build_conditioning(image, depth=raw)["c_concat"])
    # For the CLI: the raw depth at MiDaS's size (build_conditioning used it resized to (4, 32)).
    torch.testing.assert_close(model.depth_from_image(image), raw)


def test_flat_depth_gives_a_finite_map(depth_model_without_midas):
    c = depth_model_without_midas.build_conditioning(torch.zeros((1, 3, 64, 64)), depth=torch.full((1, 1, 8, 8), 3.0))
    assert torch.equal(c["c_concat"], torch.full((1, 1, 8, 8), -1.0))


# -- x4 upscaler ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def upscale_model():
    return build("tiny-x4-upscaling.yaml", seed=13)


def test_upscaler_c_concat_is_the_noised_low_res_image_and_c_adm_the_level(upscale_model):
    model = upscale_model
    low = torch.rand((2, 3, 16, 12), generator=torch.Generator().manual_seed(3)) * 2 - 1
    seed = 42
    cond = model.build_conditioning(low, 20, [torch.Generator().manual_seed(seed + k) for k in range(2)])
    assert set(cond) == {"c_concat", "c_adm"}
    assert cond["c_adm"].dtype == torch.long and cond["c_adm"].tolist() == [20, 20]

    a, _ = reference_alphas_cumprod()
    noise = torch.stack([torch.randn((3, 16, 12), generator=torch.Generator().manual_seed(seed + k))
                         for k in range(2)])
    expected = np.sqrt(a[20]) * low.double() + np.sqrt(1 - a[20]) * noise.double()
    torch.testing.assert_close(cond["c_concat"].double(), expected, rtol=0, atol=1e-6)

    # Image 1 alone with its own seed gets the same augmentation as inside the batch.
    alone = model.build_conditioning(low[1:], 20, [torch.Generator().manual_seed(seed + 1)])
    assert torch.equal(alone["c_concat"][0], cond["c_concat"][1])

    # Latent at the low-res size; the UNet sees [latent 4, noised low-res 3] = 7 channels, y = level.
    x_t = torch.randn((2, 4, 16, 12), generator=torch.Generator().manual_seed(4))
    x_in, y = capture_unet_input(model, x_t, {**model.make_cond(text_context(model, 2)), **cond})
    assert x_in.shape == (2, 7, 16, 12) and y.tolist() == [20, 20]
    assert torch.equal(x_in[:, :4], x_t) and torch.equal(x_in[:, 4:], cond["c_concat"])
    assert model.downsampling_factor == 4

    uncond = model.uncond_extra(cond)
    assert set(uncond) == {"c_concat", "c_adm"}
    assert torch.equal(uncond["c_concat"], cond["c_concat"]) and torch.equal(uncond["c_adm"], cond["c_adm"])


def test_upscaler_noise_level_zero_keeps_the_image_and_range_is_checked(upscale_model):
    low = torch.rand((1, 3, 8, 8), generator=torch.Generator().manual_seed(6)) * 2 - 1
    cond = upscale_model.build_conditioning(low, 0, [torch.Generator().manual_seed(0)])
    a0 = reference_alphas_cumprod()[0][0]
    noise = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cond["c_concat"].double(),
                               np.sqrt(a0) * low.double() + np.sqrt(1 - a0) * noise.double(), rtol=0, atol=1e-6)
    for bad in (-1, 351):
        with pytest.raises(SDError, match="noise_level"):
            upscale_model.build_conditioning(low, bad, [torch.Generator().manual_seed(0)])
    with pytest.raises(SDError, match="generators"):
        upscale_model.build_conditioning(low, 20, [torch.Generator(), torch.Generator()])
