"""AUTOMATIC1111's "parameters" PNG text: its grammar, its fields' meaning (Infotext), and the model hash.

The text is what A1111, ComfyUI's loaders and sd's own --from-image read: the prompt, a "Negative prompt:"
line, then "Key: value" fields. PNG text is read by walking the chunks, so a crafted file is never
decoded as pixels here.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

from ldm.errors import SDError

PARAMETERS_KEY = "parameters"  # the PNG text key AUTOMATIC1111 writes and reads


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


# AUTOMATIC1111's order of the fields it writes; other keys follow in the order given.
A1111_KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration",
    "Size", "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength",
    "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD",
)
NEGATIVE_PREFIX = "Negative prompt: "


def _format_value(key: str, value) -> str:
    if key in ("Size", "Seed resize from") and isinstance(value, (tuple, list)):
        width, height = value
        return f"{width}x{height}"
    return str(value)


def _quote(value: str) -> str:
    """AUTOMATIC1111's quoting: JSON-quote a value holding ',', ':' or a newline.

    We also quote values that its reader would otherwise change: ones starting with '"', with
    leading/trailing whitespace, or holding any control character. A1111 reads all of them back.
    """
    if (any(c in value for c in ",:") or value.startswith('"') or value != value.strip()
            or any(ord(c) < 32 for c in value)):
        return json.dumps(value, ensure_ascii=False)
    return value


_NEGATIVE_LINE = re.compile(r"^(\\*)(Negative prompt:)", re.MULTILINE)
_ESCAPED_NEGATIVE_LINE = re.compile(r"^\\(\\*Negative prompt:)", re.MULTILINE)


def _escape_lines(text: str) -> str:
    """A prompt line that starts with "Negative prompt:" (after any backslashes) gets one more backslash,
    so the reader cannot take it for the negative prompt's line; _unescape_lines takes it off again."""
    return _NEGATIVE_LINE.sub(r"\\\1\2", text)


def _unescape_lines(text: str) -> str:
    return _ESCAPED_NEGATIVE_LINE.sub(r"\1", text)


def format_parameters(prompt: str, negative_prompt: str, settings: Mapping[str, object]) -> str:
    """AUTOMATIC1111's infotext, the text of the PNG "parameters" chunk:

        <prompt>
        Negative prompt: <negative prompt>          (this line only when the negative prompt is set)
        Steps: 50, Sampler: DDIM, CFG scale: 9.0, Seed: 42, Size: 512x512, Model hash: ..., ...

    Keys A1111 knows come in its order (A1111_KEY_ORDER), the others after them as given; None values
    are left out, as A1111 does; "Size" may be given as (width, height). Values are str()-ed and
    quoted as _quote says. Keys must not hold ',', ':' or newlines (ValueError). Unlike A1111 the
    text is not .strip()ped, so prompts keep surrounding whitespace and parse_parameters inverts this
    exactly. The one ambiguity of the format, a prompt line starting "Negative prompt:", is escaped with a
    backslash (and a line of backslashes before it with one more), which parse_parameters undoes.
    """
    order = {key: i for i, key in enumerate(A1111_KEY_ORDER)}
    keys = sorted((k for k, v in settings.items() if v is not None),
                  key=lambda k: order.get(k, len(order)))  # stable: unknown keys keep their order
    parts = []
    for key in keys:
        if not key or key != key.strip() or any(c in key for c in ",:\n\r"):
            raise ValueError(f"invalid parameters key {key!r}")
        parts.append(f"{key}: {_quote(_format_value(key, settings[key]))}")
    line = ", ".join(parts)
    prompt = _escape_lines(prompt)
    negative = f"\n{NEGATIVE_PREFIX}{_escape_lines(negative_prompt)}" if negative_prompt else ""
    if not prompt and not negative:
        return line
    return f"{prompt}{negative}\n{line}"


