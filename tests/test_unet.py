"""The SD 2.x UNet and its attention blocks.

- keys and shapes of every full-size UNet against the reference checkpoint key lists (meta device);
- numbers against diffusers' UNet2DConditionModel loaded through diffusers' own converter from the
  original key format (an independent implementation of the same network);
- ATTN_PRECISION: float32 attention logits in half precision; timestep embedding of fractional t;
- input/parameter errors, meta build + assign loading, dtype handling.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.errors import SDError
from ldm.modules.attention import CrossAttention, SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample
from ldm.modules.diffusionmodules.util import timestep_embedding
from tests.tinyckpt import manifest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
FULL_CONFIGS = ROOT / "configs" / "stable-diffusion"
TINY_CONFIGS = ROOT / "tests" / "configs"
PREFIX = "model.diffusion_model."


def unet_params(config_path: Path, **overrides) -> dict:
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    params = dict(config["model"]["params"]["unet_config"]["params"])
    params.update(overrides)
    return params


def reference_shapes(tsv_name: str) -> dict[str, tuple[int, ...]]:
    """The UNet's keys (prefix kept) and shapes in a real checkpoint."""
    return {PREFIX + key: shape for key, shape in manifest(tsv_name, PREFIX).items()}


def shape_diff(ours: dict, ref: dict, limit: int = 20) -> str:
    lines = [f"missing   {k} {ref[k]}" for k in sorted(ref.keys() - ours.keys())]
    lines += [f"unexpected {k} {ours[k]}" for k in sorted(ours.keys() - ref.keys())]
    lines += [f"shape     {k} ours {ours[k]} ref {ref[k]}" for k in sorted(ours.keys() & ref.keys()) if ours[k] != ref[k]]
    more = f"\n... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


# unCLIP-H has no config in this repository; its UNet is v2-inference's with the image-embedding MLP
# (label_emb.0.0: Linear(2048, 1280)), which the key list shows.
UNCLIP_OVERRIDES = {"num_classes": "sequential", "adm_in_channels": 2048}


