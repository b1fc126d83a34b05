"""Prompt files for `--from-file`: one prompt a line (the reference's form) or JSON Lines.

Both forms skip blank lines and lines starting with '#'. A file whose name ends in .jsonl or .ndjson is
JSON Lines: each line is an object with a "prompt" and optionally its own settings (FIELDS); what a
line leaves out comes from the command's flags. Every mistake is reported as one line naming the file
and line number, before any model is loaded.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Optional

from ldm.errors import SDError
from ldm.request import PromptLine

JSONL_SUFFIXES = (".jsonl", ".ndjson")

# JSON Lines fields and what they mean (the flag each one overrides).
FIELDS = {
    "prompt": "the prompt (required)",
    "negative_prompt": "--negative-prompt",
    "seed": "--seed: this line's images use seed, seed + 1, ... (one per copy from --repeat/--n_iter)",
    "steps": "--steps",
    "scale": "--scale",
    "size": '--W and --H, as "WIDTHxHEIGHT" or [WIDTH, HEIGHT]',
    "sampler": "--sampler",
    "schedule": "--schedule",
    "eta": "--ddim_eta",
}


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() in JSONL_SUFFIXES


MAX_PROMPT_FILE_BYTES = 64 * 2**20  # 100,000 prompts of 600 characters; a larger file is not a prompt list


def read_prompt_lines(path: str | Path, max_prompts: Optional[int] = None,
                      too_many: str = "") -> list[PromptLine]:
    """The prompts of `path` in file order; SDError (one line) for a missing, empty, oversized or invalid file,
    or one of more than `max_prompts` prompts (`too_many` says why that is the bound), found as soon as the
    line past the bound is reached, not after the whole file is parsed."""
    from ldm.files.reading import read_text_capped

    path = Path(path)
    text = read_text_capped(path, MAX_PROMPT_FILE_BYTES, "prompt file")
    jsonl = is_jsonl(path)
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if max_prompts is not None and len(lines) >= max_prompts:
            raise SDError(f"prompt file {path} has more than {max_prompts:,} prompts{too_many}")
        where = f"{path}:{number}"
        lines.append(parse_json_line(stripped, where) if jsonl else PromptLine(stripped, where=where))
    if not lines:
        form = "one JSON object a line" if jsonl else "one prompt a line"
        raise SDError(f"prompt file {path} has no prompts ({form}; blank lines and # comments are skipped)")
    return lines


def _integer(value, where: str, key: str, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SDError(f"{where}: \"{key}\" must be a whole number, got {json.dumps(value)}")
    if minimum is not None and value < minimum:
        raise SDError(f"{where}: \"{key}\" must be at least {minimum}, got {value}")
    return value


def _number(value, where: str, key: str, minimum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SDError(f"{where}: \"{key}\" must be a number, got {json.dumps(value)}")
    if minimum is not None and value < minimum:
        raise SDError(f"{where}: \"{key}\" must be at least {minimum}, got {value}")
    return float(value)


def _text(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise SDError(f"{where}: \"{key}\" must be a string, got {json.dumps(value)}")
    return value


def parse_size(value, where: str, key: str = "size") -> tuple[int, int]:
    """"512x768" or [512, 768] -> (512, 768), i.e. (width, height)."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        ok = len(parts) == 2 and all(p.strip().isdigit() for p in parts)
        size = tuple(int(p) for p in parts) if ok else None
    elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        size = tuple(value)
    else:
        size = None
    if size is None:
        raise SDError(f"{where}: \"{key}\" must be \"WIDTHxHEIGHT\" or [WIDTH, HEIGHT], got {json.dumps(value)}")
    return size  # type: ignore[return-value]  (multiples of 8 etc.: ldm.tasks.check_size)


MAX_INT_DIGITS = 40  # a seed is at most 20 digits; Python's own bound (4300 digits) raises a traceback


class _TooLong(ValueError):
    pass


def _bounded_int(text: str) -> int:
    """json's parse_int: whole numbers of at most MAX_INT_DIGITS digits (bigger ones are junk, and past 4300
    digits int() itself refuses them)."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _TooLong(len(text.lstrip("-")))
    return int(text)


def parse_json_line(text: str, where: str) -> PromptLine:
    """One JSON Lines record -> PromptLine; SDError "FILE:LINE: what is wrong" otherwise."""
    try:
        record = json.loads(text, parse_int=_bounded_int)
    except _TooLong as exc:
        raise SDError(f"{where}: a number of {exc.args[0]} digits; sd reads whole numbers of at most "
                      f"{MAX_INT_DIGITS} digits") from None
    except json.JSONDecodeError as exc:
        raise SDError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise SDError(f"{where}: not valid JSON for sd (nested too deep)") from None
    if not isinstance(record, dict):
        raise SDError(f"{where}: expected a JSON object like {{\"prompt\": \"...\"}}, got {type(record).__name__}")
    unknown = [key for key in record if key not in FIELDS]
    if unknown:
        raise SDError(f"{where}: unknown field \"{unknown[0]}\" (known: {', '.join(FIELDS)})")
    if "prompt" not in record:
        raise SDError(f"{where}: no \"prompt\" field")
    values = {key: _PARSERS[key](value, where, key) for key, value in record.items() if value is not None}
    if "prompt" not in values:
        raise SDError(f"{where}: \"prompt\" must be a string, got null")
    return PromptLine(**values, where=where)


# How each field's JSON value is checked and converted: parser(value, where, key).
_PARSERS = {
    "prompt": _text,
    "negative_prompt": _text,
    "seed": partial(_integer, minimum=0),
    "steps": partial(_integer, minimum=1),
    "scale": _number,
    "size": parse_size,
    "sampler": _text,
    "schedule": _text,
    "eta": partial(_number, minimum=0.0),
}
