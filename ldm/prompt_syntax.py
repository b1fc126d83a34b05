"""AUTOMATIC1111's prompt syntax: emphasis weights, BREAK, and <lora:...> tags (no torch here).

The rules (A1111's, reimplemented): `(text)` multiplies the weight of its text by 1.1 and `[text]`
divides it by 1.1; `(text:w)` multiplies it by w; nesting multiplies; `\\(`, `\\)`, `\\[`, `\\]` and `\\\\`
are literal characters; brackets still open at the end close there (so they apply to everything after
them); `BREAK` as a word ends the current 75-token chunk; neighbouring runs of equal weight merge.
`<lora:NAME:W>` and `<lora:NAME:TE_W:UNET_W>` are taken out of the text before any of this.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ldm.errors import SDError

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = "BREAK"
BREAK_MARK = object()  # a BREAK while parsing (its text is not a string, so no weight reaches it)
_PIECE = re.compile(r"""
      \\[()\[\]\\]          # an escaped bracket or backslash: literal
    | \\                    # a lone backslash: literal
    | \(                    # open round
    | \[                    # open square
    | :\s*([+-]?[.\d]+)\s*\)  # :weight) closes a round bracket with that weight
    | \)                    # close round
    | \]                    # close square
    | [^\\()\[\]:]+         # plain text
    | :                     # a colon that is not a weight
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_LORA = re.compile(r"<lora:([^:>]+)(?::([^:>]+))?(?::([^:>]+))?>")


@dataclass(frozen=True)
class LoraTag:
    """A <lora:NAME:W> (or <lora:NAME:TE_W:UNET_W>) tag: which LoRA and how strongly, per model part."""
    name: str
    text_weight: float
    unet_weight: float


def parse_weights(text: str) -> list[tuple[str, float]]:
    """[(text, weight), ...] of a prompt, with ("BREAK", -1.0) where a chunk must end."""
    out: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in out[start:]:
            if piece[0] is not BREAK_MARK:  # a BREAK inside brackets stays a BREAK (A1111 weights the word)
                piece[1] *= factor

    for match in _PIECE.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            out.append([piece[1:] if len(piece) > 1 else piece, 1.0])
        elif piece == "(":
            rounds.append(len(out))
        elif piece == "[":
            squares.append(len(out))
        elif weight is not None and rounds:
            multiply(rounds.pop(), _number(weight))
        elif piece == ")" and rounds:
            multiply(rounds.pop(), ROUND)
        elif piece == "]" and squares:
            multiply(squares.pop(), SQUARE)
        else:
            for k, part in enumerate(_BREAK.split(piece)):
                if k:
                    out.append([BREAK_MARK, -1.0])
                out.append([part, 1.0])
    for start in rounds:
        multiply(start, ROUND)
    for start in squares:
        multiply(start, SQUARE)
    return _merged([[BREAK if text is BREAK_MARK else text, weight] for text, weight in out])


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # e.g. ":1.2.3)": A1111's pattern admits it, float() does not
        raise SDError(f"the prompt weight '{text}' is not a number") from None


def _merged(pieces: list[list]) -> list[tuple[str, float]]:
    """Neighbouring pieces of equal weight joined; empty text dropped (an empty prompt stays one piece)."""
    merged: list[list] = []
    for text, weight in pieces:
        if merged and weight == merged[-1][1] and text != BREAK and merged[-1][0] != BREAK:
            merged[-1][0] += text
        elif text or weight == -1.0:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


def take_loras(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt without its <lora:...> tags, the tags)."""
    tags = []
    for name, first, second in _LORA.findall(prompt):
        try:
            text = float(first) if first else 1.0
            unet = float(second) if second else text
        except ValueError:
            raise SDError(f"<lora:{name}:...>: the weights must be numbers") from None
        tags.append(LoraTag(name.strip(), text, unet))
    return _LORA.sub("", prompt), tags
