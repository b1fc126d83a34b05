"""AUTOMATIC1111's prompt syntax: emphasis weights, BREAK, and <lora:...> tags (no torch here).

The rules (A1111's, reimplemented): `(text)` multiplies the weight of its text by 1.1 and `[text]`
divides it by 1.1; `(text:w)` multiplies it by w; nesting multiplies; `\\(`, `\\)`, `\\[`, `\\]` and `\\\\`
are literal characters; brackets still open at the end close there (so they apply to everything after
them); `BREAK` as a word ends the current 75-token chunk; neighbouring runs of equal weight merge.
`<lora:NAME:W>` and `<lora:NAME:TE_W:UNET_W>` are taken out of the text before any of this.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ldm.errors import SDError

ROUND, SQUARE = 1.1, 1 / 1.1
MAX_LORA_WEIGHT = 100.0
# Bounds that keep the parse linear and the features finite; A1111's own examples nest three deep and
# weigh 0.5 to 1.5, so no prompt written for it comes near them.
MAX_NESTING = 100
MAX_WEIGHT = 1000.0
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


class _Bracket:
    """An open bracket while parsing: the factor it will apply and when (the order of closing)."""
    __slots__ = ("factor", "order")

    def __init__(self):
        self.factor, self.order = 1.0, 0


def parse_weights(text: str) -> list[tuple[str, float]]:
    """[(text, weight), ...] of a prompt, with ("BREAK", -1.0) where a chunk must end.

    Linear in the prompt: each piece remembers the brackets open around it (at most MAX_NESTING), and its
    weight is 1.0 times their factors in the order the brackets closed, the product A1111's rule gives
    (closed brackets inner first; those left open at the end outer first, round before square).
    SDError for nesting deeper than MAX_NESTING or a weight that is not finite or above MAX_WEIGHT."""
    pieces: list[tuple[object, tuple]] = []  # (text or BREAK_MARK, the brackets open around it)
    rounds: list[_Bracket] = []
    squares: list[_Bracket] = []
    closed = 0

    def close(stack: list, factor: float) -> None:
        nonlocal closed
        bracket = stack.pop()
        closed += 1
        bracket.factor, bracket.order = factor, closed

    def add(piece) -> None:
        pieces.append((piece, tuple(rounds) + tuple(squares)))

    for match in _PIECE.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            add(piece[1:] if len(piece) > 1 else piece)
        elif piece in ("(", "["):
            if len(rounds) + len(squares) >= MAX_NESTING:
                raise SDError(f"the prompt nests brackets more than {MAX_NESTING} deep (at character {match.start()}); "
                              "close some, or escape literal ones as \\( and \\[")
            (rounds if piece == "(" else squares).append(_Bracket())
        elif weight is not None and rounds:
            close(rounds, _number(weight))
        elif piece == ")" and rounds:
            close(rounds, ROUND)
        elif piece == "]" and squares:
            close(squares, SQUARE)
        else:
            for k, part in enumerate(_BREAK.split(piece)):
                if k:
                    add(BREAK_MARK)  # a BREAK inside brackets stays a BREAK (A1111 weights the word)
                add(part)
    for bracket in rounds:
        close([bracket], ROUND)
    for bracket in squares:
        close([bracket], SQUARE)
    weights: dict[tuple, float] = {}  # pieces under the same brackets share their weight
    out = []
    for piece, around in pieces:
        if piece is BREAK_MARK:
            out.append([BREAK, -1.0])
            continue
        if around not in weights:
            weight = 1.0
            for bracket in sorted(around, key=lambda b: b.order):
                weight *= bracket.factor
            if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
                raise SDError(f"the prompt's brackets give '{piece[:40]}' a weight of {weight:g}; weights are finite "
                              f"numbers up to {MAX_WEIGHT:g}")
            weights[around] = weight
        out.append([piece, weights[around]])
    return _merged(out)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:  # e.g. ":1.2.3)": A1111's pattern admits it, float() does not
        raise SDError(f"the prompt weight '{text}' is not a number") from None
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise SDError(f"the prompt weight '{text[:40]}' is not a finite number up to {MAX_WEIGHT:g}")
    return value


def _merged(pieces: list[list]) -> list[tuple[str, float]]:
    """Neighbouring pieces of equal weight joined; empty text dropped (an empty prompt stays one piece)."""
    merged: list[list] = []
    for text, weight in pieces:
        if merged and weight == merged[-1][1] and text != BREAK and merged[-1][0] != BREAK:
            merged[-1][0] += text
        elif text or weight == -1.0:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


def lora_weight(text: str, what: str) -> float:
    """A LoRA weight (a tag's or --lora's): a finite number of at most MAX_LORA_WEIGHT in size (NaN, inf or
    1e30 would turn every image black)."""
    try:
        value = float(text)
    except ValueError:
        raise SDError(f"{what}: the weight '{text}' is not a number") from None
    if not math.isfinite(value) or abs(value) > MAX_LORA_WEIGHT:
        raise SDError(f"{what}: the weight {value} is not a finite number up to {MAX_LORA_WEIGHT:g}")
    return value


def take_loras(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt without its <lora:...> tags, the tags)."""
    tags = []
    for name, first, second in _LORA.findall(prompt):
        what = f"<lora:{name}:...>"
        text = lora_weight(first, what) if first else 1.0
        unet = lora_weight(second, what) if second else text
        tags.append(LoraTag(name.strip(), text, unet))
    return _LORA.sub("", prompt), tags


def drop_lora_tags(prompt: str, keep) -> tuple[str, list[str]]:
    """(the prompt without the <lora:NAME...> tags whose NAME `keep(name)` refuses, those names)."""
    dropped = []

    def one(match) -> str:
        if keep(match.group(1).strip()):
            return match.group(0)
        dropped.append(match.group(1).strip())
        return ""

    return _LORA.sub(one, prompt), dropped
