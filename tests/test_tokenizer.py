"""Our CLIP tokenizer and config reader equal open_clip's, and building the text encoder does not import
open_clip (nor timm/torchvision, which it pulls in)."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from open_clip import get_model_config, list_models
from open_clip.model import CLIPTextCfg
from open_clip.tokenizer import SimpleTokenizer

from ldm.errors import SDError
from ldm.modules.encoders import modules
from ldm.text import tokenizer
from ldm.modules.encoders.modules import CLIP_TEXT_CFG_DEFAULTS, text_tower_config
from ldm.text.tokenizer import CLIPTokenizer, get_tokenizer
from tests.test_autoencoder import ROOT

PROMPTS = [
    "",
    "   ",
    "a cat",
    "A photo of a CAT, sitting on a mat!!! (highly detailed) [4k] {masterpiece}",
    "an astronaut riding a horse    on   the moon\t\nat night",
    "café crème brûlée, naïve façade, Ærø, Øresund, İstanbul, straße, ΣΊΣΥΦΟΣ",
    "東京タワー の 夜景, 한국어 프롬프트, русский текст, عربى",
    "emoji 🐱🚀 👩‍👩‍👧 ❤️ 🇫🇷 and a ☃",
    "numbers 1234567890 3.14159 1,000,000 8k 16:9 v2.1 -0.5e-3",
    "tom &amp; jerry &lt;3 &quot;quoted&quot; &amp;amp; &#39;single&#39; &#x263A; &nbsp;",
    "don't you'll I'M WE'RE it'S they've he'd I'll",
    "cafÃ© mojibake and â€œcurly quotesâ€\x9d and ‘single’ quotes",
    "snake_case_words and kebab-case-words, e-mail@example.com http://x.y/z?a=b#c",
    "punctuation ... !!! ??? ;;; --- ___ *** ### $$$ %%% ^^^ ~~~ `` '' \"\" <> || \\\\ //",
    "<start_of_text> a special token's text <end_of_text> and <START_OF_TEXT>",
    "control\x00chars\x07 and\u200bzero width\u00adsoft hyphen\ufeff",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "lorem ipsum dolor sit amet " * 30,  # far longer than 77 tokens: truncated
    " ".join(["cat"] * 75),  # exactly 77 with start and end
    " ".join(["cat"] * 76),  # one too many
    "a photograph of an astronaut riding a horse, " * 10 + "by greg rutkowski, trending on artstation",
]


@pytest.fixture(scope="module")
def reference():
    return SimpleTokenizer(context_length=77)


@pytest.mark.parametrize("context_length", [77, 16])
def test_tokens_equal_open_clip(reference, context_length):
    ours = get_tokenizer(context_length)
    expected = reference(PROMPTS, context_length=context_length)
    got = ours(PROMPTS)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), context_length)
    for i, text in enumerate(PROMPTS):  # per prompt, so a failure names it
        assert got[i].tolist() == expected[i].tolist(), text
        assert ours.encode(text) == reference.encode(text), text
    assert ours.sot_token_id == 49406 and ours.eot_token_id == 49407 and ours.vocab_size == 49408
    assert ours.vocab == reference.encoder
    assert torch.equal(ours("a cat"), reference("a cat", context_length=context_length))  # a bare str


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_other_clean_modes_equal_open_clip(clean):
    reference = SimpleTokenizer(context_length=77, clean=clean)
    ours = get_tokenizer(77, {"clean": clean})
    assert torch.equal(ours(PROMPTS), reference(PROMPTS))


def test_tokenizer_is_cached_and_refuses_what_it_does_not_implement():
    assert get_tokenizer(77) is get_tokenizer(77, {"clean": "lower", "reduction_mask": ""})
    assert get_tokenizer(77) is not get_tokenizer(16)
    with pytest.raises(SDError, match="reduction_mask"):
        get_tokenizer(77, {"reduction_mask": "random"})
    with pytest.raises(SDError, match="additional_special_tokens"):
        get_tokenizer(77, {"additional_special_tokens": ["<mask>"]})
    with pytest.raises(SDError, match="bpe_path"):
        get_tokenizer(77, {"bpe_path": "x.gz"})
    with pytest.raises(SDError, match="clean"):
        get_tokenizer(77, {"clean": "upper"})


def test_missing_open_clip_data_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(tokenizer, "open_clip_dir", lambda: tmp_path)
    with pytest.raises(SDError, match="vocabulary"):
        CLIPTokenizer(77)
    monkeypatch.undo()
    monkeypatch.setattr(tokenizer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SDError, match="not installed"):
        tokenizer.open_clip_dir()


def open_clip_text_config(arch: str) -> dict:
    """What the reference path gives: open_clip's get_model_config over CLIPTextCfg's defaults."""
    model_cfg = get_model_config(arch)
    cfg = dict(dataclasses.asdict(CLIPTextCfg()), embed_dim=None, quick_gelu=False)
    cfg.update(model_cfg["text_cfg"])
    cfg.update({k: model_cfg[k] for k in ("embed_dim", "quick_gelu") if k in model_cfg})
    return cfg


def test_text_cfg_defaults_equal_open_clip():
    assert CLIP_TEXT_CFG_DEFAULTS == dataclasses.asdict(CLIPTextCfg())


def test_text_tower_config_equals_open_clip():
    assert text_tower_config("ViT-H-14") == open_clip_text_config("ViT-H-14")
    accepted = 0
    for arch in list_models():  # every shipped config: the same numbers, or refused (never built wrongly)
        try:
            ours = text_tower_config(arch)
        except SDError:
            expected = open_clip_text_config(arch)
            assert any(expected[k] not in (CLIP_TEXT_CFG_DEFAULTS[k], "default")
                       for k in modules._UNSUPPORTED_TEXT_KEYS), arch
            continue
        expected = open_clip_text_config(arch)
        if expected["embed_dim"] is None:
            expected["embed_dim"] = expected["width"]
        assert ours == expected, arch
        accepted += 1
    assert accepted > 50
    assert text_tower_config("no-such-arch", {"width": 32})["width"] == 32
    with pytest.raises(SDError, match="unknown open_clip architecture"):
        text_tower_config("../model_configs/ViT-H-14")


def test_unknown_key_in_shipped_text_cfg_is_refused(monkeypatch, tmp_path):
    (tmp_path / "model_configs").mkdir()
    cfg = json.loads((modules.open_clip_dir() / "model_configs" / "ViT-H-14.json").read_text())
    cfg["text_cfg"]["rope_theta"] = 10000
    (tmp_path / "model_configs" / "Future-ViT.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(modules, "open_clip_dir", lambda: tmp_path)
    with pytest.raises(SDError, match="rope_theta"):
        text_tower_config("Future-ViT")


def test_building_the_text_encoder_does_not_import_open_clip():
    code = (
        "import sys, torch\n"
        "from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder\n"
        "with torch.device('meta'):\n"
        "    embedder = FrozenOpenCLIPEmbedder(arch='ViT-H-14', device='cpu')\n"
        "tokens = embedder.tokenize(['a cat'])\n"
        "assert tokens[0, :4].tolist() == [49406, 320, 2368, 49407], tokens[0, :4]\n"
        "print(sorted(m for m in ('open_clip', 'timm', 'torchvision') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
