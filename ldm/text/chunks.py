"""Prompts as AUTOMATIC1111 encodes them: weighted tokens in 75-token chunks, textual-inversion vectors.

A prompt's pieces (ldm.text.syntax) are tokenised one by one into chunks of 75 positions; when a chunk
is full and a comma came within the last 20 tokens, the tokens after that comma move to the next chunk
(A1111's comma backtrack); BREAK ends a chunk. Each chunk is padded with end tokens to 75, wrapped in the
start and end tokens (77) and, as SD 2's OpenCLIP tokenizer does, everything after its first end token
becomes 0. Chunks are encoded one by one and joined along the sequence: (77 * k, width). Emphasis
"original" multiplies each position's features by its weight and rescales the chunk to its unweighted
mean; "none" skips the rescale; "off" is the plain tokenizer (no syntax, cut at 77 tokens).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

import torch

from ldm.errors import SDError
from ldm.text.syntax import BREAK, parse_weights

CHUNK = 75  # prompt positions per chunk, between the start and end tokens
# A prompt longer than max_chunks * CHUNK * this many characters is refused before it is tokenised (a
# token is a few characters; only runs of spaces or of one rare word are longer).
MAX_CHARS_PER_TOKEN = 64
COMMA_BACKTRACK = 20  # A1111's default comma_padding_backtrack
EMPHASIS = ("original", "none", "off")
Token = Union[int, torch.Tensor]  # a token id, or one textual-inversion vector (width,)


@dataclass
class Chunk:
    tokens: list[Token] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def _pieces(text: str, names: list[str]):
    """Split `text` on the embedding names (as whole words): [(text or None, name or None), ...]."""
    if not names:
        return [(text, None)]
    pattern = re.compile(r"(?<![\w])(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")(?![\w])")
    out, last = [], 0
    for match in pattern.finditer(text):
        out.append((text[last:match.start()], None))
        out.append((None, match.group(1)))
        last = match.end()
    out.append((text[last:], None))
    return [(t, n) for t, n in out if n is not None or t]


def prompt_chunks(tokenizer, prompt: str, embeddings: Optional[Mapping[str, torch.Tensor]] = None,
                  max_chunks: Optional[int] = None, limit: str = "--max-chunks") -> list[Chunk]:
    """The prompt's chunks: token ids or vectors, with their weights (before start/end wrapping).
    SDError as soon as the prompt needs more than `max_chunks` (each chunk is one pass of the text tower,
    and the UNet attends to all of them at every step: 10,000 BREAKs must not cost minutes); `limit` is
    how the front end names that bound."""
    embeddings = embeddings or {}
    comma = tokenizer.encode(",")[0]
    chunks: list[Chunk] = []
    chunk, last_comma = Chunk(), -1
    if max_chunks is not None and len(prompt) > max_chunks * CHUNK * MAX_CHARS_PER_TOKEN:
        raise SDError(f"the prompt is {len(prompt)} characters, more than {max_chunks} chunks of {CHUNK} tokens "
                      f"can hold ({limit} {max_chunks})")

    def close() -> None:
        nonlocal chunk, last_comma
        if max_chunks is not None and len(chunks) >= max_chunks:
            raise SDError(f"the prompt needs more than {max_chunks} chunks of {CHUNK} tokens ({limit}; "
                          "BREAK starts a chunk)")
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for text, weight in parse_weights(prompt):
        if text == BREAK and weight == -1.0:
            close()
            continue
        for part, name in _pieces(text, list(embeddings)):
            items = list(embeddings[name]) if name is not None else tokenizer.encode(part)
            for token in items:
                if isinstance(token, int) and token == comma:
                    last_comma = len(chunk.tokens)
                elif len(chunk.tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
                    moved = Chunk(chunk.tokens[last_comma + 1:], chunk.weights[last_comma + 1:])
                    chunk.tokens, chunk.weights = chunk.tokens[:last_comma + 1], chunk.weights[:last_comma + 1]
                    close()
                    chunk = moved
                if len(chunk.tokens) == CHUNK:
                    close()
                chunk.tokens.append(token)
                chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        close()
    return chunks


def check_prompt(what: str, text: str, max_chunks: int, limit: str = "--max-chunks") -> None:
    """SDError for a prompt no model should be given: not UTF-8 text, bad emphasis or LoRA weights, or more
    than `max_chunks` chunks (textual-inversion names are counted as words here; their vectors are
    counted again when the prompt is encoded). Checked before any model loads."""
    from ldm.limits import check_text
    from ldm.text.tokenizer import get_tokenizer
    from ldm.text.syntax import take_loras

    try:
        check_text(what, text)
        words = take_loras(text)[0]
        if "<hypernet:" in words:  # A1111's other extra network: refused, not drawn as words
            name = words.split("<hypernet:", 1)[1].split(":", 1)[0].split(">", 1)[0][:80]
            raise SDError(f"<hypernet:{name}...>: sd applies no hypernetworks (A1111's older add-on networks); "
                          "take the tag out, or use a LoRA")
        parse_weights(words)
        # a chunk holds at least CHUNK - COMMA_BACKTRACK tokens, and a token at least one UTF-8 byte
        if len(words.encode()) > (max_chunks - 1) * (CHUNK - COMMA_BACKTRACK) or BREAK in words:
            prompt_chunks(get_tokenizer(), words, max_chunks=max_chunks, limit=limit)
    except SDError as exc:
        raise SDError(f"{what}: {exc}" if not str(exc).startswith(what) else str(exc)) from None


def chunk_inputs(tokenizer, chunk: Chunk) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]], torch.Tensor]:
    """(ids (77,), [(position, vector), ...], weights (77,)) of one chunk, wrapped and padded."""
    pad = CHUNK - len(chunk.tokens)
    tokens = [tokenizer.sot_token_id, *chunk.tokens, *[tokenizer.eot_token_id] * pad, tokenizer.eot_token_id]
    weights = torch.tensor([1.0, *chunk.weights, *[1.0] * pad, 1.0])
    vectors = [(k, t) for k, t in enumerate(tokens) if isinstance(t, torch.Tensor)]
    ids = torch.tensor([0 if isinstance(t, torch.Tensor) else t for t in tokens], dtype=torch.long)
    first_end = int((ids == tokenizer.eot_token_id).nonzero()[0])
    ids[first_end + 1:] = 0  # OpenCLIP pads with 0 after the end token
    return ids, vectors, weights


def encode_prompt(embedder, prompt: str, emphasis: str = "original",
                  embeddings: Optional[Mapping[str, torch.Tensor]] = None, max_chunks: Optional[int] = None,
                  between: Optional[Callable[[], None]] = None, limit: str = "--max-chunks") -> torch.Tensor:
    """Features (77 * chunks, width) of one prompt; `embedder` is a FrozenOpenCLIPEmbedder. `between` is
    called before each chunk's pass (where an interrupt stops a long prompt)."""
    if emphasis not in EMPHASIS:
        raise SDError(f"--emphasis must be one of {', '.join(EMPHASIS)} (got '{emphasis}')")
    if emphasis == "off":
        return embedder.encode([prompt])[0]
    tokenizer = embedder.tokenizer()
    out = []
    for chunk in prompt_chunks(tokenizer, prompt, embeddings, max_chunks, limit):
        if between is not None:
            between()
        ids, vectors, weights = chunk_inputs(tokenizer, chunk)
        z = embedder.encode_tokens(ids[None], vectors=vectors)[0]  # (77, width)
        if bool((weights != 1.0).any()):
            mean = z.float().mean()
            z = z * weights.to(z)[:, None]
            if emphasis == "original":
                z = z * (mean / z.float().mean()).to(z)
        out.append(z)
    return torch.cat(out)  # (77 * chunks, width)
