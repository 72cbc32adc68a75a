"""Decode attention over the paged KV cache: the native kernel (reading slots in place) against the PyTorch
path (gather, grouped product, masked softmax), for sequences of different lengths sharing one batch."""

from __future__ import annotations

import pytest
import torch

from qwen_engine import kernels
from qwen_engine.engine.kv_cache import (
    PagedBatch,
    PagedKVCache,
    SequenceSlice,
    causal_attention,
    decode_attention,
)


def random_case(lengths: list[int], q_heads: int = 14, kv_heads: int = 2, dim: int = 64, slots: int = 400):
    gen = torch.Generator().manual_seed(sum(lengths))
    k = torch.randn(slots, kv_heads, dim, generator=gen)
    v = torch.randn(slots, kv_heads, dim, generator=gen)
    q = torch.randn(len(lengths), q_heads, dim, generator=gen)
    # Each sequence reads scattered slots; rows are padded with the sequence's last slot, as PagedBatch does.
    rows = [torch.randperm(slots, generator=gen)[:n] for n in lengths]
    longest = max(lengths)
    table = torch.stack([torch.cat([r, r[-1:].expand(longest - len(r))]) for r in rows])
    padding = (torch.arange(longest)[None, :] >= torch.tensor(lengths)[:, None])[:, None, None, :]
    return q, k, v, table, padding


@pytest.mark.parametrize("dim", [64, 128, 32])
@pytest.mark.parametrize("lengths", [[1], [37], [5, 130, 64], [16] * 9])
def test_native_decode_attention_equals_pytorch(native, lengths, dim):
    q, k, v, table, padding = random_case(lengths, dim=dim)
    ours = native.decode_attention(q, k, v, table, torch.tensor(lengths), dim**-0.5)
    ref = decode_attention(q, k[table], v[table], padding)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (ours - ref).abs().max()


@pytest.mark.parametrize(("q_heads", "kv_heads", "dim"), [(16, 8, 128), (8, 1, 256), (12, 2, 16), (3, 3, 64)])
def test_every_group_size_and_head_size(native, q_heads, kv_heads, dim):
    # The heads of a group are computed together, in passes of up to 4 (head size ≤ 64), 2 (128) or 1 (256).
    lengths = [1, 6, 203]
    q, k, v, table, padding = random_case(lengths, q_heads=q_heads, kv_heads=kv_heads, dim=dim, slots=512)
    ours = native.decode_attention(q, k, v, table, torch.tensor(lengths), dim**-0.5)
    ref = decode_attention(q, k[table], v[table], padding)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (ours - ref).abs().max()


def test_long_context(native):
    # Longer than a head group's keys and values fit in L2; the softmax max runs over many vectors and a tail.
    q, k, v, table, padding = random_case([3001, 2050], slots=6000)
    ours = native.decode_attention(q, k, v, table, torch.tensor([3001, 2050]), 0.125)
    ref = decode_attention(q, k[table], v[table], padding)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (ours - ref).abs().max()


@pytest.mark.parametrize("length", [63, 64, 65, 127, 128, 129, 511, 512, 513, 1025, 2047])
def test_lengths_around_the_chunk_boundaries(native, length):
    # A sequence's keys are cut into equal chunks (an even number from 128 keys; none under 64 keys) whose
    # softmax parts are merged: every length must give the reference's result, with no empty or missing chunk.
    q, k, v, table, padding = random_case([length], slots=2100)
    ours = native.decode_attention(q, k, v, table, torch.tensor([length]), 0.125)
    ref = decode_attention(q, k[table], v[table], padding)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (ours - ref).abs().max()


def test_a_sequence_gets_the_same_result_in_any_batch(native):
    # The chunks depend only on a sequence's own length, so its output is bit-identical alone or beside others.
    q, k, v, table, _ = random_case([700, 5, 1300, 64], slots=2100)
    lengths = torch.tensor([700, 5, 1300, 64])
    together = native.decode_attention(q, k, v, table, lengths, 0.125)
    for i in range(4):
        alone = native.decode_attention(q[i : i + 1], k, v, table[i : i + 1, : lengths[i]], lengths[i : i + 1], 0.125)
        assert torch.equal(alone, together[i : i + 1])


def test_odd_head_size_uses_the_scalar_tail(native):
    q, k, v, table, padding = random_case([7, 3], q_heads=4, kv_heads=1, dim=20)
    ours = native.decode_attention(q, k, v, table, torch.tensor([7, 3]), 20**-0.5)
    assert torch.allclose(ours, decode_attention(q, k[table], v[table], padding), rtol=1e-5, atol=1e-6)