def _parse_settings(line: str) -> dict[str, str]:
    """Split `Key: value, Key: "quoted, value", ...` into a dict of strings (values unquoted).

    Linear in the line's length: the next ':' and ',' are looked up again only once the reading has passed
    them (a text of a million bare keys would otherwise be searched to its end once per key)."""
    out: dict[str, str] = {}
    decoder = json.JSONDecoder()
    n = len(line)
    i, colon, comma = 0, -1, -1

    def next_colon(start: int) -> int:
        nonlocal colon
        if colon < start and colon != n:
            colon = line.find(":", start)
            colon = n if colon < 0 else colon
        return colon

    def next_comma(start: int) -> int:
        nonlocal comma
        if comma < start:
            comma = line.find(",", start)
            comma = n if comma < 0 else comma
        return comma

    while i < n:
        while i < n and line[i] in " ,":
            i += 1
        if i >= n:
            break
        here_colon, here_comma = next_colon(i), next_comma(i)
        if here_colon >= n or here_comma < here_colon:  # A1111 writes a bare "Key" when the value equals the key
            key = line[i:here_comma].strip()
            out[key] = key
            i = here_comma
            continue
        key = line[i:here_colon].strip()
        j = here_colon + 1
        while j < n and line[j] == " ":
            j += 1
        end = next_comma(j)
        value = line[j:end]
        if j < n and line[j] == '"':
            with contextlib.suppress(ValueError):
                decoded, stop = decoder.raw_decode(line, j)
                if isinstance(decoded, str) and (stop == n or line[stop] == ","):
                    value, end = decoded, stop
        out[key] = value
        i = end
    return out


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """Invert format_parameters: (prompt, negative_prompt, settings with str values).

    The last line holds the settings; lines before the first "Negative prompt:" line are the prompt,
    the rest the negative prompt (both may span lines). Also reads texts AUTOMATIC1111 wrote.
    """
    *lines, last = text.split("\n")
    prompt_lines, negative_lines = lines, []
    for k, line in enumerate(lines):
        if line.startswith(NEGATIVE_PREFIX.rstrip()):
            first = line[len(NEGATIVE_PREFIX.rstrip()):]
            prompt_lines = lines[:k]
            negative_lines = [first[1:] if first.startswith(" ") else first] + lines[k + 1:]
            break
    return (_unescape_lines("\n".join(prompt_lines)), _unescape_lines("\n".join(negative_lines)),
            _parse_settings(last))


def parameters_of_image(path: str | os.PathLike) -> str:
    """The "parameters" text of the picture at `path` (PNG text chunk, or JPEG/WebP EXIF UserComment), as
    stored; SDError if it carries none."""
    text = read_image_texts(path).get(PARAMETERS_KEY)
    if text is None:
        raise SDError(f"{path} carries no generation parameters (no PNG \"{PARAMETERS_KEY}\" text chunk or EXIF "
                      "UserComment)")
    return text


@dataclass
class Infotext:
    """One image's generation parameters in AUTOMATIC1111's format: the one place that writes and reads
    their meaning (the grammar is format_parameters / parse_parameters). Every reader goes through here:
    the PNG writer, --from-image, `sd info`, the API's info and png-info, the page's send-to. Samplers and
    schedules are written with A1111's names ("DPM++ 2M", "Karras") and read in either spelling."""
    prompt: str = ""
    negative_prompt: str = ""
    fields: dict = field(default_factory=dict)  # key -> value as text (None values are not written)

    @classmethod
    def read(cls, text: str) -> "Infotext":
        return cls(*parse_parameters(text))

    @classmethod
    def of_png(cls, path: str | os.PathLike) -> "Infotext":
        """The parameters of the PNG at `path`; SDError if it carries none."""
        return cls.read(parameters_of_image(path))

    @classmethod
    def of_run(cls, prompt: str, negative_prompt: str, *, steps: int, sampler: str, schedule: Optional[str],
               scale: float, seed: int, width: int, height: int, eta: float, **more) -> "Infotext":
        """What sd writes for an image: the sampling fields under A1111's names, then `more` in order."""
        from ldm.models.diffusion.sampler_names import sampler_label, schedule_label

        fields = {"Steps": steps, "Sampler": sampler_label(sampler), "Schedule type": schedule_label(schedule),
                  "CFG scale": scale, "Seed": seed, "Size": f"{width}x{height}", "Eta": eta, **more}
        return cls(prompt, negative_prompt, {k: v for k, v in fields.items() if v is not None})

    def text(self) -> str:
        return format_parameters(self.prompt, self.negative_prompt, self.fields)

    def number(self, key: str, cast: Callable, default=None):
        """A numeric field (`default` when absent); SDError when its text is not a finite number of that type."""
        if key not in self.fields:
            return default
        try:
            value = cast(str(self.fields[key]))
        except (ValueError, OverflowError):
            raise SDError(f"its {key} '{self.fields[key]}' is not readable") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise SDError(f"its {key} '{self.fields[key]}' is not a finite number")
        return value

    def size(self) -> Optional[tuple[int, int]]:
        """(width, height) of the Size field, or None."""
        if "Size" not in self.fields:
            return None
        width, sep, height = str(self.fields["Size"]).partition("x")
        if not sep or not width.isdigit() or not height.isdigit():
            raise SDError(f"its Size '{self.fields['Size']}' is not WIDTHxHEIGHT")
        return int(width), int(height)

    def sampler(self, default: str = "ddim") -> tuple[str, Optional[str]]:
        """(sd's sampler, schedule or None) from Sampler and Schedule type, in sd's or A1111's spelling."""
        from ldm.models.diffusion.sampler_names import sampler_of_name

        return sampler_of_name(str(self.fields.get("Sampler", default)), self.fields.get("Schedule type"))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_TEXT_BYTES = 1 << 20  # a text chunk larger than this (inflated) is not generation parameters
