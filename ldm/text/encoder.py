"""Prompt embeddings for a run: each distinct prompt encoded once, as AUTOMATIC1111 reads it."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch


class PromptEncoder:
    """Encodes each distinct prompt once (prompt files often repeat prompts), as AUTOMATIC1111 reads them.

    Plain prompts (no emphasis syntax, no embedding names, at most 75 tokens) are encoded together in one
    batch through the model's own text path, as before the prompt syntax existed, so their features are
    bit-identical to it; the others go through ldm.text.chunks one by one. The cache keeps
    the `capacity` most recently used prompts (a (77, 1024) float32 chunk is about 0.3 MB).
    """

    def __init__(self, model, capacity: int = 256, emphasis: str = "original", embeddings=None,
                 max_chunks: Optional[int] = None, between: Optional[Callable[[], None]] = None,
                 limit: str = "--max-chunks"):
        self.model, self.capacity, self.emphasis = model, capacity, emphasis
        # the chunk bound and its name for the front end; called before each chunk
        self.max_chunks, self.limit, self.between = max_chunks, limit, between
        self.embeddings = embeddings or {}
        self.state: tuple = ()  # the merged LoRAs: the text tower's weights, so part of every cache key
        self.cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def _plain(self, prompt: str) -> bool:
        from ldm.text.chunks import CHUNK
        from ldm.text.syntax import parse_weights

        if self.emphasis == "off":
            return True
        if parse_weights(prompt) != [(prompt, 1.0)] or any(name in prompt for name in self.embeddings):
            return False
        return len(self.model.cond_stage_model.tokenizer().encode(prompt)) <= CHUNK

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Features (77 * chunks, width) of each prompt."""
        from ldm.text.chunks import encode_prompt
        from ldm.text.syntax import take_loras

        texts = [take_loras(p)[0] if "<lora:" in p else p for p in prompts]  # the tags are not words
        keys = [(self.state, t) for t in texts]
        todo = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in self.cache))
        plain = [t for t in todo if self._plain(t)]
        if plain:
            for text, emb in zip(plain, self.model.get_learned_conditioning(plain)):
                self.cache[(self.state, text)] = emb
        for text in todo:
            if (self.state, text) not in self.cache:
                self.cache[(self.state, text)] = encode_prompt(self.model.cond_stage_model, text, self.emphasis,
                                                               self.embeddings, self.max_chunks, self.between,
                                                               self.limit)
        out = [self.cache[k] for k in keys]
        for k in dict.fromkeys(keys):
            self.cache.move_to_end(k)
        while len(self.cache) > max(self.capacity, len(set(keys))):
            self.cache.popitem(last=False)
        return out

    def stack(self, features: list[torch.Tensor], length: int) -> torch.Tensor:
        """(B, length, width): each prompt's features, shorter ones padded with the empty prompt's chunk
        (so a prompt and a negative prompt of different chunk counts batch, as A1111 pads them)."""
        if all(f.shape[0] == length for f in features):
            return torch.stack(features)
        empty = self.encode([""])[0]  # (77, width)
        return torch.stack([torch.cat([f, *[empty] * ((length - f.shape[0]) // empty.shape[0])]) for f in features])

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        features = self.encode(prompts)
        return self.stack(features, max(f.shape[0] for f in features))