def test_bad_slots_are_refused(native):
    q, k, v, table, _ = random_case([4])
    with pytest.raises(RuntimeError, match="out of range"):
        native.decode_attention(q, k, v, table + 1000, torch.tensor([4]), 0.125)
    with pytest.raises(RuntimeError, match="length"):
        native.decode_attention(q, k, v, table, torch.tensor([5]), 0.125)


def attend_with_and_without_native(cache, writes, seqs, q, k, v) -> list[torch.Tensor]:
    """Layer 0's attention for one packed step, with the native kernels and with the PyTorch path."""
    outs = []
    for native in (kernels.native(), None):
        batch = PagedBatch(cache, writes, seqs)
        batch.native = native
        outs.append(batch.attend(0, q, k, v))
    return outs


def test_paged_batch_same_with_and_without_native_kernel():
    cache = PagedKVCache(num_layers=1, num_kv_heads=2, head_dim=16, num_blocks=8, block_size=4)
    gen = torch.Generator().manual_seed(0)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    # Two decoding sequences (contexts of 6 and 3 tokens) and a 2-token prefill chunk, packed in one step.
    seqs = [SequenceSlice(0, 1, cache.slots([0, 1], 0, 6)), SequenceSlice(1, 3, cache.slots([2], 0, 4)),
            SequenceSlice(3, 4, cache.slots([3], 0, 3))]
    writes = torch.cat([cache.slots([0, 1], 5, 6), cache.slots([2], 2, 4), cache.slots([3], 2, 3)])
    q, k, v = (torch.randn(4, h, 16, generator=gen) for h in (4, 2, 2))
    outs = attend_with_and_without_native(cache, writes, seqs, q, k, v)
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_kernels", [True, False])
@pytest.mark.parametrize(("count", "total"), [(5, 5), (7, 20), (3, 100), (130, 130), (300, 310), (100, 523)])
def test_grouped_prefill_attention_equals_sdpa(monkeypatch, count, total, with_kernels):
    """Prefill attention in query blocks with the native causal softmax (or PyTorch's masked softmax) = SDPA."""
    from qwen_engine.engine import kv_cache

    if not with_kernels:
        monkeypatch.setattr(kv_cache.kernels, "native", lambda: None)

    gen = torch.Generator().manual_seed(count)
    q, k, v = torch.randn(count, 14, 64, generator=gen), torch.randn(total, 2, 64, generator=gen), torch.randn(
        total, 2, 64, generator=gen)
    grouped = kv_cache.causal_attention(q, k, v)
    monkeypatch.setattr(kv_cache, "MAX_MATERIALISED_SCORES", 0)  # force SDPA's fused kernel
    assert torch.allclose(grouped, kv_cache.causal_attention(q, k, v), rtol=1e-5, atol=1e-5)


def reference_prefill(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Float64 causal attention of the last T of S positions (queries see keys up to their own position)."""
    count, total = q.shape[0], keys.shape[0]
    mask = torch.arange(total)[None, :] <= torch.arange(total - count, total)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(0, 1), keys.double().transpose(0, 1), values.double().transpose(0, 1),
        attn_mask=mask, enable_gqa=True)
    return out.transpose(0, 1).reshape(count, -1)


@pytest.mark.parametrize(("q_heads", "kv_heads", "dim"), [(14, 2, 64), (16, 8, 128), (4, 4, 32), (7, 1, 64)])
@pytest.mark.parametrize(("count", "total"), [(1, 1), (5, 5), (7, 20), (63, 64), (64, 65), (130, 130), (3, 100),
                                              (300, 310), (100, 523)])
def test_fused_prefill_attention_equals_float64(native, q_heads, kv_heads, dim, count, total):
    """The fused kernel (64-key blocks, running softmax) against float64 attention, with q strided as inside
    the fused qkv output and the sequence's keys and values scattered over the pool."""
    if not native.prefill_attention_supports(dim):
        pytest.skip(f"this build has no fused prefill kernel for head size {dim} (the PyTorch path serves it)")
    gen = torch.Generator().manual_seed(count * 1000 + total)
    pool_k = torch.randn(total + 40, kv_heads, dim, generator=gen)
    pool_v = torch.randn(total + 40, kv_heads, dim, generator=gen)
    slots = torch.randperm(total + 40, generator=gen)[:total]
    qkv = torch.randn(count, q_heads + 2 * kv_heads, dim, generator=gen)
    q = qkv[:, :q_heads]
    out = native.prefill_attention(q, pool_k, pool_v, slots, dim**-0.5)
    ref = reference_prefill(q, pool_k[slots], pool_v[slots])
    assert out.shape == (count, q_heads * dim)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=2e-6), (out.double() - ref).abs().max().item()