@pytest.mark.parametrize("tsv_name, config_name, overrides", [
    ("v2-inference", "v2-inference", {}),
    ("v2-inference-v", "v2-inference-v", {}),
    ("v2-inpainting-inference", "v2-inpainting-inference", {}),
    ("v2-midas-inference", "v2-midas-inference", {}),
    ("x4-upscaling", "x4-upscaling", {}),
    ("v2-1-stable-unclip-h-inference", "v2-inference", UNCLIP_OVERRIDES),
])
def test_full_size_keys_and_shapes_match_reference(tsv_name, config_name, overrides):
    params = unet_params(FULL_CONFIGS / f"{config_name}.yaml", **overrides)
    with torch.device("meta"):
        model = UNetModel(**params)
    ours = {PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = reference_shapes(tsv_name)
    assert ours == ref, "\n" + shape_diff(ours, ref)
    assert all(p.is_meta for p in model.parameters())
    assert not list(model.buffers())  # nothing for a loader to recompute after assign


# ---------------------------------------------------------------- numbers against diffusers


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Seeded values of a sensible scale for every weight (default init zeroes whole branches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def diffusers_twin(original_config: dict, model: UNetModel, **config_overrides):
    """diffusers' UNet2DConditionModel holding `model`'s weights, converted by diffusers' own
    original-format converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                      create_unet_diffusers_config_from_ldm)

    checkpoint = {PREFIX + k: v for k, v in model.state_dict().items()}
    # (diffusers guesses its sample_size from the keys; it does not affect the numbers)
    config = create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    config.update(config_overrides)
    twin = UNet2DConditionModel(**config)
    twin.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return twin.eval()


# diffusers' converter derives head counts from num_head_channels only for linear projections (the
# SD 2.x layout); for 1x1-conv projections it reads num_heads (SD 1.x) and otherwise builds an
# unusable config (attention_head_dim None). The conv variant therefore fixes num_heads. It also
# takes a per-level transformer_depth to cover that path.
CONV_VARIANT = {"use_linear_in_transformer": False, "num_head_channels": -1, "num_heads": 2,
                "transformer_depth": [1, 2]}


@pytest.mark.parametrize("config_name, overrides, twin_overrides", [
    ("tiny-v2-inference.yaml", {}, {}),
    ("tiny-v2-inference.yaml", CONV_VARIANT, {}),
    ("tiny-x4-upscaling.yaml", {}, {}),  # num_classes 1000, disable_self_attentions [True, False]
    ("tiny-v2-inference.yaml", {"num_classes": "sequential", "adm_in_channels": 16}, {}),  # unCLIP's label MLP
    # The converter ignores use_scale_shift_norm; diffusers' name for it is set by hand.
    ("tiny-v2-inference.yaml", {"use_scale_shift_norm": True}, {"resnet_time_scale_shift": "scale_shift"}),
], ids=["linear", "conv-depth-list", "x4-classes", "sequential-adm", "scale-shift"])
@pytest.mark.parametrize("size", [(16, 16), (9, 14)], ids=["16x16", "odd-9x14"])
def test_tiny_unet_matches_diffusers(config_name, overrides, twin_overrides, size):
    original = OmegaConf.to_container(OmegaConf.load(TINY_CONFIGS / config_name), resolve=True)
    params = original["model"]["params"]["unet_config"]["params"]
    params.update(overrides)
    model = UNetModel(**params).eval()
    randomize_(model, seed=0)
    twin = diffusers_twin(original, model, **twin_overrides)

    g = torch.Generator().manual_seed(1)
    # An odd side: the encoder's stride-2 convolution rounds 9 up to 5 and the decoder's Upsample must
    # meet the 9-row skip again (diffusers does this with its upsample_size).
    x = torch.randn(2, params["in_channels"], *size, generator=g)
    t = torch.tensor([17.0, 903.25])  # one fractional timestep: samplers interpolate
    context = torch.randn(2, 7, params["context_dim"], generator=g)
    y = None
    if params.get("num_classes") == "sequential":
        y = torch.randn(2, params["adm_in_channels"], generator=g)
    elif params.get("num_classes") is not None:
        y = torch.tensor([20, 350])  # the upscaler's noise levels
    with torch.no_grad():
        ours = model(x, t, context, y)
        theirs = twin(x, t, encoder_hidden_states=context, class_labels=y).sample
        assert ours.shape == (2, params["out_channels"], *size)
        assert rel_err(ours, theirs) < 1e-4
        # The comparison is sensitive: 1% on one attention weight deep inside moves the output by
        # about 1e-3, ten times the tolerance.
        weight = model.get_parameter("middle_block.1.transformer_blocks.0.attn2.to_k.weight")
        weight.mul_(1.01)
        assert rel_err(model(x, t, context, y), theirs) > 2e-4
        weight.div_(1.01)
        if y is not None:  # the label really conditions the output
            assert rel_err(model(x, t, context, y.flip(0)), ours) > 1e-2


# ---------------------------------------------------------------- attention precision


def seeded_attention(monkeypatch, precision: str, dtype: torch.dtype) -> CrossAttention:
    monkeypatch.setenv("ATTN_PRECISION", precision)
    attn = CrossAttention(64, context_dim=32, heads=2, dim_head=32)  # reads ATTN_PRECISION here
    randomize_(attn, seed=0)
    return attn.to(dtype).eval()


def attention_references(attn: CrossAttention, x: torch.Tensor, context: torch.Tensor):
    """Outputs of `attn` with its core softmax(q k^T / sqrt(d)) v done (a) in float64 from the same
    half-precision q, k, v, and (b) purely in the half dtype, as the reference does without the upcast
    (logits rounded to half, softmax in half)."""
    b, n, _ = x.shape

    def heads(t):  # (B, N, H*D) -> (B, H, N, D)
        return t.view(b, t.shape[1], attn.heads, attn.dim_head).transpose(1, 2)

    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(context)), heads(attn.to_v(context))
    logits64 = q.double() @ k.double().transpose(-1, -2) * attn.dim_head ** -0.5
    core64 = (logits64.softmax(-1) @ v.double()).to(x.dtype)
    logits_half = (q @ k.transpose(-1, -2)) * attn.dim_head ** -0.5
    core_half = logits_half.softmax(-1) @ v

    def finish(core):
        return attn.to_out(core.transpose(1, 2).reshape(b, n, -1))

    return finish(core64), finish(core_half), logits64.abs().max().item()


def attention_case(monkeypatch, dtype: torch.dtype, scale: float, batch: int, n: int, m: int,
                   autocast: bool = False):
    """Our upcasting attention on seeded inputs of the given scale, with its two references.

    dtype is the weights' dtype; with autocast the weights stay float32 and the call runs under CPU
    bfloat16 autocast, whose Linears give what a bfloat16 copy of the module gives.
    Returns (ours, float64-core reference, pure half reference, max |logit|).
    """
    attn = seeded_attention(monkeypatch, "fp32", dtype)
    assert attn.upcast
    half = torch.bfloat16 if autocast else dtype
    g = torch.Generator().manual_seed(1)
    x = scale * torch.randn(batch, n, 64, generator=g)
    context = scale * torch.randn(batch, m, 32, generator=g)
    with torch.no_grad():
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = attn(x, context)
            attn = attn.to(half)
        else:
            out = attn(x.to(half), context.to(half))
        refs = attention_references(attn, x.to(half), context.to(half))
    assert out.dtype == half
    return (out, *refs)


def test_attention_logits_are_float32_in_bf16(monkeypatch):
    out, ref64, ref_bf16, max_logit = attention_case(monkeypatch, torch.bfloat16, 6.0, 2, 50, 20)
    assert max_logit > 60  # large logits: bfloat16 spacing there is 0.5, so rounding them matters
    # Pure bfloat16 attention is 1.7% off here; ours matches the float64 core to bfloat16 output rounding.
    assert rel_err(ref_bf16, ref64) > 1e-2
    assert rel_err(out, ref64) < 1e-3
    assert rel_err(out, ref_bf16) > 1e-2


def test_attention_upcast_under_cpu_autocast(monkeypatch):
    """float32 weights under bfloat16 autocast: q, k, v come out of the Linears in bfloat16 and the
    attention is still done in float32 (autocast alone would run SDPA in bfloat16)."""
    out, ref64, ref_bf16, _ = attention_case(monkeypatch, torch.float32, 6.0, 2, 50, 20, autocast=True)
    assert rel_err(out, ref64) < 1e-3
    assert rel_err(out, ref_bf16) > 1e-2


def test_attention_fp32_prevents_fp16_overflow(monkeypatch):
    """The SD 2.1-v black-image case: q.k beyond float16's 65504 is inf in half and NaN after softmax."""
    out, ref64, ref_fp16, max_logit = attention_case(monkeypatch, torch.float16, 80.0, 1, 16, 8)
    assert max_logit * math.sqrt(32) > 65504  # q.k itself overflows float16
    assert torch.isnan(ref_fp16).any()
    assert torch.isfinite(out).all()
    assert rel_err(out, ref64) < 1e-3


def test_attn_precision_fp16_skips_the_upcast_and_bad_values_fail(monkeypatch):
    assert not seeded_attention(monkeypatch, "fp16", torch.bfloat16).upcast
    monkeypatch.setenv("ATTN_PRECISION", "fp8")
    with pytest.raises(SDError, match="ATTN_PRECISION"):
        CrossAttention(64)


def test_attention_matches_float64_in_float32(monkeypatch):
    attn = seeded_attention(monkeypatch, "fp32", torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 10, 64, generator=g)
    with torch.no_grad():
        ref64, _, _ = attention_references(attn.double(), x.double(), x.double()[..., :32])
        out = attn.float()(x, x[..., :32])
    assert rel_err(out, ref64) < 1e-6


# ---------------------------------------------------------------- timesteps


def test_timestep_embedding_pinned_and_continuous():
    t = torch.tensor([2.0, 2.5, 3.0])
    emb = timestep_embedding(t, 8)  # frequencies 10000^(-k/4) = 1, 0.1, 0.01, 0.001
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    expected = [math.cos(2.5), math.cos(0.25), math.cos(0.025), math.cos(0.0025),
                math.sin(2.5), math.sin(0.25), math.sin(0.025), math.sin(0.0025)]
    assert emb[1].tolist() == pytest.approx(expected, abs=1e-6)
    assert emb[1, 0].item() == pytest.approx(-0.8011436, abs=1e-6)
    # A fractional t embeds the midpoint of the sinusoids' arguments: recover them with atan2.
    args = torch.atan2(emb[:, 4:], emb[:, :4])  # arguments < pi, so no wrap-around
    assert torch.allclose(args[1], (args[0] + args[2]) / 2, atol=1e-6)
    # Integer and float timesteps give the same embedding; an odd width is zero-padded.
    assert torch.equal(timestep_embedding(torch.tensor([2, 3]), 8), emb[[0, 2]])
    odd = timestep_embedding(t, 9)
    assert torch.equal(odd[:, :8], emb) and odd[:, 8].abs().max() == 0


def tiny_unet(**overrides) -> UNetModel:
    model = UNetModel(**unet_params(TINY_CONFIGS / "tiny-v2-inference.yaml", **overrides)).eval()
    randomize_(model, seed=3)
    return model


def tiny_inputs(batch: int = 2, size: int = 8):
    """(x, timesteps, context) for the tiny txt2img UNet."""
    g = torch.Generator().manual_seed(4)
    x, context = torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 5, 32, generator=g)
    return x, torch.linspace(10.0, 700.0, batch), context


def tiny_case():
    """A seeded tiny UNet, inputs, and its float32 output on them."""
    model = tiny_unet()
    x, t, context = tiny_inputs()
    with torch.no_grad():
        return model, x, t, context, model(x, t, context)


def test_unet_long_float_and_scalar_timesteps_agree():
    model = tiny_unet()
    x, _, context = tiny_inputs()
    with torch.no_grad():
        by_long = model(x, torch.tensor([500, 500]), context)
        assert torch.equal(model(x, torch.tensor([500.0, 500.0]), context), by_long)
        assert torch.equal(model(x, torch.tensor(500), context), by_long)
        assert rel_err(model(x, torch.tensor([500.5, 500.5]), context), by_long) > 1e-6


# ---------------------------------------------------------------- loading, dtypes, layout


def test_meta_build_then_assign_loads_exactly():
    model, x, t, context, ref = tiny_case()
    with torch.device("meta"):
        empty = UNetModel(**unet_params(TINY_CONFIGS / "tiny-v2-inference.yaml"))
    empty.load_state_dict(model.state_dict(), strict=True, assign=True)
    with torch.no_grad():
        assert torch.equal(empty.eval()(x, t, context), ref)


def test_precision_flags_are_recorded_not_applied():
    with torch.device("meta"):
        bf16 = UNetModel(**unet_params(FULL_CONFIGS / "intel" / "v2-inference-bf16.yaml"))
        fp16 = UNetModel(**unet_params(FULL_CONFIGS / "v2-inference.yaml"))
        fp32 = UNetModel(**unet_params(FULL_CONFIGS / "intel" / "v2-inference-fp32.yaml"))
    assert (bf16.dtype_hint, fp16.dtype_hint, fp32.dtype_hint) == (torch.bfloat16, torch.float16, torch.float32)
    assert {p.dtype for m in (bf16, fp16, fp32) for p in m.parameters()} == {torch.float32}


def test_bf16_weights_run_in_bf16_and_return_input_dtype():
    model, x, t, context, ref = tiny_case()
    with torch.no_grad():
        out = model.to(torch.bfloat16)(x, t, context)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 3e-2  # bfloat16 has 8 bits of mantissa


def test_channels_last_gives_the_same_numbers():
    model, x, t, context, ref = tiny_case()
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x.to(memory_format=torch.channels_last), t, context)
    assert rel_err(out, ref) < 1e-5


