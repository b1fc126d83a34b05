"""MiDaS DPT-Hybrid: checkpoint keys, agreement with transformers' DPT-hybrid, pinned tiny outputs, input sizing."""
import os
import re
import socket
from pathlib import Path

import pytest
import torch

from ldm.errors import SDError
from ldm.modules.midas.api import MiDaSInference, midas_input_size, prepare_midas_input
from ldm.modules.midas.dpt import resize_pos_embed
from tests.test_autoencoder import meta_shapes, tsv_shapes
from tests.tinyckpt import randomize_

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach the hub here

ROOT = Path(__file__).resolve().parents[1]


def tiny_midas(seed: int = 0) -> MiDaSInference:
    return randomize_(MiDaSInference(tiny=True), seed).eval()


def test_full_size_keys_and_shapes_equal_the_checkpoint_without_any_download(monkeypatch):
    import timm.models._builder

    def no_network(*args, **kwargs):
        raise AssertionError("MiDaS construction tried to fetch weights")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)
    expected = tsv_shapes("v2-midas-inference", "depth_model.")
    assert len(expected) == 368
    got = meta_shapes(ROOT / "configs/stable-diffusion/v2-midas-inference.yaml", "depth_stage_config")
    assert got == expected


def test_only_dpt_hybrid_is_supported():
    with pytest.raises(SDError, match="dpt_hybrid"):
        MiDaSInference(model_type="dpt_large", tiny=True)


def test_position_embedding_resize_is_the_identity_at_the_native_grid():
    g = torch.Generator().manual_seed(0)
    for tokens, side in ((577, 24), (17, 4)):
        pos = torch.randn(1, tokens, 8, generator=g)
        assert torch.equal(resize_pos_embed(pos, (side, side)), pos)
    resized = resize_pos_embed(pos, (6, 10))  # non-square grid: class entry kept, grid resampled
    assert resized.shape == (1, 61, 8) and torch.equal(resized[:, 0], pos[:, 0])


def test_tiny_depth_is_pinned():
    midas = tiny_midas()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    depth = midas(x)  # (2, 1, 64, 64)
    assert depth.shape == (2, 1, 64, 64)
    assert depth.min() >= 0  # non_negative head
    torch.testing.assert_close(depth.mean(), torch.tensor(0.660691), atol=1e-4, rtol=0)
    got = torch.stack([depth[0, 0, 0, 0], depth[0, 0, 31, 17], depth[1, 0, 63, 63], depth[1, 0, 10, 50]])
    torch.testing.assert_close(got, torch.tensor([0.310812, 1.043913, 0.354478, 0.608757]), atol=1e-4, rtol=0)


def test_non_square_input_gives_a_depth_map_of_its_size():
    depth = tiny_midas()(torch.zeros(1, 3, 64, 96))
    assert depth.shape == (1, 1, 64, 96)


def test_sides_must_be_multiples_of_32():
    with pytest.raises(SDError, match="multiples of 32"):
        tiny_midas()(torch.zeros(1, 3, 64, 80))


def test_staged_encoder_reproduces_timm_at_the_native_size():
    """Our forward (stages read one by one, own position-embedding handling) equals timm's own forward."""
    encoder = tiny_midas().model.pretrained
    vit = encoder.model
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    taps = []
    hook = vit.blocks[-1].register_forward_hook(lambda module, args, out: taps.append(out))
    with torch.no_grad():
        layer1, layer2, _, _ = encoder(x)
        hook.remove()
        torch.testing.assert_close(vit.norm(taps[0]), vit.forward_features(x), atol=1e-5, rtol=1e-5)
        resnet = vit.patch_embed.backbone
        torch.testing.assert_close(layer2, resnet.stages[:2](resnet.stem(x)), atol=0, rtol=0)
        assert layer1.shape == (2, 32, 16, 16) and layer2.shape == (2, 64, 8, 8)


