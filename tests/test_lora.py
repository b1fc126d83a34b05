"""LoRA: kohya and PEFT files merged by sd give what diffusers' own LoRA loading gives; undone exactly."""
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.adapters import lora
from ldm.errors import SDError
from tests.test_unet import diffusers_twin, rel_err
from tests.tinyckpt import CONFIGS, build_tiny

pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (test-only)")

# What the test LoRA touches: UNet attention (incl. cross-attention), projections, feed-forward, a
# resnet's 3x3 conv (LoCon) and the text tower's q/k/v (fused in OpenCLIP), out_proj and MLP.
UNET_TARGETS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
                "down_blocks.0.attentions.0.proj_in", "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
                "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q", "down_blocks.0.resnets.0.conv1",
                "up_blocks.0.resnets.1.conv2"]
TEXT_TARGETS = [(0, "self_attn_q_proj"), (0, "self_attn_k_proj"), (1, "self_attn_v_proj"), (1, "self_attn_out_proj"),
                (2, "mlp_fc1"), (0, "mlp_fc2")]


@pytest.fixture(scope="module")
def model():
    return build_tiny("tiny-v2-inference.yaml", 1)


def kohya_lora(model, rank=4, seed=0) -> dict:
    """A kohya-ss file's tensors for the tiny model, random ups/downs/alphas (sized from our own weights)."""
    g = torch.Generator().manual_seed(seed)
    found = lora.targets(model)
    out = {}
    names = ["lora_unet_" + t.replace(".", "_") for t in UNET_TARGETS] + \
            [f"lora_te_text_model_encoder_layers_{i}_{p}" for i, p in TEXT_TARGETS]
    for name in names:
        target = found[name]
        shape = target.param.shape if target.rows is None else target.param[target.rows].shape
        conv = len(shape) == 4
        down_shape = (rank, shape[1], *shape[2:]) if conv else (rank, shape[1])
        up_shape = (shape[0], rank, 1, 1) if conv else (shape[0], rank)
        out[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=g) / math.sqrt(math.prod(down_shape[1:]))
        out[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.5
        out[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    return out


def text_twin(embedder):
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.test_text_encoder import clip_text_model_twin

    return clip_text_model_twin(embedder)


def unet_io(model):
    g = torch.Generator().manual_seed(3)
    unet = model.model.diffusion_model
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 700.0]),
            torch.randn(2, 7, unet.context_dim, generator=g))


def test_a_kohya_lora_merged_by_sd_equals_diffusers_loading_it(model, tmp_path):
    from diffusers import StableDiffusionPipeline

    original = OmegaConf.to_container(OmegaConf.load(CONFIGS / "tiny-v2-inference.yaml"), resolve=True)
    unet_twin = diffusers_twin(original, model.model.diffusion_model)
    te_twin = text_twin(model.cond_stage_model)
    tensors = kohya_lora(model)
    save_file(tensors, str(tmp_path / "style.safetensors"))
    state, alphas = StableDiffusionPipeline.lora_state_dict({k: v.clone() for k, v in tensors.items()})
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet_twin, adapter_name="style")
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=te_twin, adapter_name="style")

    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = lora.Merged(model)
    merged.apply([(lora.read_lora(tmp_path / "style.safetensors"), 1.0, 1.0)])
    x, t, context = unet_io(model)
    tokens = model.cond_stage_model.tokenize(["a red cube on a table", "two blue balls"])
    with torch.no_grad():
        ours_unet = model.model.diffusion_model(x, t, context)
        theirs_unet = unet_twin(x, t, encoder_hidden_states=context).sample
        ours_text = model.cond_stage_model.model(tokens, skip_last=0)
        hidden = te_twin(input_ids=tokens, output_hidden_states=True).hidden_states[-1]
        theirs_text = getattr(te_twin, "text_model", te_twin).final_layer_norm(hidden)
    assert rel_err(ours_unet, theirs_unet) < 1e-4
    assert rel_err(ours_text, theirs_text) < 1e-4
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == 14  # 9 UNet weights; text: in_proj of blocks 0 and 1, out_proj of 1, fc1 of 2, fc2 of 0
    merged.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bit for bit


