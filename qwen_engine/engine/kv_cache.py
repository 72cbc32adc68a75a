"""A contiguous KV cache for one sequence, and the attention that reads it.

The model hands every layer's q/k/v to `attend`; the cache stores k/v at the sequence's next positions and
attends over everything stored so far. Keeping attention behind this one method is what lets a paged,
multi-sequence cache replace this one without touching the model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0  # tokens whose k/v are stored and committed

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for the T tokens after the committed ones → output [T, Hq·D]."""
        start, count = self.length, q.shape[0]
        end = start + count
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        self.k[layer, :, start:end] = k.transpose(0, 1)
        self.v[layer, :, start:end] = v.transpose(0, 1)
        keys, values = self.k[layer, :, :end], self.v[layer, :, :end]
        query = q.transpose(0, 1)
        if count == 1 or start == 0:
            out = F.scaled_dot_product_attention(
                query, keys, values, is_causal=count > 1, enable_gqa=True
            )
        else:
            # Chunk after a cached prefix: query i sits at absolute position start + i.
            rows = torch.arange(start, end, device=q.device)[:, None]
            mask = torch.arange(end, device=q.device)[None, :] <= rows
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
        return out.transpose(0, 1).reshape(count, -1)

    def commit(self, count: int) -> None:
        self.length += count

    def truncate(self, length: int) -> None:
        """Forget everything after `length` tokens (keeps the storage)."""
        self.length = min(self.length, length)
