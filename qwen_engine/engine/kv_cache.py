"""KV caches and the attention that reads them.

The model hands every layer's q/k/v to `attend(layer, q, k, v)`; the cache stores k/v and attends over what
each sequence holds. Keeping attention behind this one method is what lets the model code ignore how keys and
values are laid out: one contiguous buffer (`KVCache`, a single sequence, used for `LLM.logits`) or a pool of
fixed-size blocks shared by many packed sequences (`PagedKVCache` + `PagedBatch`, used by the engine).

Either may store keys and values in a narrower type than the model computes in (`kv_cache_dtype`: float16 or
bfloat16 for a float32 model, half the memory and half the bytes a decode step reads). They are rounded as they
are stored and read back as the model's type; attention itself runs in the model's type (except the native
decode kernel's bf16 products on a bfloat16 pool, where the CPU has AVX512-BF16: kernels/paged_attention.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels
from ..config import LinearAttentionConfig, ModelConfig
from .recurrent_state import RecurrentBatch, for_rows, single_sequence_states

# Pool types the native attention kernels read (as float32, for float32 queries).
NATIVE_KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, padding: torch.Tensor | None = None
) -> torch.Tensor:
    """One new token for each of B sequences: q [B, Hq, D]; keys/values [B, S, Hkv, D] → [B, Hq·D].

    The query heads are grouped by the kv head they share, so k and v are read in place rather than repeated
    per query head (what SDPA's GQA path on CPU does). `padding` [B, 1, 1, S] is True at key positions past a
    sequence's length (when sequences of different lengths share the batch).
    """
    batch, q_heads, dim = q.shape
    kv_heads = keys.shape[2]
    query = q.view(batch, kv_heads, q_heads // kv_heads, dim)
    scores = torch.matmul(query, keys.permute(0, 2, 3, 1)).mul_(dim**-0.5)  # [B, Hkv, group, S]
    if padding is not None:
        scores.masked_fill_(padding, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, values.permute(0, 2, 1, 3)).reshape(batch, q_heads * dim)


# Above this many attention scores per chunk (heads × queries × keys), prefill uses SDPA's fused kernel, which
# never materialises them; below, grouped products (faster on CPU, ~2-3× here) whose scores fit in 256 MiB.
MAX_MATERIALISED_SCORES = 64 << 20


def causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q [T, Hq, D] for the last T of S positions; keys/values [S, Hkv, D] → [T, Hq·D]."""
    count, total = q.shape[0], keys.shape[0]
    if count == 1:
        return decode_attention(q, keys[None], values[None])
    q_heads, kv_heads, dim = q.shape[1], keys.shape[1], q.shape[2]
    if q_heads * count * total <= MAX_MATERIALISED_SCORES:
        native = kernels.native() if q.device.type == "cpu" and q.dtype == torch.float32 else None
        if native is not None:
            return _causal_blocks(native, q, keys, values)
        group = q_heads // kv_heads
        # [Hkv, group·T, D]: the query heads that share a kv head, stacked, so k/v are never repeated.
        query = q.permute(1, 0, 2).reshape(kv_heads, group * count, dim)
        scores = torch.bmm(query, keys.permute(1, 2, 0)).mul_(dim**-0.5).view(kv_heads, group, count, total)
        probs = torch.softmax(scores.masked_fill_(_future(count, total, q.device), float("-inf")), dim=-1)
        out = torch.bmm(probs.view(kv_heads, group * count, total), values.transpose(0, 1))
        return out.view(q_heads, count, dim).transpose(0, 1).reshape(count, -1)
    query, keys, values = q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)
    if count == total:
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=True)
    else:
        mask = ~_future(count, total, q.device)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
    return out.transpose(0, 1).reshape(count, -1)