def test_fused_prefill_attention_refuses_bad_input(native):
    k = v = torch.randn(10, 2, 64)
    q = torch.randn(4, 14, 64)
    with pytest.raises(RuntimeError, match="out of range"):
        native.prefill_attention(q, k, v, torch.tensor([0, 1, 2, 3, 10]), 0.125)
    with pytest.raises(RuntimeError, match="queries"):
        native.prefill_attention(q, k, v, torch.tensor([0, 1, 2]), 0.125)
    assert not native.prefill_attention_supports(80)


def test_paged_batch_prefill_same_with_and_without_native_kernel():
    """A prefill chunk after a cached prefix and a decoding sequence, packed in one step, at a head size the
    fused kernel takes: the same output as the PyTorch path."""
    cache = PagedKVCache(num_layers=1, num_kv_heads=2, head_dim=64, num_blocks=40, block_size=16)
    gen = torch.Generator().manual_seed(1)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    seqs = [SequenceSlice(0, 1, cache.slots([0, 1], 0, 20)), SequenceSlice(1, 101, cache.slots([9, 3, 7, 2, 30, 31, 5, 6, 8, 11], 0, 150))]
    writes = torch.cat([cache.slots([0, 1], 19, 20), cache.slots([9, 3, 7, 2, 30, 31, 5, 6, 8, 11], 50, 150)])
    q, k, v = (torch.randn(101, h, 64, generator=gen) for h in (14, 2, 2))
    outs = attend_with_and_without_native(cache, writes, seqs, q, k, v)
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=2e-6)


HALF_POOLS = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF_POOLS)
@pytest.mark.parametrize(("lengths", "dim"), [([1], 64), ([5, 130, 64], 64), ([700, 3], 128), ([9, 40], 32),
                                              ([7, 3], 20)])
def test_half_pools_are_read_as_float32(native, dtype, lengths, dim):
    # A float16/bfloat16 pool (kv_cache_dtype): the same result as the PyTorch path on the pool's values in float32
    # (a bfloat16 pool's decode products are bf16 where the CPU has them: the next test).
    q, k, v, table, padding = random_case(lengths, dim=dim, slots=800)
    k, v = k.to(dtype), v.to(dtype)
    if not bf16_products(native, dtype, dim):
        ours = native.decode_attention(q, k, v, table, torch.tensor(lengths), dim**-0.5)
        ref = decode_attention(q, k.float()[table], v.float()[table], padding)
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (ours - ref).abs().max()
    if native.prefill_attention_supports(dim):
        rows = table[0, : lengths[0]]
        count = min(lengths[0], 50)
        queries = torch.randn(count, q.shape[1], dim, generator=torch.Generator().manual_seed(5))
        ours = native.prefill_attention(queries, k, v, rows, dim**-0.5)
        ref = causal_attention(queries, k.float()[rows], v.float()[rows])
        assert torch.allclose(ours, ref, rtol=1e-5, atol=2e-6), (ours - ref).abs().max()


def bf16_products(native, dtype: torch.dtype, dim: int) -> bool:
    """Whether decode_attention multiplies this pool's rows as bf16 (kernels/paged_attention.cpp)."""
    return dtype == torch.bfloat16 and dim in (32, 64, 128) and native.bf16_decode_products()


