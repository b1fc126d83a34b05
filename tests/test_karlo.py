"""The Karlo prior (unCLIP-L text-to-image): keys of the real files, numbers against diffusers' PriorTransformer
and UnCLIPScheduler on a tiny random prior, and `sd txt2img --prior-ckpt` end to end."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from ldm.loading.checkpoint import build_on_meta
from ldm.cli import main
from ldm.karlo import PRIOR_CONFIG, KarloPrior, spaced_steps
from ldm.files.metadata import parse_parameters, read_png_text
from ldm.modules.encoders.image_embedders import CLIPModel
from ldm.pipeline import Pipeline
from ldm.util import OmegaConf
from tests.tinyckpt import manifest
from tests.test_unet import rel_err
from tests.tinyckpt import randomize_

CONFIGS = Path(__file__).resolve().parent / "configs"
TINY_PRIOR = {"text_ctx": 77, "xf_width": 128, "xf_layers": 2, "xf_heads": 2, "xf_final_ln": True, "clip_dim": 16}
TINY_CLIP = {"vision_cfg": {"image_size": 28, "layers": 1, "width": 64, "head_width": 64, "patch_size": 14,
                            "embed_dim": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 2}}


def test_full_size_prior_and_clip_have_the_files_keys():
    prior = build_on_meta(OmegaConf.create({"target": "ldm.karlo.KarloPrior", "params": {"config": PRIOR_CONFIG}}))
    assert {k: tuple(v.shape) for k, v in prior.state_dict().items()} == manifest("karlo-prior-vit-l")
    clip = build_on_meta(OmegaConf.create({"target": "ldm.modules.encoders.image_embedders.CLIPModel",
                                           "params": {"arch": "ViT-L-14", "quick_gelu": True}}))
    assert {k: tuple(v.shape) for k, v in clip.state_dict().items()} == manifest("karlo-clip-vit-l")
    assert spaced_steps(25)[:4] == [0, 42, 83, 125] and spaced_steps(25)[-1] == 999  # Karlo's "25"


def tiny_prior(seed: int = 0) -> KarloPrior:
    prior = randomize_(KarloPrior(TINY_PRIOR), seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    prior.use_stats(torch.randn(16, generator=g), 0.5 + torch.rand(16, generator=g))
    return prior


def diffusers_prior(prior: KarloPrior):
    """diffusers' PriorTransformer with the tiny prior's weights (Karlo's fused per-head qkv split apart)."""
    from diffusers import PriorTransformer

    cfg, m = TINY_PRIOR, prior.model
    heads, width = cfg["xf_heads"], cfg["xf_width"]
    twin = PriorTransformer(num_attention_heads=heads, attention_head_dim=width // heads, num_layers=cfg["xf_layers"],
                            embedding_dim=cfg["clip_dim"], num_embeddings=cfg["text_ctx"], additional_embeddings=4).eval()
    pairs = {"time_embedding.linear_1": m.time_embed[0], "time_embedding.linear_2": m.time_embed[2],
             "proj_in": m.clip_img_proj, "embedding_proj": m.text_emb_proj, "encoder_hidden_states_proj": m.text_enc_proj,
             "norm_out": m.final_ln, "proj_to_clip_embeddings": m.out_proj}
    sd = {"positional_embedding": m.positional_embedding, "prd_embedding": m.prd_emb,
          "clip_mean": prior.clip_mean, "clip_std": prior.clip_std}
    for i, block in enumerate(m.transformer.resblocks):
        p = f"transformer_blocks.{i}."
        w = block.attn.c_qkv.weight.view(heads, 3, width // heads, width)
        b = block.attn.c_qkv.bias.view(heads, 3, width // heads)
        for j, name in enumerate("qkv"):
            sd[p + f"attn1.to_{name}.weight"] = w[:, j].reshape(width, width)
            sd[p + f"attn1.to_{name}.bias"] = b[:, j].reshape(width)
        pairs.update({p + "attn1.to_out.0": block.attn.c_proj, p + "norm1": block.ln_1, p + "norm3": block.ln_2,
                      p + "ff.net.0.proj": block.mlp.c_fc, p + "ff.net.2": block.mlp.c_proj})
    for name, module in pairs.items():
        sd[name + ".weight"], sd[name + ".bias"] = module.weight, module.bias
    twin.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return twin


def text_inputs(batch: int, g: torch.Generator):
    mask = torch.zeros(batch, 77, dtype=torch.bool)
    for k in range(batch):
        mask[k, : 3 + 5 * k] = True  # different prompt lengths, padding masked out
    return torch.randn(batch, 16, generator=g), torch.randn(batch, 77, 16, generator=g), mask


def test_prior_transformer_matches_diffusers():
    prior = tiny_prior()
    twin = diffusers_prior(prior)
    g = torch.Generator().manual_seed(2)
    emb, enc, mask = text_inputs(3, g)
    x, t = torch.randn(3, 16, generator=g), torch.tensor([999, 417, 0])
    with torch.no_grad():
        ours = prior.model(x, t, emb, enc, mask)
        theirs = twin(x, t, proj_embedding=emb, encoder_hidden_states=enc, attention_mask=mask).predicted_image_embedding
    assert rel_err(ours, theirs) < 1e-5
    mask[0, 20] = True  # the mask matters
    assert rel_err(prior.model(x, t, emb, enc, mask), ours) > 1e-4


@pytest.mark.parametrize("steps, scale", [(25, 4.0), (7, 1.5)])
def test_prior_sampling_matches_diffusers_unclip_scheduler(steps, scale):
    """The whole sampling loop against diffusers' UnCLIPPipeline prior loop (PriorTransformer + UnCLIPScheduler
    with Karlo's x0 prediction, fixed_small_log variance and clamp at 10), drawing from the same generator."""
    from diffusers import UnCLIPScheduler

    prior = tiny_prior(seed=4)
    twin = diffusers_prior(prior)
    g = torch.Generator().manual_seed(9)
    emb, enc, mask = text_inputs(2, g)  # row 0: the prompt, row 1: the empty prompt
    ours = prior.sample(emb, enc, mask, [torch.Generator().manual_seed(5)], steps=steps, scale=scale)

    scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample=True,
                                clip_sample_range=10.0)
    # diffusers keeps the schedule in float32, where 1 - alphas_cumprod[0] (~4e-5) keeps 3 digits and the last
    # step's x0 coefficient comes out 1 - 5e-4 instead of 1; Karlo's guided-diffusion code, like ours, computes
    # the schedule in float64. The twin therefore gets its own betas in float64.
    scheduler.betas = scheduler.betas.double()
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 16, generator=gen)
    timesteps = scheduler.timesteps
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            out = twin(torch.cat([latents] * 2), t, proj_embedding=emb.flip(0), encoder_hidden_states=enc.flip(0),
                       attention_mask=mask.flip(0)).predicted_image_embedding
            uncond, cond = out.chunk(2)
            guided = uncond + scale * (cond - uncond)
            prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
            latents = scheduler.step(guided, timestep=t, sample=latents, generator=gen, prev_timestep=prev).prev_sample
    theirs = twin.post_process_latents(latents)
    assert [int(t) for t in timesteps] == spaced_steps(steps)[::-1]
    assert rel_err(ours, theirs) < 1e-4


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    """A tiny unCLIP-L checkpoint, and a karlo_models/ folder: prior, ViT-L-14.pt (TorchScript), statistics."""
    from tests.tinyckpt import build_tiny, save_tiny

    root = tmp_path_factory.mktemp("karlo")
    ckpt = save_tiny(build_tiny("tiny-unclip-l.yaml", seed=11), root / "sd21-unclip-l.safetensors")
    folder = root / "karlo_models"
    folder.mkdir()
    prior = tiny_prior(seed=12)
    torch.save({"state_dict": prior.state_dict()}, folder / "prior-ckpt-step=01000000-of-01000000.ckpt")
    clip = randomize_(CLIPModel("openai-clip", True, **TINY_CLIP), 13).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(clip, torch.zeros(1, 77, dtype=torch.long)).save(str(folder / "ViT-L-14.pt"))
    torch.save((prior.clip_mean[0].clone(), prior.clip_std[0].clone()), folder / "ViT-L-14_stats.th")
    return {"ckpt": ckpt, "config": CONFIGS / "tiny-unclip-l.yaml", "prior": folder / "prior-ckpt-step=01000000-of-01000000.ckpt",
            "folder": folder, "root": root}


def prior_args(karlo, *extra):
    return ["--ckpt", str(karlo["ckpt"]), "--config", str(karlo["config"]), "--prior-ckpt", str(karlo["prior"]),
            "--steps", "2", "--precision", "full", "--device", "cpu", "--H", "256", "--W", "256", "--n_samples", "2",
            "--n_iter", "1", *extra]


def test_txt2img_through_the_prior(karlo, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["txt2img", *prior_args(karlo, "--prompt", "a red house", "--noise-level", "10", "--outdir", str(out))])
    assert code == 0, capsys.readouterr().err
    written = sorted((out / "samples").glob("*.png"))
    _, _, fields = parse_parameters(read_png_text(written[1])["parameters"])
    assert fields["Prior"] == "Karlo v1 alpha" and fields["Prior steps"] == "25" and fields["Noise level"] == "10"

    pipe = Pipeline.load(karlo["ckpt"], karlo["config"], device="cpu", precision="full", quiet=True)
    pipe.load_prior(karlo["prior"])
    images = pipe.txt2img("a red house", width=256, height=256, steps=2, seed=42, batch_size=2, noise_level=10)
    assert [im.png() for im in images] == [p.read_bytes() for p in written]
    other = pipe.txt2img("a blue boat", width=256, height=256, steps=2, seed=42, batch_size=2, noise_level=10)
    assert other[0].png() != images[0].png()  # the prompt reaches the image through the prior too

    again = tmp_path / "again"
    assert main(["txt2img", *prior_args(karlo, "--from-image", str(written[1]), "--outdir", str(again))]) == 0
    assert (again / "samples" / "00000.png").read_bytes() == written[1].read_bytes()


def test_without_vit_l_14_pt_the_checkpoints_own_clip_serves(karlo, tmp_path, capsys):
    lone = tmp_path / "prior.ckpt"
    lone.write_bytes(karlo["prior"].read_bytes())
    stats = str(karlo["folder"] / "ViT-L-14_stats.th")
    args = _replaced(prior_args(karlo, "--clip-stats", stats, "--outdir", str(tmp_path / "o")), "--prior-ckpt", lone)
    code = main(["txt2img", *args])
    err = capsys.readouterr().err
    assert code == 0 and "unCLIP-L checkpoint's own CLIP ViT-L/14" in err


@pytest.mark.parametrize("case, make_args, message", [
    ("no statistics", lambda k, t: ["txt2img", *_moved_prior(k, t)], "ViT-L-14_stats.th"),
    ("flag without prior", lambda k, t: ["txt2img", "--ckpt", str(k["ckpt"]), "--config", str(k["config"]),
                                         "--noise-level", "3"], "only apply with --prior-ckpt"),
    ("unCLIP-H", lambda k, t: ["txt2img", *_with_h(k, t)], "only unCLIP-L takes"),
    ("corrupt prior", lambda k, t: ["txt2img", *_corrupt_prior(k, t)], "is not a torch zip checkpoint"),
    ("level", lambda k, t: ["txt2img", *prior_args(k, "--noise-level", "1000")], "0..999"),
])
def test_prior_bad_input_is_one_line(karlo, tmp_path, capsys, case, make_args, message):
    out = tmp_path / "out"
    code = main([*make_args(karlo, tmp_path), "--outdir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0], err
    assert not list(out.rglob("*.png"))


def _replaced(args: list[str], flag: str, value) -> list[str]:
    """`args` with the value after `flag` replaced."""
    at = args.index(flag) + 1
    return [*args[:at], str(value), *args[at + 1:]]


def _moved_prior(karlo, tmp_path):
    """The prior and the checkpoint away from karlo_models/: no statistics anywhere."""
    args = prior_args(karlo)
    for flag, source in (("--prior-ckpt", karlo["prior"]), ("--ckpt", karlo["ckpt"])):
        lone = tmp_path / source.name
        lone.write_bytes(source.read_bytes())
        args = _replaced(args, flag, lone)
    return args


def _with_h(karlo, tmp_path):
    from tests.tinyckpt import build_tiny, save_tiny

    args = _replaced(prior_args(karlo), "--ckpt", save_tiny(build_tiny("tiny-unclip-h.yaml"), tmp_path / "h.safetensors"))
    return _replaced(args, "--config", CONFIGS / "tiny-unclip-h.yaml")


def _corrupt_prior(karlo, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    return _replaced(prior_args(karlo), "--prior-ckpt", bad)


def test_prior_text_features_match_transformers():
    """The prior's text inputs (projected end-of-text feature, ln_final sequence) against transformers'
    CLIPTextModelWithProjection with the same weights (OpenAI CLIP: QuickGELU, causal)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    clip = randomize_(CLIPModel("openai-clip", True, **TINY_CLIP), 21).eval()
    config = CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5, projection_dim=16, eos_token_id=49407, bos_token_id=49406)
    twin = CLIPTextModelWithProjection(config).eval()
    sd = {"text_model.embeddings.token_embedding.weight": clip.token_embedding.weight,
          "text_model.embeddings.position_embedding.weight": clip.positional_embedding,
          "text_model.final_layer_norm.weight": clip.ln_final.weight, "text_model.final_layer_norm.bias": clip.ln_final.bias,
          "text_projection.weight": clip.text_projection.T}
    for i, block in enumerate(clip.transformer.resblocks):
        p = f"text_model.encoder.layers.{i}."
        for name, w, b in zip("qkv", block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)):
            sd[p + f"self_attn.{name}_proj.weight"], sd[p + f"self_attn.{name}_proj.bias"] = w, b
        for name, module in {"self_attn.out_proj": block.attn.out_proj, "layer_norm1": block.ln_1,
                             "layer_norm2": block.ln_2, "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = module.weight, module.bias
    missing, unexpected = twin.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)

    from ldm.karlo import TextToImageEmbedding

    ids, mask = TextToImageEmbedding(tiny_prior(), clip, Path("x")).tokens(["a red house!", ""])
    assert mask.sum(1).tolist() == [6, 2]  # start, a, red, house, !, end ("!" is token 0, like the padding)
    with torch.no_grad():
        pooled, seq = clip.encode_text(ids)
        theirs = twin(input_ids=ids)
    assert rel_err(pooled, theirs.text_embeds) < 1e-5 and rel_err(seq, theirs.last_hidden_state) < 1e-5
