"""The native attention kernels against the PyTorch path they replace, at the demo model's head layout.

    python benchmarks/attention.py [--threads 2] [--heads 14 --kv-heads 2 --head-dim 64] [--repeat 3]

Prefill: one chunk of T queries against S cached positions (the engine prefills long prompts in chunks of 512
tokens when streams run, up to 2048 for a lone prompt), the fused kernel (`prefill_attention`, reading the pool
in place) against `kv_cache.causal_attention` (grouped products with a materialised score matrix, or PyTorch's
SDPA above 64 M scores). Decode: B sequences of C cached positions, one new query each, `decode_attention`
against the PyTorch path (gather the slots, grouped product, masked softmax). ms per call of one layer, minimum
of --repeat calls, and the largest difference between the two. Then decode as a step meets it: one call on each
of --step-layers layers' own pools, so every layer's keys and values come from memory (a step's weights have
pushed them out of the caches), beside one plain read of the same bytes. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import torch

from qwen_engine import kernels
from qwen_engine.engine.kv_cache import causal_attention, decode_attention

PREFILL = [(523, 523), (512, 1024), (512, 2048), (512, 4096), (2048, 2048), (2048, 4096)]
DECODE = [(1, 523), (8, 523), (1, 4096), (8, 4096), (32, 523)]
STEP = [(32, 130), (16, 620), (1, 8000)]  # compare.py's streams (~40-token prompts, 64 tokens), chats, one long


def timed(repeat: int, fn, *args) -> tuple[float, torch.Tensor]:
    """The least ms of `repeat` calls of fn(*args), after a warm-up call, and its result."""
    out = fn(*args)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best * 1e3, out


def paged_slots(n: int, gen: torch.Generator, block: int = 16) -> torch.Tensor:
    """n slots as the engine hands them out: blocks of 16 consecutive slots, the blocks in a shuffled order."""
    blocks = torch.randperm((n + block - 1) // block, generator=gen)
    return (blocks[:, None] * block + torch.arange(block)).flatten()[:n]


def gathered_decode(q, k, v, table, padding) -> torch.Tensor:
    return decode_attention(q, k[table], v[table], padding)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--step-layers", type=int, default=24, help="layers of the step table (0: skip it)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    native = kernels.native()
    if native is None:
        raise SystemExit("the native kernels are not available")
    if not native.prefill_attention_supports(args.head_dim):
        raise SystemExit(f"this build has no fused prefill kernel for head size {args.head_dim}")
    gen = torch.Generator().manual_seed(0)
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    scale = D**-0.5
    print(f"threads {torch.get_num_threads()}, AVX-512 {native.has_avx512()}, heads {H}/{Hkv} of {D}")

    print("| prefill T × S | PyTorch ms | fused ms | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    for T, S in PREFILL:
        q = torch.randn(T, H, D, generator=gen)
        k, v = torch.randn(S, Hkv, D, generator=gen), torch.randn(S, Hkv, D, generator=gen)
        slots = paged_slots(S, gen)
        k, v = torch.cat([k, k[:15]]), torch.cat([v, v[:15]])  # room for the last block's slots
        keys, values = k[slots], v[slots]
        ref, expected = timed(args.repeat, causal_attention, q, keys, values)
        ours, got = timed(args.repeat, native.prefill_attention, q, k, v, slots, scale)
        diff = (got - expected).abs().max()
        print(f"| {T} × {S} | {ref:.1f} | {ours:.1f} | {ref / ours:.2f}× | {diff:.1e} |")

    print("\n| decode B × context | PyTorch ms | native ms | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    for B, C in DECODE:
        pool = (B * C + 15) // 16 * 16
        k, v = torch.randn(pool, Hkv, D, generator=gen), torch.randn(pool, Hkv, D, generator=gen)
        q = torch.randn(B, H, D, generator=gen)
        table = paged_slots(B * C, gen).view(B, C)
        lengths = torch.full((B,), C)
        padding = torch.zeros(B, 1, 1, C, dtype=torch.bool)
        ref, expected = timed(args.repeat, gathered_decode, q, k, v, table, padding)
        ours, got = timed(args.repeat, native.decode_attention, q, k, v, table, lengths, scale)
        diff = (got - expected).abs().max()
        print(f"| {B} × {C} | {ref:.2f} | {ours:.2f} | {ref / ours:.2f}× | {diff:.1e} |")

    if args.step_layers:
        step_table(native, gen, args, scale)


def attend_layers(native, q, ks, vs, table, lengths, scale: float) -> None:
    for k, v in zip(ks, vs, strict=True):
        native.decode_attention(q, k, v, table, lengths, scale)


def read_layers(ks, vs) -> None:
    for k, v in zip(ks, vs, strict=True):
        k.sum()
        v.sum()


def step_table(native, gen: torch.Generator, args: argparse.Namespace, scale: float) -> None:
    """decode_attention once on each of L layers' pools (slots handed out as in the decode table), against one
    plain read of the same keys and values."""
    L, H, Hkv, D = args.step_layers, args.heads, args.kv_heads, args.head_dim
    print(f"\n| decode step, {L} layers: B × context | K+V MB | native ms | GB/s | a plain read of them, ms |")
    print("|---|---|---|---|---|")
    for B, C in STEP:
        pool = (B * C + 15) // 16 * 16
        ks = [torch.randn(pool, Hkv, D, generator=gen) for _ in range(L)]
        vs = [torch.randn(pool, Hkv, D, generator=gen) for _ in range(L)]
        q = torch.randn(B, H, D, generator=gen)
        table = paged_slots(B * C, gen).view(B, C)
        lengths = torch.full((B,), C)
        mb = 2 * L * pool * Hkv * D * 4 / 1e6
        ours, _ = timed(args.repeat, attend_layers, native, q, ks, vs, table, lengths, scale)
        plain, _ = timed(args.repeat, read_layers, ks, vs)
        print(f"| {B} × {C} | {mb:.0f} | {ours:.1f} | {mb / ours:.1f} | {plain:.1f} |")


if __name__ == "__main__":
    main()