def exact_decode(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """float64 attention of already scaled queries q [B, Hq, D] over rows [B, S, Hkv, D] → [B, Hq · D]."""
    out = []
    for b, n in enumerate(lengths):
        group = q.shape[1] // k_rows.shape[2]
        keys = k_rows[b, :n].double().repeat_interleave(group, dim=1)
        values = v_rows[b, :n].double().repeat_interleave(group, dim=1)
        weights = torch.einsum("hd,nhd->hn", q[b].double(), keys).softmax(-1)
        out.append(torch.einsum("hn,nhd->hd", weights, values).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("lengths", [[1], [2, 3], [5, 130, 64], [700, 9], [2047]])
def test_bfloat16_pool_products_within_bf16_rounding(native, dim, lengths):
    """A bfloat16 pool's decode products in bf16 (AVX512-BF16), as PyTorch's bf16 attention computes: against
    float64 attention of the same rounded query (scale · q in bf16) and pool, within the rounding of the softmax
    weights to bf16 (2 · 2^-9 of the largest value); and not the float32 products' result, so the path ran."""
    q, k, v, table, padding = random_case(lengths, dim=dim, slots=2100)
    k, v = k.bfloat16(), v.bfloat16()
    ours = native.decode_attention(q, k, v, table, torch.tensor(lengths), dim**-0.5)
    as_float = decode_attention(q, k.float()[table], v.float()[table], padding)
    if not bf16_products(native, torch.bfloat16, dim):
        assert torch.allclose(ours, as_float, rtol=1e-5, atol=1e-6)
        return
    rounded_q = (q * dim**-0.5).bfloat16()
    want = exact_decode(rounded_q, k[table], v[table], lengths)
    bound = 2 * 2.0**-9 * v.float().abs().max().item()
    assert (ours.double() - want).abs().max().item() <= bound
    if max(lengths) > 1:
        assert (ours - as_float).abs().max().item() > 1e-4
    else:  # one key: its weight is 1, exactly, and the output its value row
        assert torch.equal(ours.view(q.shape), v[table[:, 0]].float().repeat_interleave(q.shape[1] // v.shape[1], 1))


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_POOLS])
def test_write_kv_rounds_as_tensor_to(native, dtype):
    gen = torch.Generator().manual_seed(6)
    k, v = torch.zeros(50, 2, 64, dtype=dtype), torch.zeros(50, 2, 64, dtype=dtype)
    # Values at float16's edges too: subnormal, ties, beyond its largest (to infinity, as Tensor.to does).
    new_k = torch.randn(4, 2, 64, generator=gen) * torch.tensor([1.0, 1e-6, 3e4, 1e5])[:, None, None]
    new_v = torch.randn(4, 2, 64, generator=gen)
    new_v[0, 0, :4] = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8])  # ties of both halves
    slots = torch.tensor([3, 49, 0, 17])
    native.write_kv(k, v, new_k, new_v, slots)
    assert torch.equal(k[slots], new_k.to(dtype)) and torch.equal(v[slots], new_v.to(dtype))
    assert torch.count_nonzero(k) == torch.count_nonzero(new_k.to(dtype))  # nothing written elsewhere


@pytest.mark.parametrize("dtype", HALF_POOLS)
def test_paged_batch_half_pool_same_with_and_without_native_kernel(dtype):
    """A decode and a prefill chunk after a cached prefix on a float16/bfloat16 pool: the native kernels and the
    PyTorch path (which rounds as it stores and reads back as float32) give the same output."""
    cache = PagedKVCache(num_layers=1, num_kv_heads=2, head_dim=64, num_blocks=40, block_size=16, dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    blocks = [9, 3, 7, 2, 30, 31, 5, 6, 8, 11]
    seqs = [SequenceSlice(0, 1, cache.slots([0, 1], 0, 20)), SequenceSlice(1, 101, cache.slots(blocks, 0, 150))]
    writes = torch.cat([cache.slots([0, 1], 19, 20), cache.slots(blocks, 50, 150)])
    q, k, v = (torch.randn(101, h, 64, generator=gen) for h in (14, 2, 2))
    outs = attend_with_and_without_native(cache, writes, seqs, q, k, v)
    assert torch.allclose(outs[0][1:], outs[1][1:], rtol=1e-5, atol=2e-6)  # the prefill chunk
    # the decoding sequence (bf16 products on a bfloat16 pool where the CPU has them: within their rounding)
    tolerance = 2 * 2.0**-9 * cache.v.float().abs().max().item() if bf16_products(kernels.native(), dtype, 64) else 2e-6
    assert torch.allclose(outs[0][:1], outs[1][:1], rtol=1e-5, atol=tolerance)
    assert torch.equal(cache.k[0, writes], k.to(dtype))


@pytest.mark.parametrize("block_size", [1, 16, 5])
def test_slots_of_every_stretch_of_positions(block_size):
    cache = PagedKVCache(1, 1, 8, num_blocks=40, block_size=block_size)
    blocks = torch.randperm(40, generator=torch.Generator().manual_seed(block_size))[: -(-37 // block_size) + 1].tolist()
    for start, end in [(0, 1), (0, 37), (36, 37), (5, 23), (block_size, 2 * block_size), (7, 7)]:
        expected = [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]
        assert cache.slots(blocks, start, end).tolist() == expected
    with pytest.raises(ValueError, match="need"):
        cache.slots(blocks[:1], 0, block_size + 1)