def to_transformers(midas: MiDaSInference):
    """The same tiny weights in transformers' DPTForDepthEstimation (is_hybrid, BiT backbone): an
    independent implementation of DPT-hybrid (its conversion script reproduces MiDaS's dpt_hybrid)."""
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(
        is_hybrid=True, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128,
        image_size=64, patch_size=16, backbone_out_indices=[0, 1, 1, 2], neck_hidden_sizes=[32, 64, 32, 32],
        reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=32, layer_norm_eps=1e-6,
        backbone_featmap_shape=[1, 128, 4, 4], readout_type="project", hidden_act="gelu", qkv_bias=True,
        backbone_config=dict(
            layer_type="bottleneck", global_padding="same", embedding_dynamic_padding=True, depths=[1, 1, 1],
            hidden_sizes=[32, 64, 128], embedding_size=16, num_groups=8,
            out_features=["stage1", "stage2", "stage3"],
        ),
    )
    hf = DPTForDepthEstimation(config).eval()
    ours = midas.model.state_dict()
    renames = [
        ("pretrained.model.cls_token", "dpt.embeddings.cls_token"),
        ("pretrained.model.pos_embed", "dpt.embeddings.position_embeddings"),
        ("pretrained.model.patch_embed.backbone.stem.conv", "dpt.embeddings.backbone.bit.embedder.convolution"),
        ("pretrained.model.patch_embed.backbone.stem.norm", "dpt.embeddings.backbone.bit.embedder.norm"),
        ("pretrained.model.patch_embed.backbone.stages", "dpt.embeddings.backbone.bit.encoder.stages"),
        (".blocks.", ".layers."),
        ("pretrained.model.patch_embed.proj", "dpt.embeddings.projection"),
        ("pretrained.model.layers.", "dpt.encoder.layer."),
        (r"(encoder\.layer\.\d+)\.norm1\.", r"\1.layernorm_before."),  # the ResNet's norm1/2 keep their names
        (r"(encoder\.layer\.\d+)\.norm2\.", r"\1.layernorm_after."),
        (".attn.proj.", ".attention.output.dense."),
        (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense."),
        ("pretrained.model.norm.", "dpt.layernorm."),
        ("pretrained.act_postprocess3.0.project.", "neck.reassemble_stage.readout_projects.2."),
        ("pretrained.act_postprocess4.0.project.", "neck.reassemble_stage.readout_projects.3."),
        ("pretrained.act_postprocess3.3.", "neck.reassemble_stage.layers.2.projection."),
        ("pretrained.act_postprocess4.3.", "neck.reassemble_stage.layers.3.projection."),
        ("pretrained.act_postprocess4.4.", "neck.reassemble_stage.layers.3.resize."),
        ("scratch.output_conv.", "head.head."),
        (".resConfUnit1.conv", ".residual_layer1.convolution"),
        (".resConfUnit2.conv", ".residual_layer2.convolution"),
        (".out_conv.", ".projection."),
    ] + [(f"scratch.layer{i}_rn.", f"neck.convs.{i - 1}.") for i in range(1, 5)] + [
        (f"scratch.refinenet{i}.", f"neck.fusion_stage.layers.{4 - i}.") for i in range(1, 5)  # coarse first
    ]
    converted = {}
    for key, value in ours.items():
        if key.startswith("pretrained.model.head."):
            continue  # timm's classifier, unused by DPT
        for old, new in renames:
            key = re.sub(old, new, key)
        if ".attn.qkv." in key:  # timm's fused qkv = [query; key; value]
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                converted[key.replace(".attn.qkv.", f".attention.attention.{name}.")] = part
        else:
            converted[key] = value
    hf.load_state_dict(converted, strict=True)
    return hf


@pytest.fixture(scope="module")
def tiny_and_transformers():
    midas = tiny_midas(seed=3)
    return midas, to_transformers(midas)


@pytest.mark.parametrize("side", [64, 128])
def test_tiny_agrees_with_transformers_dpt_hybrid(tiny_and_transformers, side):
    midas, hf = tiny_and_transformers
    # transformers refuses other sizes than its config's, but resizes the position embedding for
    # any size exactly as MiDaS does; allow 128 px (8 x 8 tokens from the 4 x 4 grid).
    hf.dpt.embeddings.image_size = (side, side)
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        expected = hf(pixel_values=x).predicted_depth  # (2, side, side)
    got = midas(x)[:, 0]
    assert expected.abs().mean() > 1e-2  # the comparison is not between two zero maps
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "size, expected",
    [
        ((512, 512), (384, 384)),
        ((768, 768), (384, 384)),
        ((256, 256), (384, 384)),
        ((512, 768), (384, 576)),  # (H, W): the side nearer 384 becomes 384
        ((768, 512), (576, 384)),
        ((480, 640), (384, 512)),
        ((1024, 576), (672, 384)),  # width's scale 0.667 is nearer 1 than height's 0.375
        ((300, 600), (384, 768)),  # upscaling: height's 1.28 is nearer 1 than width's 0.64
        ((512, 192), (384, 128)),  # 144 / 32 = 4.5 rounds half to even (numpy's rule), not to 160
    ],
)
def test_midas_input_size_follows_the_reference_minimal_resize(size, expected):
    assert midas_input_size(*size) == expected
    image = torch.zeros(1, 3, *size)
    assert prepare_midas_input(image).shape == (1, 3, *expected)


def test_prepare_midas_input_matches_cv2_inter_cubic():
    cv2 = pytest.importorskip("cv2")
    np = pytest.importorskip("numpy")
    image = torch.rand(1, 3, 200, 300, generator=torch.Generator().manual_seed(5)) * 2 - 1
    got = prepare_midas_input(image)  # (1, 3, 256, 384): the width (scale 1.28) is nearer 384
    # The reference: [-1, 1] -> [0, 1] numpy HWC, cv2 INTER_CUBIC, then normalise with mean = std = 0.5.
    array = ((image[0].permute(1, 2, 0).numpy() + 1) * 0.5).astype(np.float32)
    resized = cv2.resize(array, (384, 256), interpolation=cv2.INTER_CUBIC)
    expected = torch.from_numpy((resized - 0.5) / 0.5).permute(2, 0, 1)[None]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_prepare_midas_input_rejects_extreme_aspect_ratios():
    with pytest.raises(SDError, match="elongated"):
        prepare_midas_input(torch.zeros(1, 3, 32, 2048))