def test_resampling_without_convolutions_is_pool_and_repeat():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert Downsample(1, use_conv=False)(x).tolist() == [[[[2.5, 4.5], [10.5, 12.5]]]]
    up = Upsample(1, use_conv=False)(x)
    assert torch.equal(up, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    model = UNetModel(**unet_params(TINY_CONFIGS / "tiny-v2-inference.yaml", conv_resample=False))
    assert not [k for k in model.state_dict() if ".op." in k or k.endswith("conv.weight")]


def test_num_attention_blocks_limits_transformers_per_level():
    model = UNetModel(**unet_params(TINY_CONFIGS / "tiny-v2-inference.yaml", num_res_blocks=2,
                                    num_attention_blocks=[1, 1]))
    where = [name for name, m in model.named_modules() if isinstance(m, SpatialTransformer)]
    # Per level: the first encoder block and the first decoder block; plus the middle.
    assert where == ["input_blocks.1.1", "input_blocks.4.1", "middle_block.1", "output_blocks.0.1",
                     "output_blocks.3.1"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, names", [
    ({"use_spatial_transformer": False}, "use_spatial_transformer"),
    ({"n_embed": 8192}, "n_embed"),
    ({"dims": 3}, "dims"),
    ({"resblock_updown": True}, "resblock_updown"),
    ({"context_dim": None}, "context_dim"),
    ({"num_head_channels": -1, "num_heads": -1}, "num_heads"),
    ({"num_head_channels": 12}, "num_head_channels"),
    ({"num_head_channels": -1, "num_heads": 24}, "num_heads"),  # 32 channels do not make 24 equal heads
    ({"num_classes": "sequential"}, "adm_in_channels"),
    ({"num_classes": "continuous"}, "num_classes"),
    ({"disable_self_attentions": [True]}, "disable_self_attentions"),
    ({"transformer_depth": [1, 1, 1]}, "transformer_depth"),
    ({"num_res_blocks": [1]}, "num_res_blocks"),
    ({"num_attention_blocks": [2, 2]}, "num_attention_blocks"),
    ({"model_channels": 48}, "model_channels"),
])
def test_unsupported_parameters_raise_sderror_naming_them(overrides, names):
    with pytest.raises(SDError, match=names):
        UNetModel(**unet_params(TINY_CONFIGS / "tiny-v2-inference.yaml", **overrides))


def test_bad_inputs_raise_sderror():
    model = tiny_unet()
    x, t, context = tiny_inputs()
    with pytest.raises(SDError, match="in_channels|expected"):
        model(torch.zeros(2, 9, 8, 8), t, context)
    with pytest.raises(SDError, match="context"):
        model(x, t, None)
    with pytest.raises(SDError, match="context"):
        model(x, t, torch.zeros(2, 5, 16))
    with pytest.raises(SDError, match="num_classes"):
        model(x, t, context, y=torch.tensor([1, 2]))
    with pytest.raises(SDError, match="timesteps"):
        model(x, torch.tensor([1.0, 2.0, 3.0]), context)
    labelled = UNetModel(**unet_params(TINY_CONFIGS / "tiny-x4-upscaling.yaml"))
    with pytest.raises(SDError, match="num_classes"):
        labelled(torch.zeros(2, 7, 8, 8), t, context)
