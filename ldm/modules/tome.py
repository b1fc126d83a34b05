"""Token merging for the UNet's self-attention (Bolya & Hoffman 2023, "ToMe for SD"), as AUTOMATIC1111
applies it with tomesd: destinations on a 2 x 2 grid (the top-left token of each cell, no randomness),
the share `ratio` of all tokens merged into their most similar destination (cosine similarity of the
block's input) before self-attention and copied back after it, only in the transformer blocks that work at
the UNet's input resolution (max_downsample 1); cross-attention and the feed-forward see every token.

`token_merging(unet, ratio)` switches it on for the calls made inside the block; the blocks read their
setting from the object it gives them, so nothing of the loaded model is replaced.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

Merge = Callable[[torch.Tensor], torch.Tensor]
SX = SY = 2  # the destination grid
MAX_DOWNSAMPLE = 1  # merge only in blocks at the input's resolution


@dataclass
class TokenMerging:
    """One run's setting: the ratio, and the UNet input's latent size (set by a hook on every call)."""
    ratio: float
    height: int = 0
    width: int = 0

    def merges(self, x: torch.Tensor) -> Optional[tuple[Merge, Merge]]:
        """(merge, unmerge) for a block whose input is x (B, N, C), or None where no token is merged."""
        tokens = self.height * self.width
        if tokens == 0 or x.shape[1] == 0:
            return None
        downsample = int(math.ceil(math.sqrt(tokens // x.shape[1])))
        if downsample > MAX_DOWNSAMPLE:
            return None
        h, w = math.ceil(self.height / downsample), math.ceil(self.width / downsample)
        return bipartite_merge(x, h, w, int(x.shape[1] * self.ratio))


def _destinations(h: int, w: int, device) -> torch.Tensor:
    """(h * w,) bool: the top-left token of every whole SY x SX cell of the h x w grid (row-major)."""
    grid = torch.zeros(h, w, dtype=torch.bool, device=device)
    grid[:(h // SY) * SY:SY, :(w // SX) * SX:SX] = True
    return grid.flatten()


def bipartite_merge(x: torch.Tensor, h: int, w: int, r: int) -> Optional[tuple[Merge, Merge]]:
    """Bipartite soft matching of x's tokens (B, N, C) on an h x w grid: each source token (not a grid
    destination) is scored by its best cosine similarity to a destination; the r best-scored sources are
    averaged into their destinations. Returns (merge, unmerge): merge maps (B, N, c) to (B, N - r, c)
    (unmerged sources, then destinations), unmerge copies each destination's result back to the sources
    merged into it. None when r is 0."""
    batch, n, _ = x.shape
    if r <= 0:
        return None
    is_dst = _destinations(h, w, x.device)
    if is_dst.numel() != n:  # a token count that is not the grid's (never in the UNet): merge nothing
        return None
    dst_pos, src_pos = is_dst.nonzero().squeeze(1), (~is_dst).nonzero().squeeze(1)
    with torch.no_grad():
        unit = x / x.norm(dim=-1, keepdim=True)
        scores = unit[:, src_pos] @ unit[:, dst_pos].transpose(1, 2)  # (B, sources, destinations)
        r = min(r, src_pos.numel())
        best, target = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        moved, kept = order[:, :r], order[:, r:]  # source indices, by how similar they are
        into = target.gather(1, moved)  # the destination each moved source joins
    kept_pos, moved_pos = src_pos[kept], src_pos[moved]  # (B, k) token positions

    def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    def merge(t: torch.Tensor) -> torch.Tensor:
        dst = t[:, dst_pos].scatter_reduce(1, into.unsqueeze(-1).expand(-1, -1, t.shape[-1]), take(t, moved_pos),
                                           reduce="mean")
        return torch.cat([take(t, kept_pos), dst], dim=1)

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        c, unmerged = t.shape[-1], kept_pos.shape[1]
        kept_values, dst = t[:, :unmerged], t[:, unmerged:]
        out = t.new_empty(batch, n, c)
        out[:, dst_pos] = dst
        out.scatter_(1, kept_pos.unsqueeze(-1).expand(-1, -1, c), kept_values)
        out.scatter_(1, moved_pos.unsqueeze(-1).expand(-1, -1, c), take(dst, into))
        return out

    return merge, unmerge


@contextlib.contextmanager
def token_merging(unet: torch.nn.Module, ratio: float):
    """Within the block, the UNet's transformer blocks merge `ratio` of their tokens before self-attention
    (ratio 0: nothing changes). The UNet input's size is taken from each call by a forward pre-hook."""
    if ratio <= 0:
        yield
        return
    from ldm.modules.attention import BasicTransformerBlock

    setting = TokenMerging(ratio)

    def record(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        setting.height, setting.width = int(x.shape[2]), int(x.shape[3])

    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for block in blocks:
            block.tome = setting
        yield setting
    finally:
        handle.remove()
        for block in blocks:
            block.tome = None
