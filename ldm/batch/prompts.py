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


def read_prompt_lines(path: str | Path) -> list[PromptLine]:
    """The prompts of `path` in file order; SDError (one line) for a missing, empty or invalid file."""
    path = Path(path)
    if not path.is_file():
        raise SDError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SDError(f"prompt file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise SDError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    jsonl = is_jsonl(path)
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
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


def parse_json_line(text: str, where: str) -> PromptLine:
    """One JSON Lines record -> PromptLine; SDError "FILE:LINE: what is wrong" otherwise."""
    try:
        record = json.loads(text)
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
