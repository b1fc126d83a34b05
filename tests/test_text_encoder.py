"""FrozenOpenCLIPEmbedder: checkpoint keys, agreement with transformers' CLIPTextModel (weights converted
by diffusers) and with open_clip's own text transformer, and the tokenizer's padding/truncation rules."""
import os

import open_clip
import pytest
import torch

from ldm.errors import SDError
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from tests.test_autoencoder import ROOT, meta_shapes, rel_err, tsv_shapes
from tests.tinyckpt import randomize_

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers/diffusers must never reach the hub here

TINY = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=3)
PROMPTS = [
    "",
    "a photo",
    "a professional photograph of an astronaut riding a triceratops, highly detailed, 8k",
    "lorem ipsum " * 30,  # longer than 77 tokens: truncated
]
SOT, EOT = 49406, 49407  # open_clip's <start_of_text> / <end_of_text>


@pytest.mark.parametrize("name", ["v2-inference", "x4-upscaling"])
def test_full_size_text_tower_keys_and_shapes_equal_the_checkpoint(name):
    expected = tsv_shapes(name, "cond_stage_model.")
    assert expected["model.token_embedding.weight"] == (49408, 1024)  # ViT-H-14 numbers came from open_clip
    assert sum(k.endswith("attn.in_proj_weight") for k in expected) == 24
    got = meta_shapes(ROOT / "configs/stable-diffusion" / f"{name}.yaml", "cond_stage_config")
    assert got == expected


def tiny_embedder(layer: str) -> FrozenOpenCLIPEmbedder:
    embedder = FrozenOpenCLIPEmbedder(arch="tiny", text_cfg=TINY, layer=layer, device="cpu")
    return randomize_(embedder, seed=0)


def clip_text_model_twin(embedder: FrozenOpenCLIPEmbedder):
    """transformers' CLIPTextModel with the same weights: config built here (no hub), keys mapped by
    diffusers' own single-file converter for SD 2.x OpenCLIP checkpoints."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                            layer_norm_eps=1e-5, projection_dim=32)
    twin = CLIPTextModel(config).eval()
    checkpoint = {f"cond_stage_model.{k}": v for k, v in embedder.state_dict().items()}
    converted = convert_open_clip_checkpoint(twin, checkpoint)
    if not hasattr(twin, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel; diffusers strips the same
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = twin.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)  # only a non-weight buffer left
    return twin


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_tiny_text_tower_matches_transformers_clip(layer):
    embedder = tiny_embedder(layer)
    twin = clip_text_model_twin(embedder)
    tokens = embedder.tokenize(PROMPTS)
    with torch.no_grad():
        ours = embedder.encode_tokens(tokens)
        out = twin(input_ids=tokens, output_hidden_states=True)
        # SD 2 "penultimate": the hidden state before the last layer, through the final layer norm
        hidden = out.hidden_states[-2] if layer == "penultimate" else out.hidden_states[-1]
        expected = getattr(twin, "text_model", twin).final_layer_norm(hidden)
    assert ours.shape == (len(PROMPTS), 77, 32)
    for i in range(len(PROMPTS)):  # per prompt, so a short prompt's error is not hidden by the others
        assert rel_err(ours[i], expected[i]) < 1e-4
    if layer == "last":
        assert rel_err(ours, out.last_hidden_state) < 1e-4


def test_tiny_text_tower_matches_open_clip_reference_steps():
    """The reference's own computation on open_clip's TextTransformer: embed, resblocks with open_clip's
    causal attn_mask, stop before the last block for "penultimate", then ln_final."""
    from open_clip.transformer import TextTransformer

    embedder = tiny_embedder("penultimate")
    reference = TextTransformer(**TINY, output_dim=32).eval()
    weights = {k: v for k, v in embedder.model.state_dict().items() if k != "logit_scale"}
    reference.load_state_dict(weights, strict=True)
    tokens = embedder.tokenize(PROMPTS)
    with torch.no_grad():
        x = reference.token_embedding(tokens) + reference.positional_embedding
        for block in reference.transformer.resblocks[:-1]:
            x = block(x, attn_mask=reference.attn_mask)
        expected = reference.ln_final(x)
        assert rel_err(embedder(PROMPTS), expected) < 1e-5


def test_tokenize_pins_start_end_and_zero_padding():
    embedder = tiny_embedder("last")
    tokens = embedder.tokenize(["a photo"])
    assert tokens.dtype == torch.long and tokens.shape == (1, 77)
    assert tokens[0, :4].tolist() == [SOT, 320, 1125, EOT]  # "a" = 320, "photo" = 1125 in the CLIP BPE
    assert tokens[0, 4:].eq(0).all()
    assert torch.equal(tokens, open_clip.tokenize(["a photo"]))
    assert embedder.count_truncated(["a photo"]) == [0]


def test_long_prompt_is_cut_with_the_end_token_kept_and_counted():
    embedder = tiny_embedder("last")
    text = " ".join(["cat"] * 100)  # "cat" is one BPE token: 100 tokens + start + end = 102
    tokens = embedder.tokenize([text, "a photo"])
    assert tokens[0, 0] == SOT and tokens[0, 76] == EOT
    assert tokens[0, 1:76].eq(tokens[0, 1]).all()  # 75 "cat" tokens survive
    assert torch.equal(tokens, open_clip.tokenize([text, "a photo"]))
    assert embedder.count_truncated([text, "a photo"]) == [102 - 77, 0]
    assert embedder.count_truncated(" ".join(["cat"] * 75)) == [0]  # exactly 77 fits


def test_text_encoder_builds_on_meta_and_refuses_bad_configs():
    with torch.device("meta"):
        embedder = FrozenOpenCLIPEmbedder(layer="penultimate")  # ViT-H-14 from open_clip's shipped json
    assert embedder.model.positional_embedding.shape == (77, 1024)
    assert len(embedder.model.transformer.resblocks) == 24 and not embedder.model.training
    assert not any(p.requires_grad for p in embedder.parameters())
    with pytest.raises(SDError, match="layer"):
        FrozenOpenCLIPEmbedder(arch="tiny", text_cfg=TINY, layer="pooled")
    with pytest.raises(SDError, match="unknown open_clip architecture"):
        FrozenOpenCLIPEmbedder(arch="no-such-arch")
    with pytest.raises(SDError, match="hf-hub"):
        FrozenOpenCLIPEmbedder(arch="hf-hub:laion/whatever")
