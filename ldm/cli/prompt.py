"""`sd prompt "..."`: how sd reads a prompt (chunks, tokens, weights, LoRAs, embeddings), as A1111's token
counter shows it."""
from __future__ import annotations

from typing import Annotated

import typer

from ldm.cli import app


@app.command("prompt", help="Show how a prompt is parsed: its 75-token chunks, each token's weight, LoRA tags.")
def prompt(text: Annotated[str, typer.Argument(help="The prompt, with AUTOMATIC1111's syntax.")]) -> None:
    from ldm.limits import check_text
    from ldm.metadata import printable
    from ldm.modules.encoders.prompt_chunks import CHUNK, prompt_chunks
    from ldm.modules.encoders.tokenizer import get_tokenizer
    from ldm.prompt_syntax import take_loras

    check_text("the prompt", text)
    words, loras = take_loras(text)
    tokenizer = get_tokenizer(77)
    names = {i: s.replace("</w>", " ") for s, i in tokenizer.vocab.items()}
    chunks = prompt_chunks(tokenizer, words)
    print(f"{sum(len(c.tokens) for c in chunks)} tokens in {len(chunks)} chunk(s) of {CHUNK}")
    for k, chunk in enumerate(chunks):
        shown = []
        for token, weight in zip(chunk.tokens, chunk.weights):
            word = printable(names.get(token, "?")).strip() or "·"
            shown.append(word if weight == 1.0 else f"({word}:{weight:.4g})")
        print(f"chunk {k + 1} ({len(chunk.tokens)} tokens): {' '.join(shown)}")
    for tag in loras:
        print(f"LoRA {tag.name}: text encoder x{tag.text_weight:g}, UNet x{tag.unet_weight:g}")