def test_a_peft_lora_gives_the_same_weights_as_its_kohya_twin(model, tmp_path):
    tensors = kohya_lora(model, seed=1)
    peft = {}
    for key, value in tensors.items():
        prefix, role = key.rsplit(".", 2)[0], key.split(".", 1)[1]
        name = prefix.removeprefix("lora_unet_")
        if prefix.startswith("lora_unet_"):
            dotted = "unet." + next(t for t in UNET_TARGETS if t.replace(".", "_") == name)
        else:
            i, part = prefix.removeprefix("lora_te_text_model_encoder_layers_").split("_", 1)
            dotted = f"text_encoder.text_model.encoder.layers.{i}.{part.replace('self_attn_', 'self_attn.').replace('mlp_', 'mlp.')}"
        peft[dotted + {"lora_down.weight": ".lora_A.weight", "lora_up.weight": ".lora_B.weight", "alpha": ".alpha"}[role]] = value
    save_file(tensors, str(tmp_path / "k.safetensors"))
    save_file(peft, str(tmp_path / "p.safetensors"))
    results = []
    for name in ("k", "p"):
        merged = lora.Merged(model)
        merged.apply([(lora.read_lora(tmp_path / f"{name}.safetensors"), 0.7, 1.3)])
        results.append({k: v.clone() for k, v in model.state_dict().items()})
        merged.restore()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_bad_loras_are_one_line(model, tmp_path):
    tensors = kohya_lora(model)
    save_file({**tensors, "lora_unet_nowhere_block.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_nowhere_block.lora_up.weight": torch.zeros(8, 4)}, str(tmp_path / "stray.safetensors"))
    merged = lora.Merged(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SDError, match="1 of 16 updates match nothing in this model \\(first: lora_unet_nowhere_block\\)"):
        merged.apply([(lora.read_lora(tmp_path / "stray.safetensors"), 1.0, 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    save_file(tensors, str(tmp_path / "xl.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(SDError, match="is for SDXL"):
        lora.read_lora(tmp_path / "xl.safetensors")
    sd1 = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
           "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}
    save_file(sd1, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(SDError, match="SD 1.x LoRA"):
        lora.Merged(model).apply([(lora.read_lora(tmp_path / "sd1.safetensors"), 1.0, 1.0)])
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(SDError, match="not a valid safetensors file"):
        lora.read_lora(tmp_path / "junk.safetensors")


def test_prompt_tags_and_the_flag_through_the_command(tiny_ckpts, tmp_path, capsys):
    from PIL import Image

    from ldm.files import metadata
    from ldm.cli import main

    model = tiny_ckpts["eps"]["model"]
    (tmp_path / "loras").mkdir()
    save_file(kohya_lora(model), str(tmp_path / "loras" / "style.safetensors"))
    base = ["txt2img", "--ckpt", str(tiny_ckpts["eps"]["safetensors"]), "--config", tiny_ckpts["eps"]["config"],
            "--steps", "2", "--H", "256", "--W", "256", "--n_samples", "1", "--n_iter", "1", "--precision", "full",
            "--device", "cpu", "--lora-dir", str(tmp_path / "loras")]

    def run(prompt, out, *more):
        assert main([*base, "--prompt", prompt, *more, "--outdir", str(tmp_path / out)]) == 0, capsys.readouterr().err
        path = next((tmp_path / out / "samples").glob("*.png"))
        return np.asarray(Image.open(path)), metadata.parse_parameters(metadata.read_png_text(path)["parameters"])

    plain, _ = run("a cube", "plain")
    tagged, (prompt, _, fields) = run("a cube <lora:style:0.8>", "tagged")
    flagged, _ = run("a cube", "flagged", "--lora", f"{tmp_path / 'loras' / 'style.safetensors'}:0.8")
    assert prompt == "a cube <lora:style:0.8>" and fields["Lora hashes"].startswith("style: ")
    assert not np.array_equal(plain, tagged) and np.array_equal(tagged, flagged)
    again, _ = run("a cube", "again")
    assert np.array_equal(plain, again)
    assert main([*base, "--prompt", "a <lora:missing:1>", "--outdir", str(tmp_path / "m")]) == 1
    assert "<lora:missing>: not among the LoRAs" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_a_lora_that_does_not_fit_stops_the_command_before_anything_is_written(tiny_ckpts, tmp_path, capsys):
    import pickle

    from ldm.cli import main

    (tmp_path / "loras").mkdir()
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(4, 8), "lora_unet_nowhere.lora_up.weight":
               torch.zeros(8, 4)}, str(tmp_path / "loras" / "stray.safetensors"))

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "loras" / "evil.pt").write_bytes(pickle.dumps({"x.lora_down.weight": Evil()}))
    base = ["txt2img", "--ckpt", str(tiny_ckpts["eps"]["safetensors"]), "--config", tiny_ckpts["eps"]["config"],
            "--steps", "2", "--H", "256", "--W", "256", "--precision", "full", "--device", "cpu",
            "--lora-dir", str(tmp_path / "loras")]
    for name, says in (("stray", "match nothing in this model"), ("evil", "refused because unpickling can run code")):
        out = tmp_path / name
        assert main([*base, "--prompt", f"a cube <lora:{name}:1>", "--outdir", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert not list(out.rglob("*.png")) and not list(out.glob("manifest-*"))