MAX_TOTAL_TEXT_BYTES = 4 * MAX_TEXT_BYTES  # all text chunks of one picture together (inflated)
MAX_CHUNKS = 100_000  # a 16-megapixel PNG in 8 KB IDAT chunks has about 6,000; tiny chunks by the million are junk


def _png_text_chunk(kind: bytes, data: bytes, budget: int) -> tuple[tuple[str, str] | None, int]:
    """((key, value) of one tEXt / zTXt / iTXt chunk, or None when it is malformed or inflates past
    MAX_TEXT_BYTES, the text bytes it cost): inflating stops at min(MAX_TEXT_BYTES, budget) + 1 bytes."""
    import zlib

    key, sep, rest = data.partition(b"\0")
    if not sep:
        return None, len(data)
    bound = min(MAX_TEXT_BYTES, budget) + 1
    cost = [len(data)]

    def inflate(raw: bytes) -> bytes | None:
        stream = zlib.decompressobj()
        try:
            out = stream.decompress(raw, bound)
        except zlib.error:
            return None
        cost[0] += len(out)
        return None if stream.unconsumed_tail or len(out) > MAX_TEXT_BYTES else out

    if kind == b"tEXt":
        value = rest.decode("latin-1")
    elif kind == b"zTXt":
        raw = inflate(rest[1:])
        value = None if raw is None else raw.decode("latin-1")
    else:  # iTXt: flag, method, language\0, translated keyword\0, text (UTF-8)
        if len(rest) < 2:
            return None, cost[0]
        compressed, parts = rest[0], rest[2:].split(b"\0", 2)
        if len(parts) != 3:
            return None, cost[0]
        raw = inflate(parts[2]) if compressed else parts[2]
        value = None if raw is None else raw.decode("utf-8", errors="replace")
    return (None if value is None else (key.decode("latin-1"), value)), cost[0]


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """All text chunks (tEXt, zTXt, iTXt) of the PNG at `path`; {} for images without any.

    The chunks are walked without decoding a single pixel (an image of 20000x20000 costs what a small
    one does), compressed text is inflated to at most MAX_TEXT_BYTES a chunk and MAX_TOTAL_TEXT_BYTES in all
    (more is one SDError line), and a damaged chunk is skipped.
    """
    return _read_file(path, png_text_chunks)


def read_image_texts(path: str | os.PathLike) -> dict[str, str]:
    """The texts of the picture at `path`: a PNG's text chunks, or the parameters in a JPEG's or WebP's EXIF
    UserComment (image_texts)."""
    return _read_file(path, image_texts)


def image_texts(f, name: str = "the image") -> dict[str, str]:
    """A PNG's text chunks, or for any other picture Pillow reads (JPEG, WebP) the parameters A1111 keeps in
    its EXIF UserComment; no pixel is decoded either way."""
    head = f.read(len(PNG_SIGNATURE))
    f.seek(0)
    return png_text_chunks(f, name) if head == PNG_SIGNATURE else exif_parameters(f, name)


def _read_file(path: str | os.PathLike, read) -> dict[str, str]:
    from ldm.files.reading import open_regular

    p = Path(path)
    with open_regular(p, "image") as f:
        try:
            return read(f, str(p))
        except OSError as exc:
            raise SDError(f"cannot read {p}: {_reason(exc)}") from None


