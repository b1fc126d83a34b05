"""AUTOMATIC1111's prompt syntax: the parser, weighted and chunked encoding, and `sd prompt`."""
import pytest
import torch

from ldm.modules.encoders.prompt_chunks import CHUNK, encode_prompt, prompt_chunks
from ldm.prompt_syntax import BREAK, LoraTag, parse_weights, take_loras


def test_a1111s_documented_example():
    # A1111's own docstring output for this prompt: the first "(" is never closed, so it closes at the
    # end and multiplies everything after it by 1.1 ("on" is 1/1.1 * 1.1 = 1.0, "hill" 0.5 * 1.1).
    got = parse_weights("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected = [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
                (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize("prompt, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (red:1.5) [[blue]]", [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("blue", 1 / 1.1 ** 2)]),
    ("((a:2):3)", [("a", 6.0)]),
    ("a BREAK b", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("(x BREAK y)", [("x", 1.1), (BREAK, -1.0), ("y", 1.1)]),
    ("time: 12:30", [("time: 12:30", 1.0)]),
    ("", [("", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
])
def test_parser_rules(prompt, expected):
    got = parse_weights(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_lora_tags_come_out_of_the_text():
    text, tags = take_loras("a cat <lora:watercolor_sd21:0.8>, <lora:x:0.5:1.2> <lora:plain>")
    assert text == "a cat , " + " "
    assert tags == [LoraTag("watercolor_sd21", 0.8, 0.8), LoraTag("x", 0.5, 1.2), LoraTag("plain", 1.0, 1.0)]


@pytest.fixture(scope="module")
def embedder(tiny_ckpts):
    return tiny_ckpts["eps"]["model"].cond_stage_model


def independent(embedder, pieces, restore=True):
    """The rule written out: tokens of each piece with its weight, chunks of 75, start/end, 0 after the end,
    features * weights, then the chunk's mean restored; chunks joined."""
    tok = embedder.tokenizer()
    ids, weights = [], []
    for text, weight in pieces:
        new = tok.encode(text)
        ids += new
        weights += [weight] * len(new)
    out = []
    for start in range(0, max(len(ids), 1), CHUNK):
        part, w = ids[start:start + CHUNK], weights[start:start + CHUNK]
        row = torch.zeros(1, 77, dtype=torch.long)
        row[0, :len(part) + 2] = torch.tensor([tok.sot_token_id, *part, tok.eot_token_id])
        z = embedder.encode_tokens(row)[0]
        scale = torch.ones(77)
        scale[1:1 + len(w)] = torch.tensor(w)
        weighted = z * scale[:, None]
        out.append(weighted * (z.mean() / weighted.mean()) if restore else weighted)
    return torch.cat(out)


def test_weighted_encoding_equals_the_rule_written_out(embedder):
    prompt = "a (red:1.5) cube on a [[wooden]] table"
    expected = independent(embedder, [("a ", 1.0), ("red", 1.5), (" cube on a ", 1.0), ("wooden", 1 / 1.21),
                                      (" table", 1.0)])
    torch.testing.assert_close(encode_prompt(embedder, prompt), expected, rtol=1e-6, atol=1e-6)
    no_norm = independent(embedder, [("a ", 1.0), ("red", 1.5), (" cube on a ", 1.0), ("wooden", 1 / 1.21),
                                     (" table", 1.0)], restore=False)
    torch.testing.assert_close(encode_prompt(embedder, prompt, "none"), no_norm, rtol=1e-6, atol=1e-6)


def test_long_prompts_are_chunks_of_75(embedder):
    words = " ".join(f"word{k}" for k in range(60))  # no commas: plain cuts at 75
    n = len(embedder.tokenizer().encode(words))
    sizes = [CHUNK] * (n // CHUNK) + ([n % CHUNK] if n % CHUNK else [])
    assert n > 2 * CHUNK and [len(c.tokens) for c in prompt_chunks(embedder.tokenizer(), words)] == sizes
    torch.testing.assert_close(encode_prompt(embedder, words), independent(embedder, [(words, 1.0)]))
    assert encode_prompt(embedder, words).shape == (77 * len(sizes), embedder.model.ln_final.weight.shape[0])


def test_a_plain_prompt_is_bit_identical_to_the_plain_text_path(embedder):
    prompt = "a professional photograph of an astronaut riding a triceratops"
    assert torch.equal(encode_prompt(embedder, prompt), embedder.encode([prompt])[0])
    assert torch.equal(encode_prompt(embedder, "a (red) cube", "off"), embedder.encode(["a (red) cube"])[0])


def test_prompt_and_negative_of_different_lengths_batch(tiny_ckpts):
    from ldm.pipeline import Pipeline

    pipe = Pipeline.load(tiny_ckpts["eps"]["safetensors"], tiny_ckpts["eps"]["config"], device="cpu", precision="full",
                         quiet=True)
    long = ", ".join(["a red cube on a blue table"] * 12)
    images = pipe.txt2img(long, negative_prompt="blurry", steps=2, seed=1, width=256, height=256, batch_size=2)
    assert len(images) == 2 and images[0].parameters.startswith(long)
    from ldm.sampling import PromptEncoder

    encoder = PromptEncoder(pipe.model)
    c, uc = encoder.encode([long]), encoder.encode(["blurry"])
    assert c[0].shape[0] == 154 and uc[0].shape[0] == 77
    padded = encoder.stack(uc, 154)[0]
    assert torch.equal(padded[:77], uc[0]) and torch.equal(padded[77:], encoder.encode([""])[0])


def test_sd_prompt_shows_chunks_weights_and_loras(capsys):
    from ldm.cli import main

    assert main(["prompt", "a (red:1.5) cube BREAK a table <lora:wood:0.7:0.2>"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "5 tokens in 2 chunk(s) of 75"
    assert out[1] == "chunk 1 (3 tokens): a (red:1.5) cube"
    assert out[2] == "chunk 2 (2 tokens): a table"
    assert out[-1] == "LoRA wood: text encoder x0.7, UNet x0.2"
