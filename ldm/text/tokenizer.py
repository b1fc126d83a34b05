"""CLIP's byte-level BPE tokenizer, token-for-token equal to open_clip's SimpleTokenizer.

Importing open_clip costs seconds (it pulls in timm and torchvision) while tokenizing needs only the
BPE merge list it ships, so this module reads that file from open_clip's package directory without
importing the package. The algorithm is OpenAI CLIP's:

1. clean the text: ftfy.fix_text, HTML-unescape twice, collapse whitespace, lowercase;
2. split it with CLIP's regex into words, digits, punctuation runs and English contractions;
3. map each piece's UTF-8 bytes to printable characters (bytes_to_unicode), mark its last character
   as end-of-word ("</w>") and merge adjacent symbols by BPE rank until no ranked pair is left;
4. look the symbols up in the vocabulary: 256 byte characters, the same with "</w>", one entry per
   merge, then <start_of_text> (49406) and <end_of_text> (49407).

A prompt becomes [start, ids..., end] padded with 0 to context_length; a longer one is cut to
context_length with the end token put back in the last position.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import string
from pathlib import Path

import ftfy
import regex
import torch

from ldm.errors import SDError

SOT_TEXT, EOT_TEXT = "<start_of_text>", "<end_of_text>"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses the first 49152 - 256 - 2 merges of the file: with the 512 byte symbols and the two
# special tokens that gives its 49408-entry vocabulary.
_NUM_MERGES = 49152 - 256 - 2
_END_OF_WORD = "</w>"
_CLEAN_MODES = ("lower", "whitespace", "canonicalize")
_BPE_CACHE_LIMIT = 200_000  # distinct pieces remembered per tokenizer; prompts repeat words a lot


def open_clip_dir() -> Path:
    """open_clip's package directory, found without importing (executing) the package."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SDError("the open_clip package is not installed; it provides the text encoder's vocabulary "
                      "and architecture configs: pip install open_clip_torch")
    return Path(list(spec.submodule_search_locations)[0])


