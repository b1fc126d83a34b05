"""AUTOMATIC1111's prompt syntax: the parser, weighted and chunked encoding, and `sd prompt`."""
import pytest
import torch

from ldm.text.chunks import CHUNK, encode_prompt, prompt_chunks
from ldm.text.syntax import BREAK, LoraTag, parse_weights, take_loras


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
    from ldm.text.encoder import PromptEncoder

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


# -- textual inversion ---------------------------------------------------------------------------------

def write_embeddings(folder, width):
    """One file in each format, with known vectors; returns {name: (n, width) vectors}."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    vectors = {name: torch.randn(n, width, generator=g) for name, n in (("a1111tok", 2), ("difftok", 1),
                                                                       ("diffbin", 1), ("kohyatok", 3))}
    torch.save({"string_to_param": {"*": vectors["a1111tok"]}, "name": "a1111tok", "step": 100}, folder / "a1111tok.pt")
    save_file({"<difftok>": vectors["difftok"][0]}, str(folder / "difftok.safetensors"))
    torch.save({"<diffbin>": vectors["diffbin"][0]}, folder / "diffbin.bin")
    save_file({"emb_params": vectors["kohyatok"]}, str(folder / "kohyatok.safetensors"))
    return vectors


def test_each_embedding_format_loads_and_its_vectors_reach_the_text_tower(embedder, tmp_path):
    from ldm.adapters.textual_inversion import load_folder

    width = embedder.model.token_embedding.weight.shape[1]
    vectors = write_embeddings(tmp_path / "emb", width)
    loaded = load_folder(tmp_path / "emb", width)
    assert sorted(loaded) == sorted(vectors)
    for name, v in vectors.items():
        assert torch.equal(loaded[name].vectors, v) and len(loaded[name].hash) == 12
    seen = []
    hook = embedder.model.transformer.resblocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        z = encode_prompt(embedder, "a a1111tok cat", embeddings={"a1111tok": vectors["a1111tok"]})
    finally:
        hook.remove()
    x = seen[0][0]  # (77, width): token embeddings + positions, the tower's input
    pos = embedder.model.positional_embedding
    torch.testing.assert_close(x[2:4], vectors["a1111tok"] + pos[2:4])  # start, "a", then the two vectors
    cat = embedder.tokenizer().encode("cat")[0]
    torch.testing.assert_close(x[4], embedder.model.token_embedding.weight[cat] + pos[4])
    weighted = encode_prompt(embedder, "a (a1111tok:1.3) cat", embeddings={"a1111tok": vectors["a1111tok"]})
    assert weighted.shape == z.shape and not torch.equal(weighted, z)


def test_bad_embeddings_are_one_line(tmp_path):
    import pickle

    from ldm.errors import SDError
    from ldm.adapters.textual_inversion import load_embedding

    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}}, tmp_path / "sd1.pt")
    with pytest.raises(SDError, match="an SD 1.x embedding \\(768 wide\\)"):
        load_embedding(tmp_path / "sd1.pt", 1024)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"string_to_param": {"*": Evil()}}))
    with pytest.raises(SDError, match="refused because unpickling can run code"):
        load_embedding(tmp_path / "evil.pt", 1024)
    torch.save({"string_to_param": {"*": Evil()}}, tmp_path / "evil-zip.pt")  # the same inside torch's zip
    with pytest.raises(SDError, match="holds Python objects besides tensors"):
        load_embedding(tmp_path / "evil-zip.pt", 1024)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(SDError, match="not a valid safetensors file"):
        load_embedding(tmp_path / "junk.safetensors", 1024)


def test_the_command_uses_embeddings_and_records_their_hashes(tiny_ckpts, tmp_path, capsys):
    from PIL import Image

    from ldm.files import metadata
    from ldm.cli import main
    from ldm.adapters.textual_inversion import load_folder

    width = tiny_ckpts["eps"]["model"].cond_stage_model.model.token_embedding.weight.shape[1]
    write_embeddings(tmp_path / "emb", width)
    args = ["txt2img", "--ckpt", str(tiny_ckpts["eps"]["safetensors"]), "--config", tiny_ckpts["eps"]["config"],
            "--steps", "2", "--H", "256", "--W", "256", "--n_samples", "1", "--n_iter", "1", "--precision", "full",
            "--device", "cpu", "--prompt", "a kohyatok cube", "-n", "difftok"]
    assert main([*args, "--embeddings", str(tmp_path / "emb"), "--outdir", str(tmp_path / "o")]) == 0
    image = next((tmp_path / "o" / "samples").glob("*.png"))
    fields = metadata.parse_parameters(metadata.read_png_text(image)["parameters"])[2]
    hashes = {name: e.hash for name, e in load_folder(tmp_path / "emb", width).items()}
    assert fields["TI hashes"] == f"difftok: {hashes['difftok']}, kohyatok: {hashes['kohyatok']}"
    assert main([*args, "--embeddings", str(tmp_path / "nowhere"), "--outdir", str(tmp_path / "p")]) == 1
    assert "--embeddings" in capsys.readouterr().err
    plain = Image.open(image)
    assert main([*args, "--outdir", str(tmp_path / "q")]) == 0  # the default folder (absent): no embeddings
    other = Image.open(next((tmp_path / "q" / "samples").glob("*.png")))
    assert plain.tobytes() != other.tobytes()  # without the embedding the word is plain text
