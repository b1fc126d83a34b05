"""AUTOMATIC1111's prompt styles: a styles.csv of name, prompt, negative_prompt, applied as A1111 applies them.

A style's text replaces "{prompt}" in it with the prompt when it holds that placeholder, else it is added
after the prompt with ", " (or alone when the prompt is empty); the negative prompt likewise. Names the
file does not hold ("None" among them, which A1111's UI sends for no style) change nothing, as in A1111,
and are reported back as ignored.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ldm.errors import SDError

MAX_BYTES = 4 * 2 ** 20  # a styles file of thousands of styles is well under this
MAX_STYLES = 10_000
MAX_STYLES_PER_REQUEST = 64  # A1111's UI picks a handful; each one may repeat the prompt it is given
MAX_STYLED_CHARS = 100_000  # a prompt and negative prompt after the styles; 32 chunks of 75 tokens is far less


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def read_styles(path: Optional[Path]) -> dict[str, Style]:
    """The styles of an A1111 styles.csv (header name,prompt,negative_prompt); {} when there is no file.
    SDError naming the file when it is not a regular UTF-8 CSV file of at most MAX_BYTES."""
    from ldm.files.reading import read_text_capped

    if path is None or not Path(path).exists():
        return {}
    text = read_text_capped(path, MAX_BYTES, "styles file", encoding="utf-8-sig")
    styles: dict[str, Style] = {}
    try:
        # csv refuses a field over 128 KiB (its field_size_limit): longer than any prompt a style can make
        for row in csv.DictReader(io.StringIO(text)):
            name = (row.get("name") or "").strip()
            if name and len(styles) < MAX_STYLES:
                styles[name] = Style(name, _text(row.get("prompt")), _text(row.get("negative_prompt")))
    except csv.Error as exc:
        raise SDError(f"the styles file {path} is not a CSV file sd can read ({exc})") from None
    return styles


def _text(value) -> str:
    # a row with more fields than the header puts the rest in a list under the key None; fewer leave None
    return value if isinstance(value, str) else ""


def _apply(style_text: str, text: str) -> str:
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", text)
    if not style_text:
        return text
    return f"{text}, {style_text}" if text else style_text


def apply_styles(styles: dict[str, Style], names, prompt: str, negative: str) -> tuple[str, str, list, list]:
    """(prompt, negative prompt, the names applied, the names ignored) after the named styles, in order.

    The growth is bounded before it happens: at most MAX_STYLES_PER_REQUEST names, and a prompt that would
    pass MAX_STYLED_CHARS (a style holding "{prompt}" twice doubles it each time) is an SDError."""
    names = list(names or [])
    if len(names) > MAX_STYLES_PER_REQUEST:
        raise SDError(f"styles names {len(names)} styles; at most {MAX_STYLES_PER_REQUEST} apply to one request")
    applied, ignored = [], []
    for name in names:
        style = styles.get(str(name))
        if style is None:
            ignored.append(str(name))
            continue
        for template, text in ((style.prompt, prompt), (style.negative_prompt, negative)):
            grown = template.count("{prompt}") * len(text) + len(template) if "{prompt}" in template else \
                len(text) + len(template) + 2
            if grown > MAX_STYLED_CHARS:
                raise SDError(f"the styles make the prompt longer than {MAX_STYLED_CHARS:,} characters (at "
                              f"style '{style.name}')")
        prompt, negative = _apply(style.prompt, prompt), _apply(style.negative_prompt, negative)
        applied.append(style.name)
    return prompt, negative, applied, ignored
