"""The shapes dataset, the pixel reader and the Lightning training path, on tiny models (seconds)."""
import random
import re
import time

import numpy as np
import pytest
import torch
import yaml

from ldm.data.measure import read_image
from ldm.data.shapes import (COLORS, HELDOUT_TEMPLATES, SHAPES, TRAIN_TEMPLATES, ShapeScene, ShapesDataset,
                             all_combinations, caption_for, render_scene)
from ldm.errors import SDError
from ldm.training.trainers import AutoencoderTrainer, DiffusionTrainer, train

TINY_VAE = {
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {"embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
               "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
                            "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 0, "attn_resolutions": [],
                            "dropout": 0.0}},
}


def tiny_ldm(parameterization="v", trainable=True):
    return {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "parameterization": parameterization, "linear_start": 0.00085, "linear_end": 0.03, "timesteps": 1000,
            "cond_stage_trainable": trainable, "conditioning_key": "crossattn", "scale_by_std": True,
            "scale_factor": 1.0,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "image_size": 4, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                "attention_resolutions": [1], "num_res_blocks": 1, "channel_mult": [1], "num_head_channels": 16,
                "use_spatial_transformer": True, "use_linear_in_transformer": True, "transformer_depth": 1,
                "context_dim": 16, "legacy": False}},
            "first_stage_config": TINY_VAE,
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": {
                "arch": "demo", "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2,
                                             "layers": 1},
                "freeze": True, "layer": "last"}},
        },
    }


# -- dataset -----------------------------------------------------------------------------------------