def byte_symbols() -> dict[int, str]:
    """One printable character per byte value 0..255 (CLIP's bytes_to_unicode table).

    Bytes that are visible Latin-1 characters stand for themselves; the others (control characters,
    space, soft hyphen...) are given the characters 256, 257, ... in byte order, so that no BPE
    symbol contains whitespace. The dict's order is the vocabulary's: the visible bytes first, then
    the others.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in visible}
    hidden = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + i) for i, byte in enumerate(hidden)})
    return table


def _fix_and_unescape(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _clean(text: str, mode: str) -> str:
    text = _fix_and_unescape(text)
    if mode == "lower":
        return _collapse_whitespace(text).lower()
    if mode == "whitespace":
        return _collapse_whitespace(text)
    # canonicalize: underscores become spaces, ASCII punctuation goes, then lowercase and collapse
    return _collapse_whitespace(text.replace("_", " ").translate(_PUNCTUATION).lower())


class CLIPTokenizer:
    """Texts -> (B, context_length) LongTensor of CLIP BPE ids, as open_clip's SimpleTokenizer."""

    def __init__(self, context_length: int = 77, clean: str = "lower"):
        if not isinstance(context_length, int) or context_length < 1:
            raise SDError(f"tokenizer context length must be a positive integer, not {context_length!r}")
        if clean not in _CLEAN_MODES:
            raise SDError(f"tokenizer clean='{clean}' is not one of {', '.join(_CLEAN_MODES)}")
        self.context_length = context_length
        self.clean = clean
        path = open_clip_dir() / VOCAB_FILE
        try:
            with gzip.open(path) as f:
                lines = f.read().decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as e:  # missing, truncated or not gzip
            raise SDError(f"cannot read the CLIP vocabulary {path} shipped with open_clip ({e}); "
                          "reinstall open_clip_torch") from e
        merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]  # line 0 is a version header
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise SDError(f"the CLIP vocabulary {path} is not the expected BPE merge list; reinstall open_clip_torch")
        table = byte_symbols()
        self._byte_symbols = [table[byte] for byte in range(256)]  # indexed by byte value
        symbols = list(table.values()) + [s + _END_OF_WORD for s in table.values()] \
            + [a + b for a, b in merges] + [SOT_TEXT, EOT_TEXT]
        self.vocab = {symbol: i for i, symbol in enumerate(symbols)}
        self.vocab_size = len(symbols)
        self.sot_token_id, self.eot_token_id = self.vocab[SOT_TEXT], self.vocab[EOT_TEXT]
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        # A special token's text in a prompt stands for the token itself, not for its BPE pieces.
        self._cache: dict[str, tuple[int, ...]] = {SOT_TEXT: (self.sot_token_id,), EOT_TEXT: (self.eot_token_id,)}
        # Special tokens first, then 's 't 're 've 'm 'll 'd, letter runs, single digits, and runs of
        # anything that is neither letter, digit nor whitespace.
        self._pattern = regex.compile(
            rf"{regex.escape(SOT_TEXT)}|{regex.escape(EOT_TEXT)}"
            r"|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
            regex.IGNORECASE)

    def _merge(self, piece: str) -> tuple[int, ...]:
        """BPE ids of one pre-tokenized piece (already mapped to byte symbols)."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        parts = list(piece[:-1]) + [piece[-1] + _END_OF_WORD]
        parts = _bpe(parts, self._ranks) if len(parts) <= _SHORT_WORD else _bpe_long(parts, self._ranks)
        ids = tuple(self.vocab[part] for part in parts)
        if len(self._cache) < _BPE_CACHE_LIMIT and len(piece) <= _SHORT_WORD:  # no megabyte keys
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without start/end tokens and without truncation."""
        ids: list[int] = []
        for piece in self._pattern.findall(_clean(text, self.clean)):
            ids.extend(self._merge("".join(self._byte_symbols[b] for b in piece.encode("utf-8"))))
        return ids

    def __call__(self, texts: list[str] | str, context_length: int | None = None) -> torch.Tensor:
        """(B, context_length) long: start, ids, end, zero padding; too long -> cut, end token last."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > n:
                ids = ids[:n - 1] + [self.eot_token_id]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


_SHORT_WORD = 64  # symbols; longer words take the heap's way (the plain way is quadratic in the length)


def _bpe(parts: list[str], ranks: dict) -> list[str]:
    """CLIP's BPE as written: the best-ranked adjacent pair is merged everywhere it occurs, left to right,
    until no adjacent pair is a merge."""
    unranked = len(ranks)
    while len(parts) > 1:
        best = min(zip(parts, parts[1:]), key=lambda pair: ranks.get(pair, unranked))
        if best not in ranks:
            break
        first, second = best
        merged, i = [], 0
        while i < len(parts):
            if parts[i] == first and i + 1 < len(parts) and parts[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def _bpe_long(parts: list[str], ranks: dict) -> list[str]:
    """The same merges in O(n log n): adjacent pairs in a heap by (rank, position) over a linked list.
    Equal to _bpe because a merge's result can only pair with ranks later than its own (the merge that
    made a symbol was learned before any merge that uses it), so popping by rank, then position, merges
    exactly what _bpe's passes merge, in its left-to-right order."""
    import heapq

    symbols = list(parts)
    after = list(range(1, len(parts))) + [-1]
    before = list(range(-1, len(parts) - 1))
    heap = [(ranks[pair], i, pair) for i, pair in enumerate(zip(parts, parts[1:])) if pair in ranks]
    heapq.heapify(heap)
    while heap:
        _, i, (first, second) = heapq.heappop(heap)
        j = after[i] if symbols[i] is not None else -1
        if j == -1 or symbols[i] != first or symbols[j] != second:
            continue  # this pair no longer stands (one side was merged into something else)
        symbols[i], symbols[j] = first + second, None
        after[i] = after[j]
        if after[j] != -1:
            before[after[j]] = i
        for left, right in ((before[i], i), (i, after[i])):
            if left != -1 and right != -1 and (symbols[left], symbols[right]) in ranks:
                pair = (symbols[left], symbols[right])
                heapq.heappush(heap, (ranks[pair], left, pair))
    return [s for s in symbols if s is not None]


_TOKENIZERS: dict = {}


def get_tokenizer(context_length: int = 77, tokenizer_kwargs: dict | None = None) -> CLIPTokenizer:
    """The tokenizer for a context length and open_clip SimpleTokenizer kwargs, built once per process.

    Accepted kwargs: clean ('lower', the default, 'whitespace' or 'canonicalize'), and open_clip's
    no-op values reduction_mask='' and additional_special_tokens=None/[]. Anything else is refused
    rather than ignored, since it would change the token ids.
    """
    kwargs = dict(tokenizer_kwargs or {})
    clean = kwargs.pop("clean", "lower")
    if kwargs.pop("reduction_mask", "") not in ("", None):
        raise SDError("tokenizer_kwargs reduction_mask (open_clip's random/shuffle/simple/syntax token dropping) "
                      "is not supported: remove it")
    if kwargs.pop("additional_special_tokens", None):
        raise SDError("tokenizer_kwargs additional_special_tokens is not supported: remove it")
    if kwargs:
        raise SDError(f"unsupported tokenizer_kwargs: {', '.join(sorted(map(str, kwargs)))} "
                      f"(supported: clean, reduction_mask='', additional_special_tokens=None)")
    key = (context_length, clean)
    if key not in _TOKENIZERS:  # reading the 49k merges takes a moment: do it once
        _TOKENIZERS[key] = CLIPTokenizer(context_length, clean=clean)
    return _TOKENIZERS[key]