def png_text_chunks(f, name: str = "the image") -> dict[str, str]:
    """The text chunks of the PNG open as the binary file `f` (a server's upload: io.BytesIO), as
    read_png_text; SDError if it is not a PNG."""
    import struct

    if f.read(8) != PNG_SIGNATURE:
        raise SDError(f"cannot read {name}: not a PNG file (generation parameters are stored in PNGs)")
    texts: dict[str, str] = {}
    total = 0  # text bytes (inflated) of every chunk so far: many chunks must not add up to gigabytes
    for _ in range(MAX_CHUNKS):
        head = f.read(8)
        if len(head) < 8:
            break
        length, kind = struct.unpack(">I4s", head)
        if kind in (b"tEXt", b"zTXt", b"iTXt") and length <= 4 * MAX_TEXT_BYTES:
            data = f.read(length)
            if len(data) == length:
                entry, cost = _png_text_chunk(kind, data, MAX_TOTAL_TEXT_BYTES - total)
                total += cost
                if total > MAX_TOTAL_TEXT_BYTES:
                    raise SDError(f"{name} carries more than {MAX_TOTAL_TEXT_BYTES // 2**20} MB of text chunks; sd "
                                  "reads no more from one picture")
                if entry is not None:
                    texts.setdefault(*entry)
            f.seek(4, os.SEEK_CUR)  # CRC
        elif kind == b"IEND":
            break
        else:
            f.seek(length + 4, os.SEEK_CUR)
    else:
        raise SDError(f"{name} has more than {MAX_CHUNKS:,} PNG chunks; sd reads no further")
    return texts


EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # where A1111 puts the parameters of JPEG and WebP images


def exif_parameters(f, name: str = "the image") -> dict[str, str]:
    """{"parameters": text} from a JPEG's or WebP's EXIF UserComment (A1111 writes it there), {} when it has
    none; SDError when Pillow cannot read the file as an image. No pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            raw = im.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SDError(f"cannot read {name}: not an image sd can read ({type(exc).__name__})") from None
    if isinstance(raw, str):
        return {PARAMETERS_KEY: raw} if raw else {}
    if not isinstance(raw, bytes) or len(raw) < 8:
        return {}
    head, body = raw[:8], raw[8:]
    if head.startswith(b"UNICODE"):
        # EXIF says UCS-2 without a byte order; writers differ, so take the reading with fewer NULs in it
        texts = [body.decode(codec, errors="replace") for codec in ("utf-16-be", "utf-16-le")]
        text = min(texts, key=lambda t: t.count("\0") + t.count("\ufffd"))
    else:
        text = body.decode("utf-8" if head.startswith(b"ASCII") else "latin-1", errors="replace")
    text = text.rstrip("\0")
    return {PARAMETERS_KEY: text} if text else {}


def printable(text: str, json_escapes: bool = False) -> str:
    """`text` safe to print on a terminal: control and format characters other than newline, tab and the
    emoji joiners (escape sequences a crafted PNG could carry, bidi overrides) are shown as \\xNN /
    \\uNNNN (with json_escapes, as JSON's \\uNNNN, for text that is JSON) instead of being sent."""
    import unicodedata

    def show(c: str) -> str:
        if c in "\n\t\u200c\u200d" or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn"):
            return c
        if json_escapes or ord(c) >= 0x100:
            return f"\\u{ord(c):04x}" if ord(c) < 0x10000 else json.dumps(c)[1:-1]
        return f"\\x{ord(c):02x}"

    return "".join(map(show, text))


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def model_hash(path: str | os.PathLike, chunk_size: int = 1 << 20, length: int = 10) -> str:
    """AUTOMATIC1111's (new) "Model hash": the first 10 hex digits of the SHA-256 of the whole file (`length`
    12 for the short hashes of LoRA and embedding files).

    Read in chunks; remembered in memory per (real path, size, mtime), so a changed file is hashed anew.
    """
    from ldm.files.reading import file_stamp, open_regular

    try:
        key = file_stamp(path)
        real = key[0]
        if key not in _HASH_CACHE:
            digest = hashlib.sha256()
            with open_regular(real, "checkpoint") as f:
                while chunk := f.read(chunk_size):
                    digest.update(chunk)
            _HASH_CACHE[key] = digest.hexdigest()
    except FileNotFoundError:
        raise SDError(f"checkpoint not found: {path}") from None
    except OSError as exc:
        raise SDError(f"cannot read {path}: {_reason(exc)}") from None
    return _HASH_CACHE[key][:length]
