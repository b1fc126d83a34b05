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


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def read_styles(path: Optional[Path]) -> dict[str, Style]:
    """The styles of an A1111 styles.csv (header name,prompt,negative_prompt); {} when there is no file."""
    if path is None or not Path(path).is_file():
        return {}
    path = Path(path)
    if path.stat().st_size > MAX_BYTES:
        raise SDError(f"{path} is {path.stat().st_size} bytes, too large for a styles file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SDError(f"cannot read the styles file {path}: {exc}") from None
    styles: dict[str, Style] = {}
    for row in csv.DictReader(io.StringIO(text)):
        name = (row.get("name") or "").strip()
        if name and len(styles) < MAX_STYLES:
            styles[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
    return styles


def _apply(style_text: str, text: str) -> str:
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", text)
    if not style_text:
        return text
    return f"{text}, {style_text}" if text else style_text


def apply_styles(styles: dict[str, Style], names, prompt: str, negative: str) -> tuple[str, str, list, list]:
    """(prompt, negative prompt, the names applied, the names ignored) after the named styles, in order."""
    applied, ignored = [], []
    for name in names or []:
        style = styles.get(str(name))
        if style is None:
            ignored.append(str(name))
            continue
        prompt, negative = _apply(style.prompt, prompt), _apply(style.negative_prompt, negative)
        applied.append(style.name)
    return prompt, negative, applied, ignored
