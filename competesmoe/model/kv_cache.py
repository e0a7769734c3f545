"""The KV cache of incremental decoding: what Transformer.forward(tokens, cache=...) keeps between calls.

Each attention layer appends the new positions' keys (after RoPE) and values to its LayerCache and
attends over all cached positions; the RoPE offset of the new positions is the cache's length.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class LayerCache:
    """One attention layer's keys (after RoPE) and values of the positions seen so far, in buffers
    of a fixed capacity so that appending a token copies only that token."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.k: Optional[Tensor] = None  # [B, H, capacity, head_dim]
        self.v: Optional[Tensor] = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new positions' k, v [B, H, n, head_dim]; return all positions' k, v."""
        if self.k is None:
            shape = (*k.shape[:2], self.capacity, k.shape[-1])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, {end} needed")
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """The keys and values of every attention layer, for incremental decoding of a batch.

    `pad` [B, P] marks left padding of prompts of different lengths: no real position attends to
    it (a padding position attends to itself only, so that no attention row is empty). RoPE only
    sees relative positions, so a left-padded prompt gives the same logits as the prompt alone."""

    def __init__(self, n_layers: int, capacity: int, pad: Optional[Tensor] = None):
        self.layers = [LayerCache(capacity) for _ in range(n_layers)]
        self.pad = pad

    @property
    def length(self) -> int:
        return self.layers[0].length

    def mask(self, n: int, device: torch.device) -> Optional[Tensor]:
        """Which keys each of the next n queries may see, [B or 1, 1, n, length + n] (True = may),
        or None when plain causal attention is right (no padding, and nothing cached or one query)."""
        start, total = self.length, self.length + n
        if self.pad is None and (start == 0 or n == 1):
            return None
        query = torch.arange(start, total, device=device)[:, None]
        key = torch.arange(total, device=device)[None, :]
        allowed = key <= query
        if self.pad is not None:
            width = min(total, self.pad.shape[1])
            pad = torch.zeros(self.pad.shape[0], total, dtype=torch.bool, device=device)
            pad[:, :width] = self.pad[:, :width]
            allowed = allowed & (~pad[:, None, :] | (key == query))
        return allowed.view(-1, 1, n, total)