def _causal_blocks(native, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The grouped products in blocks of queries, each multiplying only the keys its queries can see (about half
    the work of one product over all keys); the native kernel scales, masks and normalises the scores in one pass."""
    count, q_heads, dim = q.shape
    total, kv_heads = keys.shape[0], keys.shape[1]
    group = q_heads // kv_heads
    query = q.permute(1, 0, 2).reshape(kv_heads, group, count, dim)
    keys_t = keys.permute(1, 2, 0)[:, None]  # [Hkv, 1, D, S], shared by the group
    values_t = values.transpose(0, 1)[:, None]  # [Hkv, 1, S, D]
    out = q.new_empty(kv_heads, group, count, dim)
    # Four blocks pay when the queries are a good part of the context (a prompt's first chunk); a short chunk
    # after a long context sees nearly every key anyway.
    step = max(64, -(-count // 4)) if 2 * count >= total else count
    for start in range(0, count, step):
        stop = min(count, start + step)
        seen = total - count + stop  # keys visible to the block's last query
        scores = torch.matmul(query[:, :, start:stop], keys_t[..., :seen])
        native.causal_softmax_(scores, dim**-0.5)
        out[:, :, start:stop] = torch.matmul(scores, values_t[:, :, :seen])
    return out.view(q_heads, count, dim).transpose(0, 1).reshape(count, -1)


def _future(count: int, total: int, device: torch.device) -> torch.Tensor:
    """[T, S], True where key s lies after query i (query i sits at absolute position total - count + i)."""
    rows = torch.arange(total - count, total, device=device)[:, None]
    return torch.arange(total, device=device)[None, :] > rows


class KVCache:
    """One sequence, one contiguous buffer per layer."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        linear_attention: LinearAttentionConfig | None = None,
        state_dtype: torch.dtype = torch.float32,
    ):
        shape = (num_layers, capacity, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0  # tokens whose k/v are stored and committed
        # Hybrid models (Qwen3.5): the linear-attention layers' state of this one sequence.
        self.states = single_sequence_states(linear_attention, state_dtype, device) if linear_attention else None

    @classmethod
    def for_model(cls, cfg: ModelConfig, capacity: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", state_dtype: torch.dtype = torch.float32) -> KVCache:
        """A cache for one sequence of `cfg`'s model: keys and values of its softmax-attention layers and, in
        hybrids, the states of its linear-attention layers."""
        return cls(len(cfg.attention_layers), cfg.num_kv_heads, cfg.head_dim, capacity, dtype, device,
                   cfg.linear_attention, state_dtype)

    def recurrent_for(self, count: int) -> RecurrentBatch:
        return for_rows(self.states, count)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        end = self.length + q.shape[0]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        self.k[layer, self.length : end] = k
        self.v[layer, self.length : end] = v
        return causal_attention(q, self.k[layer, :end].to(q.dtype), self.v[layer, :end].to(q.dtype))

    def commit(self, count: int) -> None:
        self.length += count


class PagedKVCache:
    """The engine's KV memory: for each layer, `num_blocks × block_size` slots of [kv_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        # Uninitialised: a slot is always written before it is read, and untouched pages cost no memory
        # (zeros would fault in the whole pool at start-up: ~1.4 s and 1 GiB of RSS for the default size).
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._offsets = torch.arange(block_size)

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot indices of token positions [start, end) of a sequence holding `block_ids`."""
        # Every slot of the blocks in use, then the stretch asked for: a step asks this once per sequence, and
        # the position-by-position form (an arange, a division, a gather) took 1.5x as long.
        used = -(-end // self.block_size)
        if used > len(block_ids):
            raise ValueError(f"positions up to {end} need {used} blocks; the sequence holds {len(block_ids)}")
        blocks = torch.tensor(block_ids[:used], dtype=torch.long)
        return (blocks[:, None] * self.block_size + self._offsets).view(-1)[start:end].to(self.k.device)


@dataclass
class SequenceSlice:
    """One sequence's part of a packed batch: its query rows and the slots of its whole context."""

    query_start: int
    query_end: int
    context_slots: torch.Tensor  # slots of positions [0, context_len), the new tokens included


class PagedBatch:
    """The per-step view the model attends through: where new k/v go and what each sequence reads.

    Sequences that decode one token are attended together: their context slots, padded to the longest, are
    gathered with one index per layer and multiplied in one batched product (built once per step, here).
    Prefill chunks attend one by one, each over its own context only (natively fused, reading the pool in place,
    at the head sizes the kernel has).
    """

    def __init__(self, cache: PagedKVCache, write_slots: torch.Tensor, sequences: list[SequenceSlice],
                 recurrent: RecurrentBatch | None = None):
        self.cache = cache
        self.write_slots = write_slots
        self.recurrent = recurrent  # hybrid models: the linear-attention layers' rows and state slots
        self.sequences = [s for s in sequences if s.query_end - s.query_start != 1]
        decodes = [s for s in sequences if s.query_end - s.query_start == 1]
        self.decode_slots = self.decode_rows = self.decode_padding = self.decode_lengths = None
        self.decodes_only = not self.sequences
        # Attention reads the pool in place with the native kernels when there are some (CPU, float32 queries).
        native_pool = cache.k.device.type == "cpu" and cache.k.dtype in NATIVE_KV_DTYPES
        self.native = kernels.native() if native_pool else None
        if decodes:
            rows = [s.query_start for s in decodes]
            if rows != list(range(len(decodes))) or not self.decodes_only:
                self.decode_rows = torch.tensor(rows, device=write_slots.device)
            lengths = [len(s.context_slots) for s in decodes]
            # Padding repeats a sequence's last slot (written this step): masked out, but it must hold finite
            # values, since 0 · NaN from a never-written slot would still poison the weighted sum.
            longest = max(lengths)
            self.decode_slots = torch.stack([
                torch.cat([s.context_slots, s.context_slots[-1:].expand(longest - n)]) if n < longest
                else s.context_slots
                for s, n in zip(decodes, lengths, strict=True)
            ])
            self.decode_lengths = torch.tensor(lengths)
            if min(lengths) != longest:
                positions = torch.arange(longest, device=write_slots.device)
                limit = torch.tensor(lengths, device=write_slots.device)
                self.decode_padding = (positions[None, :] >= limit[:, None])[:, None, None, :]

    def recurrent_for(self, count: int) -> RecurrentBatch:
        return self.recurrent

    def native_decode_inputs(self) -> tuple[torch.Tensor, ...] | None:
        """(k pool, v pool, write slots, context slots, lengths) for a native decode step (models/decode_step.py):
        a step in which every sequence adds one token, in row order, on the native kernels' device and dtypes.
        Hybrid models add (convolution pool, delta-rule pool, each sequence's state slot)."""
        if self.native is None or not self.decodes_only or self.decode_rows is not None or self.decode_slots is None:
            return None
        inputs = (self.cache.k, self.cache.v, self.write_slots, self.decode_slots, self.decode_lengths)
        if self.recurrent is None:
            return inputs
        states = self.recurrent
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (states.conv, states.delta)):
            return None
        slots = states.decode_slots(len(self.write_slots))
        return None if slots is None else (*inputs, states.conv, states.delta, slots)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_layer, v_layer = self.cache.k[layer], self.cache.v[layer]
        native = self.native if q.dtype == torch.float32 else None
        if native is not None:
            native.write_kv(k_layer, v_layer, k, v, self.write_slots)
        else:  # (rounded to the pool's type as they are stored)
            k_layer.index_copy_(0, self.write_slots, k.to(k_layer.dtype))
            v_layer.index_copy_(0, self.write_slots, v.to(v_layer.dtype))
        if self.decodes_only and self.decode_rows is None:  # the common decode step: no scatter needed
            return self._decode(native, q, k_layer, v_layer)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        if self.decode_slots is not None:
            out[self.decode_rows] = self._decode(native, q[self.decode_rows], k_layer, v_layer)
        fused = native is not None and native.prefill_attention_supports(q.shape[-1])
        for s in self.sequences:
            if fused:  # reads the pool in place, never materialises the scores
                out[s.query_start : s.query_end] = native.prefill_attention(
                    q[s.query_start : s.query_end], k_layer, v_layer, s.context_slots, q.shape[-1] ** -0.5
                )
                continue
            keys = k_layer.index_select(0, s.context_slots).to(q.dtype)
            values = v_layer.index_select(0, s.context_slots).to(q.dtype)
            out[s.query_start : s.query_end] = causal_attention(q[s.query_start : s.query_end], keys, values)
        return out

    def _decode(self, native, q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor) -> torch.Tensor:
        if native is not None:
            return native.decode_attention(
                q, k_layer, v_layer, self.decode_slots, self.decode_lengths, q.shape[-1] ** -0.5
            )
        keys, values = k_layer[self.decode_slots].to(q.dtype), v_layer[self.decode_slots].to(q.dtype)
        return decode_attention(q, keys, values, self.decode_padding)