def test_dataset_is_deterministic_and_covers_every_combination():
    a, b = ShapesDataset(length=6, seed=3), ShapesDataset(length=6, seed=3)
    for i in range(6):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
    assert not torch.equal(ShapesDataset(length=1, seed=4)[0]["image"], a[0]["image"])  # jitter moves
    combos = all_combinations()
    assert len(combos) == 4 * 8 * 7 * 9 * 2 == len(set(combos))
    item = a[0]
    assert item["image"].shape == (3, 256, 256) and item["image"].min() >= -1 and item["image"].max() <= 1
    # the background colour fills the corner pixel exactly
    corner = ((item["image"][:, 0, 0] + 1) * 127.5).round().tolist()
    assert tuple(int(v) for v in corner) == COLORS[item["scene"].background]
    shuffled = ShapesDataset(length=len(combos) // 2, shuffle=True)
    triples = {(s.shape, s.color, s.background) for s in map(shuffled.scene, range(len(shuffled)))}
    assert len(triples) == 4 * 8 * 7  # half the combinations still hold every triple


def test_crops_come_from_the_full_render():
    full, crop = ShapesDataset(length=3, seed=1, size=64), ShapesDataset(length=3, seed=1, size=64, crop=24)
    for i in range(3):
        big, small = full[i]["image"], crop[i]["image"]
        assert small.shape == (3, 24, 24)
        windows = big.unfold(1, 24, 1).unfold(2, 24, 1)  # (3, 41, 41, 24, 24)
        assert (windows == small[:, None, None]).all(dim=(0, 3, 4)).any()
    # shape-centred crops (the default) always show two colours; uniformly random ones often show one
    shaped = ShapesDataset(length=40, seed=2, crop=128)
    assert all(len(torch.unique(shaped[i]["image"].flatten(1), dim=1).T) >= 2 for i in range(40))
    anywhere = ShapesDataset(length=40, seed=2, crop=64, crop_mode="random")
    assert sum(len(torch.unique(anywhere[i]["image"].flatten(1), dim=1).T) == 1 for i in range(40)) >= 10


def test_captions_name_the_scene_and_splits_use_disjoint_wording():
    scene = ShapeScene("triangle", "orange", "purple", "top left", "small")
    rng = random.Random(0)
    for split, templates in (("train", TRAIN_TEMPLATES), ("heldout", HELDOUT_TEMPLATES)):
        for _ in range(20):
            text = caption_for(scene, rng, split)
            assert "orange triangle" in text and "purple" in text
    train_text = {caption_for(scene, random.Random(k), "train") for k in range(200)}
    held_text = {caption_for(scene, random.Random(k), "heldout") for k in range(200)}
    assert not train_text & held_text
    # the held-out sentences are new, their words are not (a from-scratch text tower knows no others)
    words = lambda texts: {w for t in texts for w in re.findall(r"[a-z]+", t)}
    scenes = [ShapeScene(sh, c, "white" if c != "white" else "black", p, sz) for sh in SHAPES for c in COLORS
              for p in ("top left", "center") for sz in ("small", "large")]
    train_words = words(caption_for(sc, random.Random(k), "train") for k in range(30) for sc in scenes)
    held_words = words(caption_for(sc, random.Random(k), "heldout") for k in range(30) for sc in scenes)
    assert held_words <= train_words and {"backdrop", "image", "picture", "against"} <= held_words
    orange = [caption_for(ShapeScene("circle", "orange", "blue", "center", "large"), random.Random(k)) for k in range(50)]
    assert not any("a orange" in text for text in orange) and any("an orange" in text for text in orange)


def test_reader_recovers_every_rendered_scene():
    ds = ShapesDataset(seed=7, split="heldout", shuffle=True, length=120)
    hits = [0, 0, 0]
    for i in range(len(ds)):
        scene = ds.scene(i)
        reading = read_image(render_scene(scene))
        hits[0] += reading.background == scene.background
        hits[1] += reading.color == scene.color
        hits[2] += reading.shape == scene.shape
    assert hits == [120, 120, 120]


def test_reader_on_a_blurred_and_noisy_render():
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    for shape in SHAPES:
        image = render_scene(ShapeScene(shape, "yellow", "blue", "center", "small")).filter(ImageFilter.GaussianBlur(4))
        noisy = np.clip(np.asarray(image, dtype=np.float32) + rng.normal(0, 20, (256, 256, 3)), 0, 255)
        reading = read_image(noisy.astype(np.uint8))
        assert (reading.background, reading.color, reading.shape) == ("blue", "yellow", shape)


# -- losses --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_diffusion_loss_is_zero_for_the_exact_target(parameterization):
    """A model that outputs the true target (computed here from the schedule in float64) has zero loss;
    an output off by c everywhere has loss c^2."""
    torch.manual_seed(0)
    trainer = DiffusionTrainer(tiny_ldm(parameterization))
    z, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    betas = np.linspace(0.00085 ** 0.5, 0.03 ** 0.5, 1000, dtype=np.float64) ** 2
    a = torch.tensor(np.cumprod(1 - betas)[t.numpy()], dtype=torch.float32).view(3, 1, 1, 1)
    x_t = a.sqrt() * z + (1 - a).sqrt() * noise
    target = noise if parameterization == "eps" else a.sqrt() * noise - (1 - a).sqrt() * z
    seen = {}

    def exact(x, tt, cond, offset=0.0):
        seen["x_t"], seen["t"] = x, tt
        return target + offset

    trainer.ldm.apply_model = exact
    assert trainer.diffusion_loss(z, ["a"] * 3, t=t, noise=noise).item() < 1e-10
    torch.testing.assert_close(seen["x_t"], x_t, rtol=1e-5, atol=1e-6)
    assert torch.equal(seen["t"], t)
    trainer.ldm.apply_model = lambda x, tt, cond: exact(x, tt, cond, 0.5)
    assert trainer.diffusion_loss(z, ["a"] * 3, t=t, noise=noise).item() == pytest.approx(0.25, rel=1e-5)


def test_lr_warms_up_then_decays_linearly_over_the_last_part_of_the_step_or_time_budget():
    trainer = DiffusionTrainer(tiny_ldm(), warmup_steps=10, lr_decay_fraction=0.25)
    trainer.budget_steps = 1000
    assert [trainer.lr_factor(s) for s in (4, 9, 500, 750)] == [0.5, 1.0, 1.0, 1.0]  # warm-up, stable
    assert trainer.lr_factor(875) == pytest.approx(0.5) and trainer.lr_factor(1000) == 0.0  # decay
    trainer.budget_seconds, trainer._t0 = 100.0, time.perf_counter() - 90.0  # 90% of the time gone
    assert trainer.lr_factor(100) == pytest.approx(0.4, abs=0.01)  # the time budget decides
    constant = DiffusionTrainer(tiny_ldm(), warmup_steps=10)
    constant.budget_steps = 1000
    assert constant.lr_factor(4) == 0.5 and constant.lr_factor(1000) == 1.0
    with pytest.raises(SDError, match="lr_decay_fraction"):
        DiffusionTrainer(tiny_ldm(), lr_decay_fraction=1.5)


def test_caption_dropout_and_trainable_text_tower():
    trainer = DiffusionTrainer(tiny_ldm(trainable=True), ucg_rate=1.0)
    assert all(p.requires_grad for p in trainer.ldm.cond_stage_model.parameters())
    assert not any(p.requires_grad for p in trainer.ldm.first_stage_model.parameters())
    seen = []
    encode = trainer.ldm.cond_stage_model.encode
    trainer.ldm.cond_stage_model.encode = lambda texts: seen.extend(texts) or encode(texts)
    batch = {"moments": torch.zeros(2, 8, 4, 4), "caption": ["a red circle", "a blue square"]}
    loss = trainer.training_step(batch, 0)
    assert seen == ["", ""] and loss.requires_grad
    loss.backward()
    assert trainer.ldm.cond_stage_model.model.token_embedding.weight.grad is not None
    frozen = DiffusionTrainer(tiny_ldm(trainable=False))
    assert not any(p.requires_grad for p in frozen.ldm.cond_stage_model.parameters())


def test_ema_update_and_scale_factor():
    trainer = DiffusionTrainer(tiny_ldm(), ema_decay=0.9)
    name, param = next((k, p) for k, p in trainer.ldm.named_parameters() if p.requires_grad)
    before = trainer.ema[name].clone()
    with torch.no_grad():
        param.add_(1.0)
    trainer.update_ema()  # global_step 0: warm-up decay min(0.9, 1/10) = 0.1
    torch.testing.assert_close(trainer.ema[name], 0.1 * before + 0.9 * param.detach())
    moments = torch.cat([3.0 * torch.randn(64, 4, 4, 4), torch.full((64, 4, 4, 4), -30.0)], 1)  # std ~ 0
    scale = trainer.set_scale_factor(moments, torch.Generator().manual_seed(0))
    assert scale == pytest.approx(1 / 3, rel=0.05) and float(trainer.ldm.scale_factor) == pytest.approx(scale)


def test_autoencoder_loss_terms():
    trainer = AutoencoderTrainer(TINY_VAE, kl_weight=0.0, l2_weight=0.0)
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    trainer.vae.forward = lambda x: (x + 0.25, _Posterior())
    assert trainer.loss(image).item() == pytest.approx(0.25)
    trainer.l2_weight, trainer.kl_weight = 1.0, 2.0
    # 0.25 (L1) + 0.0625 (L2) + 2 * 30 / (3 * 32 * 32)
    assert trainer.loss(image).item() == pytest.approx(0.3125 + 60 / 3072, rel=1e-6)


class _Posterior:
    def kl(self):
        return torch.full((2,), 30.0)


def test_autoencoder_training_reduces_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    trainer = AutoencoderTrainer(TINY_VAE, lr=3e-3)
    image = ShapesDataset(length=2, seed=0, size=64, crop=16)
    batch = torch.stack([image[0]["image"], image[1]["image"]])
    opt = torch.optim.AdamW(trainer.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        loss = trainer.loss(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# -- the train() entry and its checkpoints ---------------------------------------------------------------

def test_train_writes_original_format_checkpoints_that_load_strictly(tmp_path, capsys):
    from ldm.loading.checkpoint import read_state_dict
    from ldm.loading.build import load_model
    from ldm.cli import main

    vae_cfg = tmp_path / "vae.yaml"
    vae_ckpt = tmp_path / "vae.safetensors"
    vae_cfg.write_text(yaml.safe_dump({
        "model": TINY_VAE, "data": {"size": 64, "crop": 32, "seed": 0},
        "trainer": {"module": "autoencoder", "batch_size": 2, "max_steps": 2, "output": str(vae_ckpt),
                    "log": str(tmp_path / "vae.csv")}}))
    assert main(["train", "--config", str(vae_cfg)]) == 0  # `sd train`, as the docs run it
    assert capsys.readouterr().out.strip().endswith(f"wrote {vae_ckpt}")
    vae_state = read_state_dict(vae_ckpt)
    assert "encoder.conv_in.weight" in vae_state and "post_quant_conv.bias" in vae_state
    assert (tmp_path / "vae.csv").read_text().splitlines()[0] == "step,loss,seconds"
    assert len((tmp_path / "vae.csv").read_text().splitlines()) == 3

    inference = tmp_path / "inference.yaml"
    inference.write_text(yaml.safe_dump({"model": tiny_ldm()}))
    ldm_cfg = tmp_path / "ldm.yaml"
    out = tmp_path / "demo.safetensors"
    ldm_cfg.write_text(yaml.safe_dump({
        "data": {"size": 64, "seed": 0, "length": 8, "shuffle": True},
        "trainer": {"module": "diffusion", "model_config": str(inference), "first_stage_ckpt": str(vae_ckpt),
                    "batch_size": 4, "max_steps": 3, "ema_decay": 0.99, "save_dtype": "float16",
                    "output": str(out)}}))
    train(ldm_cfg)
    state = read_state_dict(out)
    assert state["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16
    assert state["cond_stage_model.model.token_embedding.weight"].dtype == torch.float16
    assert state["alphas_cumprod"].dtype == torch.float32 and state["scale_factor"].dtype == torch.float32
    assert float(state["scale_factor"]) != 1.0  # set from the latents' std
    torch.testing.assert_close(state["first_stage_model.encoder.conv_in.weight"],
                               vae_state["encoder.conv_in.weight"].half())
    model = load_model(inference, out)  # strict: every key present, none extra
    assert model.parameterization == "v" and model.downsampling_factor == 2


def test_train_config_errors(tmp_path, capsys):
    from ldm.cli import main
    from ldm.errors import SDError

    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training config not found" in err

    with pytest.raises(SDError, match="not found"):
        train(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": TINY_VAE, "trainer": {"module": "gan", "output": "x"}}))
    with pytest.raises(SDError, match="trainer.module"):
        train(bad)


def test_decoder_only_finetuning_and_merge(tmp_path):
    from ldm.loading.checkpoint import read_state_dict
    from ldm.errors import SDError
    from ldm.training.trainers import export_state_dict, merge_first_stage, save_safetensors

    trainer = AutoencoderTrainer(TINY_VAE, train_encoder=False)
    trainable = {k for k, p in trainer.vae.named_parameters() if p.requires_grad}
    assert trainable and all(k.startswith(("decoder.", "post_quant_conv.")) for k in trainable)

    ldm = DiffusionTrainer(tiny_ldm()).ldm
    full = save_safetensors(export_state_dict(ldm, torch.float16), tmp_path / "full.safetensors")
    vae = export_state_dict(ldm.first_stage_model)
    vae["decoder.conv_out.bias"] = vae["decoder.conv_out.bias"] + 1.0
    merged = read_state_dict(merge_first_stage(full, save_safetensors(vae, tmp_path / "vae.safetensors"),
                                               tmp_path / "merged.safetensors"))
    torch.testing.assert_close(merged["first_stage_model.decoder.conv_out.bias"],
                               vae["decoder.conv_out.bias"].half())
    assert set(merged) == set(read_state_dict(full))
    vae["encoder.conv_in.bias"] = vae["encoder.conv_in.bias"] + 1.0
    with pytest.raises(SDError, match="encoder weight encoder.conv_in.bias differs"):
        merge_first_stage(full, save_safetensors(vae, tmp_path / "vae2.safetensors"), tmp_path / "m2.safetensors")


# -- resuming a cut-off run -----------------------------------------------------------------------------

def _ldm_config(tmp_path, **trainer):
    from ldm.training.trainers import save_safetensors

    tmp_path.mkdir(parents=True, exist_ok=True)
    inference = tmp_path / "inference.yaml"
    inference.write_text(yaml.safe_dump({"model": tiny_ldm()}))
    vae = tmp_path / "vae.safetensors"
    if not vae.exists():
        from ldm.util import instantiate_from_config

        save_safetensors(instantiate_from_config(TINY_VAE).state_dict(), vae)
    config = tmp_path / "ldm.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"size": 64, "seed": 0, "length": 8, "shuffle": True},
        "trainer": {"module": "diffusion", "model_config": str(inference), "first_stage_ckpt": str(vae),
                    "batch_size": 4, "ema_decay": 0.99, "lr_decay_fraction": 0.5, "checkpoint_every": 2,
                    "output": str(tmp_path / "demo.safetensors"), "log": str(tmp_path / "loss.csv"),
                    "latent_cache": str(tmp_path / "latents.safetensors"), **trainer}}))
    return config


def test_a_cut_off_run_resumes_where_it_stopped(tmp_path, capsys):
    from safetensors import safe_open

    from ldm.training.trainers import read_training_state, resume_into, state_path_for

    config = _ldm_config(tmp_path)
    out = train(config, max_steps=4)  # the first part: stopped at step 4 of a 6-step budget...
    state = state_path_for(out)
    assert state.name == "demo.train-state.safetensors"
    tensors, step, seconds = read_training_state(state)
    assert step == 4 and seconds > 0
    assert any(k.startswith("optimizer.") and k.endswith(".exp_avg") for k in tensors)
    # ...its weights, EMA and optimizer moments come back as they were
    module = DiffusionTrainer(tiny_ldm(), ema_decay=0.99)
    assert resume_into(module, state) == (4, seconds)
    name = "model.diffusion_model.out.2.weight"
    assert torch.equal(module.ldm.state_dict()[name], tensors[f"model.{name}"])
    assert torch.equal(module.ema[name], tensors[f"ema.{name}"])
    # the schedule goes on from step 4 of 6 (decay over the last half: factor (6 - 4) / 6 / 0.5)
    module.budget_steps, module.warmup_steps, module.lr_decay_fraction = 6, 1, 0.5
    assert module.lr_factor(0) == pytest.approx(2 / 3)

    capsys.readouterr()
    train(config, max_steps=6, resume=True)  # ...the second part: steps 5 and 6 only
    assert "resuming from step 4" in capsys.readouterr().out
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,seconds" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert float(rows[-1].split(",")[2]) >= seconds  # training seconds go on counting
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["step"] == "6"
    assert read_training_state(state)[1] == 6
    train(config, max_steps=6, resume=True)  # a finished run says so and trains nothing
    assert "had finished (step 6" in capsys.readouterr().out
    assert len((tmp_path / "loss.csv").read_text().splitlines()) == 7


def test_resume_without_a_state_starts_and_a_damaged_state_is_one_line(tmp_path, capsys):
    from ldm.training.trainers import state_path_for

    config = _ldm_config(tmp_path)
    train(config, max_steps=2, resume=True)
    assert "nothing to resume" in capsys.readouterr().out
    state = state_path_for(tmp_path / "demo.safetensors")
    state.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(SDError, match="not a training state") as info:
        train(config, max_steps=4, resume=True)
    assert "\n" not in str(info.value)
    other = _ldm_config(tmp_path / "other", output=str(tmp_path / "demo.safetensors"))
    train(config, max_steps=2)  # a good state again
    cfg = yaml.safe_load(other.read_text())
    model = yaml.safe_load((tmp_path / "other" / "inference.yaml").read_text())
    model["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    (tmp_path / "other" / "inference.yaml").write_text(yaml.safe_dump(model))
    with pytest.raises(SDError, match="training state is of another model"):
        train(other, max_steps=4, resume=True)
    assert cfg["trainer"]["output"] == str(tmp_path / "demo.safetensors")


def test_the_encoded_dataset_is_cached_per_first_stage_and_data(tmp_path, monkeypatch):
    config = _ldm_config(tmp_path)
    train(config, max_steps=1)
    cache = tmp_path / "latents.safetensors"
    assert cache.is_file()
    calls = []
    original = DiffusionTrainer.encode_dataset
    monkeypatch.setattr(DiffusionTrainer, "encode_dataset", lambda self, d, **k: calls.append(1) or original(self, d, **k))
    train(config, max_steps=1)
    assert calls == []  # same first stage, same data: read back
    data = yaml.safe_load(config.read_text())
    data["data"]["seed"] = 1
    config.write_text(yaml.safe_dump(data))
    train(config, max_steps=1)
    assert calls == [1]  # other data: encoded again


def test_reader_finds_the_named_position_of_every_shape():
    from ldm.data.measure import classify_position

    dataset = ShapesDataset(length=120, seed=7, split="heldout", shuffle=True)
    scenes = [dataset.scene(i) for i in range(120)]
    assert all(read_image(render_scene(s)).position == s.position for s in scenes)
    mask = np.zeros((256, 256), bool)
    mask[10:40, 200:250] = True
    assert classify_position(mask) == "top right" and classify_position(np.zeros((8, 8), bool)) is None


def test_evaluation_counts_positions_only_where_the_prompt_names_one():
    from ldm.training.evaluate import heldout_prompts, names_position

    pairs = heldout_prompts(40)
    named = [names_position(s, p) for s, p in pairs]
    assert 20 < sum(named) < 40  # a caption names its position four times in five
    scene = ShapeScene("circle", "red", "blue", "top", "small")
    assert names_position(scene, "a red circle on a blue background at the top")
    assert not names_position(scene, "a red circle on a blue background")
    assert not names_position(scene, "a red circle on a blue background at the top left")

