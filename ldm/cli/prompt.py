"""`sd prompt "..."`: how sd reads a prompt (chunks, tokens, weights, LoRAs, embeddings), as A1111's token
counter shows it."""
from __future__ import annotations

from typing import Annotated

import typer

from ldm.cli.app import app
from ldm.cli import options as opt


@app.command("prompt", help="Show how a prompt is parsed: its 75-token chunks, each token's weight, LoRA tags.")
def prompt(text: Annotated[str, typer.Argument(help="The prompt, with AUTOMATIC1111's syntax.")],
           embeddings: opt.Embeddings = None) -> None:
    from ldm.limits import check_text
    from ldm.files.metadata import printable
    from ldm.text.chunks import CHUNK, prompt_chunks
    from ldm.text.tokenizer import get_tokenizer
    from ldm.text.syntax import take_loras

    check_text("the prompt", text)
    words, loras = take_loras(text)
    tokenizer = get_tokenizer(77)
    names = {i: s.replace("</w>", " ") for s, i in tokenizer.vocab.items()}
    found = _embeddings(embeddings, words)
    chunks = prompt_chunks(tokenizer, words, {name: [None] * n for name, n in found.items()})
    print(f"{sum(len(c.tokens) for c in chunks)} tokens in {len(chunks)} chunk(s) of {CHUNK}")
    for k, chunk in enumerate(chunks):
        shown = []
        for token, weight in zip(chunk.tokens, chunk.weights):
            word = "<embedding>" if token is None else printable(names.get(token, "?")).strip() or "·"
            shown.append(word if weight == 1.0 else f"({word}:{weight:.4g})")
        print(f"chunk {k + 1} ({len(chunk.tokens)} tokens): {' '.join(shown)}")
    for name, n in found.items():
        print(f"embedding {name}: {n} vector(s)")
    for tag in loras:
        print(f"LoRA {tag.name}: text encoder x{tag.text_weight:g}, UNet x{tag.unet_weight:g}")


def _embeddings(folder, words: str) -> dict[str, int]:
    """{name: vector count} of the textual-inversion files in `folder` whose names the prompt uses."""
    from ldm.adapters.textual_inversion import _read, files_in, names_in, vectors_of

    if folder is None:
        return {}
    files = {p.stem: p for p in files_in(folder)} if folder.is_dir() else {}
    return {name: vectors_of(_read(files[name]), name).shape[0] for name in names_in([words], files)}
