"""What one run may ask for, and the checks of single values that every front end shares.

Nothing here imports torch, so the command line can use it for its defaults while staying cheap.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from ldm.errors import SDError

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes seeds up to this


def is_whole(value, minimum: int = 0, maximum: Optional[int] = None) -> bool:
    """True for an int (not a bool) in [minimum, maximum]: the one test of whole numbers that come from
    outside (flags, JSON, checkpoint headers, manifests)."""
    return (isinstance(value, int) and not isinstance(value, bool) and value >= minimum
            and (maximum is None or value <= maximum))


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what one run may ask for, checked before anything is loaded, so that a typo
    (--steps 50000, --n_iter 10000, --H 51200) is one line and not minutes of work or an allocation
    without limit. The commands expose them as --max-side/--max-steps/--max-batch/--max-images/--max-chunks."""
    max_side: int = 4096  # pixels per side of a generated image
    max_steps: int = 1000  # sampling steps
    max_batch: int = 64  # images sampled together (--n_samples, or a reproduced image's batch)
    max_images: int = 100_000  # images one run saves
    max_chunks: int = 32  # 75-token chunks of one prompt (A1111 prompts rarely pass 4)

    def check(self, name=lambda key: f"--{key.replace('_', '-')}") -> "Limits":
        """SDError unless every limit is a whole number of at least 1; `name` says a field as a front end does
        (by default the flag: max_steps -> --max-steps)."""
        for key, value in dataclasses.asdict(self).items():
            if not is_whole(value, minimum=1):
                raise SDError(f"{name(key)} must be a whole number of at least 1 (got {value})")
        return self


# How the server's front ends (the API, the page) name the limits in messages: the operator sets them.
SERVER_LIMIT_NAMES = {key: f"the server's {key}" for key in ("max_side", "max_steps", "max_batch", "max_images",
                                                                "max_chunks")}

# Guidance scales and etas past these only overflow: A1111's sliders stop at 30 and 1.
MAX_SCALE = 1000.0
MAX_ETA = 100.0


def check_number(name: str, value: float, minimum: Optional[float] = None, maximum: Optional[float] = None) -> None:
    """SDError unless `value` is a finite number (NaN and infinity give black images) within the bounds given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SDError(f"{name} must be a finite number (got {value})")
    if minimum is not None and value < minimum:
        raise SDError(f"{name} must be {minimum} or more (got {value})")
    if maximum is not None and abs(value) > maximum:
        raise SDError(f"{name} must be at most {maximum:g} in size (got {value:g})")


def check_range(name: str, value, low: float, high: float, whole: bool = False) -> None:
    """SDError unless `value` is a finite number from low to high (with `whole`, an int: is_whole's rule)."""
    if whole:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise SDError(f"{name} must be a {'whole ' if whole else ''}number from {low:g} to {high:g} (got {value!r})")


def check_text(name: str, text: str) -> None:
    """SDError unless `text` is valid Unicode: a byte that is not UTF-8 (a Latin-1 text file, a shell in
    another locale) arrives as a lone surrogate, which neither the tokenizer nor PNG metadata can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        # U+DC80..U+DCFF is how Python carries an undecodable byte; any other surrogate came in as such
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise SDError(f"{name} is not valid UTF-8 text ({what} at character {exc.start}); save it as UTF-8") from None
    if "\0" in text:
        raise SDError(f"{name} holds a NUL character, which PNG metadata cannot carry")


def check_seed(seed: int, where: str = "--seed") -> None:
    if not is_whole(seed, 0, SEED_MAX):
        raise SDError(f"{where}: seeds must be whole numbers from 0 to 2**64 - 1 (got {seed})")
