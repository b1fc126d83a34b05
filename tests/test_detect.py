"""ldm.loading.detect: the config from the checkpoint's keys, the eps/v probe, and the warning for a wrong config."""
import math
from pathlib import Path

import pytest
import torch

from ldm.loading import detect, keys
from ldm.errors import SDError
from ldm.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "configs"
TINY = {"eps": "tiny-v2-inference.yaml", "v": "tiny-v2-inference-v.yaml", "inpaint": "tiny-v2-inpainting.yaml",
        "depth": "tiny-v2-midas.yaml", "x4": "tiny-x4-upscaling.yaml"}
KIND_OF_CONFIG = {"eps": "txt2img", "v": "txt2img", "inpaint": "inpaint", "depth": "depth", "x4": "x4"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint of every buildable family, .ckpt and .safetensors alike."""
    from tests.tinyckpt import build_tiny, save_tiny

    root = tmp_path_factory.mktemp("detect")
    return {kind: save_tiny(build_tiny(cfg, seed), root / f"{kind}.{'ckpt' if seed % 2 else 'safetensors'}")
            for seed, (kind, cfg) in enumerate(TINY.items(), start=1)}


def manifest(name):
    """A state dict of meta tensors with the exact keys and shapes of a real checkpoint."""
    from tests.tinyckpt import manifest as shapes

    return {key: torch.empty(shape, device="meta") for key, shape in shapes(name).items()}


@pytest.mark.parametrize("kind", sorted(TINY))
def test_each_family_is_recognised_from_a_tiny_checkpoint(tiny, kind):
    from ldm.loading.checkpoint import read_state_dict

    assert keys.checkpoint_kind(read_state_dict(tiny[kind])) == KIND_OF_CONFIG[kind]


@pytest.mark.parametrize("name, kind", [
    ("v2-inference", "txt2img"), ("v2-inference-v", "txt2img"), ("v2-inpainting-inference", "inpaint"),
    ("v2-midas-inference", "depth"), ("x4-upscaling", "x4"), ("v2-1-stable-unclip-h-inference", "unclip-h"),
    ("v2-1-stable-unclip-l-inference", "unclip-l")])
def test_the_real_checkpoints_keys_give_their_config(name, kind):
    assert keys.checkpoint_kind(manifest(name)) == kind
    if kind != "txt2img":
        assert keys.CONFIG_NAMES[kind] == f"{name}.yaml"


def test_other_checkpoints_are_refused_with_one_line():
    sd1 = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.empty(49408, 768),
           keys.UNET_IN: torch.empty(320, 4, 3, 3)}
    with pytest.raises(SDError, match="Stable Diffusion 1.x"):
        keys.checkpoint_kind(sd1)
    with pytest.raises(SDError, match="SDXL"):
        keys.checkpoint_kind({"conditioner.embedders.0.transformer.x": torch.empty(1), keys.UNET_IN: torch.empty(1, 4, 3, 3)})
    with pytest.raises(SDError, match="not a Stable Diffusion checkpoint"):
        keys.checkpoint_kind({"encoder.weight": torch.empty(3)})
    with pytest.raises(SDError, match="6 input channels"):
        keys.checkpoint_kind({keys.UNET_IN: torch.empty(320, 6, 3, 3)})


class GaussianData(torch.nn.Module):
    """A model whose data x0 ~ N(mean, std^2) per element has an exact denoiser: it predicts eps or v exactly.

    Given x_t = sqrt(a) x0 + sqrt(1 - a) eps, E[x0 | x_t] = mean + sqrt(a) std^2 / (a std^2 + 1 - a) (x_t - sqrt(a) mean).
    """

    def __init__(self, parameterization, mean, std):
        super().__init__()
        from ldm.modules.diffusionmodules.noise_schedule import make_beta_schedule

        betas = torch.from_numpy(make_beta_schedule("linear", 1000, 0.00085, 0.012))
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
        self.parameterization, self.mean, self.std, self.latent_channels = parameterization, mean, std, 4
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where the model lives

    def get_learned_conditioning(self, prompts):
        return torch.zeros(len(prompts), 77, 8)

    def make_cond(self, c):
        return {"c_crossattn": c, "c_concat": None, "c_adm": None}

    def apply_model(self, x, t, cond):
        a = self.alphas_cumprod[t.long()].double().view(-1, 1, 1, 1)
        x = x.double()
        x0 = self.mean + a.sqrt() * self.std ** 2 / (a * self.std ** 2 + 1 - a) * (x - a.sqrt() * self.mean)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return (eps if self.parameterization == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0).float()


@pytest.mark.real_probe
@pytest.mark.parametrize("mean", [-1.0, 0.0, 0.5, 1.5])
@pytest.mark.parametrize("std", [0.5, 1.0, 2.0])
def test_the_probe_tells_eps_from_v_on_exact_denoisers(mean, std):
    for truth in ("eps", "v"):
        found, slope = detect.probe_parameterization(GaussianData(truth, mean, std))
        assert found == truth
        a = float(GaussianData(truth, mean, std).alphas_cumprod[-1])
        # The slopes the docstring derives: 1/sqrt(1-a) (1 - a s^2/(a s^2 + 1 - a)) for eps; for v
        # sqrt(a) times that minus sqrt(1 - a) sqrt(a) s^2 / (a s^2 + 1 - a).
        shrink = a * std ** 2 / (a * std ** 2 + 1 - a)
        eps_slope = (1 - shrink) / math.sqrt(1 - a)
        expected = eps_slope if truth == "eps" else math.sqrt(a) * eps_slope - math.sqrt(1 - a) * math.sqrt(a) * std ** 2 / (a * std ** 2 + 1 - a)
        assert slope == pytest.approx(expected, abs=1e-5)


@pytest.mark.real_probe
def test_the_probe_reads_the_demo_model_as_v():
    from ldm.loading.families import DEMO_CKPT, DEMO_CONFIG
    from ldm.loading.build import load_model

    model = load_model(DEMO_CONFIG, DEMO_CKPT).float()
    assert model.parameterization == "v"
    found, slope = detect.probe_parameterization(model)
    assert found == "v" and slope < 0.25  # measured -1.69


@pytest.fixture
def tiny_references(monkeypatch):
    """ldm.loading.detect chooses among the tiny configs instead of the full-size reference ones."""
    monkeypatch.setattr(detect, "reference_config", lambda kind: CONFIGS / TINY[kind])


@pytest.mark.parametrize("kind", sorted(TINY))
def test_load_without_config_chooses_and_says_so(tiny, tiny_references, kind, monkeypatch, capsys):
    if kind in ("eps", "v"):  # the probe of these random weights says what a trained UNet of the kind would
        monkeypatch.setattr(detect, "probe_parameterization", lambda model: (kind, 1.0 if kind == "eps" else 0.0))
    pipe = Pipeline.load(tiny[kind], device="cpu", precision="full")
    assert pipe.config == CONFIGS / TINY[kind]
    assert pipe.native_size == {"eps": 512, "v": 768}.get(kind, 512)
    if kind in ("eps", "v"):
        assert pipe.model.parameterization == kind
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: config:")]
    assert len(notes) == 1 and TINY[kind] in notes[0]


def test_an_explicit_config_wins_and_a_wrong_one_is_warned_about(tiny, monkeypatch, capsys):
    Pipeline.load(tiny["eps"], CONFIGS / TINY["eps"], device="cpu", precision="full")
    assert capsys.readouterr().err == ""  # the probe agrees: nothing to say
    monkeypatch.setattr(detect, "probe_parameterization", lambda model: ("v", 0.02))
    pipe = Pipeline.load(tiny["eps"], CONFIGS / TINY["eps"], device="cpu", precision="full")
    assert pipe.model.parameterization == "eps" and pipe.config == CONFIGS / TINY["eps"]  # the config still wins
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "predicts v" in err[0] and "noise" in err[0]
    assert "v2-inference-v.yaml" in err[0]


def test_unclip_checkpoints_choose_their_reference_config(tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "unclip.safetensors"
    save_file({keys.UNET_IN: torch.zeros(32, 4, 3, 3), "embedder.model.text_projection": torch.zeros(8, 8),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(32, 1536)}, str(ckpt))
    # the reference's unCLIP-L config is chosen; this stub then lacks its keys, named in one line
    with pytest.raises(SDError, match="v2-1-stable-unclip-l-inference.yaml"):
        Pipeline.load(ckpt, device="cpu", precision="full")


def test_the_probe_runs_before_the_fast_path(tiny, tiny_references, monkeypatch):
    """A traced UNet specialises to the shapes it first sees: the probe must see the plain one."""
    from ldm.runtime import fastpath

    seen = []
    monkeypatch.setattr(detect, "probe_parameterization",
                        lambda model: (seen.append(type(model.model.diffusion_model).__name__), ("eps", 1.0))[1])
    pipe = Pipeline.load(tiny["eps"], device="cpu", precision="full", torchscript=True)
    assert seen == ["UNetModel"] and isinstance(pipe.model.model.diffusion_model, fastpath.FastUNet)
