"""The native quantised matmul kernels against the reference: gguf's dequantisation, then a float32 matmul.

Dequantisation must be bit-identical; products may differ only in rounding (the order of the sums, a block
scale applied to a partial sum), so they are held to a relative error of 1e-5 of the result's norm (measured:
≤ 1e-6). Every block type with a kernel and every path: batch 1 (in-register GEMV, two weight rows at a time,
with a one-row tail for odd row counts), 2–8 (in-register GEMV, or buffered tiles for K-quants from 4 rows),
9–64 (transposed x in 1–4 groups of 16 rows, weight rows in groups of 6–16 with a tail, K in chunks of 256
with a tail), batch > 64 (scratch + MKL); stacked segments of mixed types with a bias, the token-embedding
lookup, and the pure-PyTorch fallback.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from qwen_engine import kernels
from qwen_engine.models.quant import GEMV_MAX_ROWS, QuantEmbedding, QuantLinear

Q = gguf.GGMLQuantizationType
TYPES = [Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.F16, Q.BF16]  # QuantLinear's types; the kernel also reads F32
RTOL = 1e-5
BATCHES = [1, 2, 3, 4, 5, 8, 9, 17, 33, 49, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 7]


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """[rows, bytes] of valid blocks: quantised by gguf where it can, else random bytes with sane scales."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in (Q.Q4_K, Q.Q6_K):  # gguf cannot quantise K-quants: random quants, small positive f16 scales
        raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
        scales = (rng.random((raw.shape[0], 2)) * 0.01 + 1e-3).astype(np.float16).view(np.uint8)
        if qtype == Q.Q4_K:  # d and dmin lead the block; the 6-bit scales that follow are any bytes
            raw[:, 0:2], raw[:, 2:4] = scales[:, 0:2], scales[:, 2:4]
        else:  # d closes the block; the int8 sub-scales before it are any bytes
            raw[:, 208:210] = scales[:, 0:2]
        return raw.reshape(rows, -1)
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    return np.ascontiguousarray(quantize(values, qtype).view(np.uint8).reshape(rows, -1))


def within_rounding(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """y ≈ x @ w.T up to float32 rounding of the sums: error relative to |x| @ |w|.T, so a row whose sum
    cancels to near zero is not held to its own tiny norm."""
    return bool((y - x @ w.T).norm() <= RTOL * (x.abs() @ w.abs().T).norm())


def reference(raw: np.ndarray, qtype: Q, cols: int) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw, qtype).reshape(raw.shape[0], cols).astype(np.float32))


def close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((y - ref).norm() <= RTOL * ref.norm())


def shape_for(qtype: Q) -> tuple[int, int]:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return 37, 3 * max(block, 32)  # rows not a multiple of anything; K a few blocks


@pytest.mark.parametrize("qtype", [*TYPES, Q.F32], ids=lambda t: t.name)
def test_dequantisation_is_bit_identical(native, qtype):
    rows, cols = shape_for(qtype)
    raw = random_blocks(qtype, rows, cols)
    ours = native.dequantize(torch.from_numpy(raw), int(qtype), cols)
    assert torch.equal(ours, reference(raw, qtype, cols))


def test_q5_0_re_encoded_as_q8_0_keeps_every_value(native):
    """The load-time re-encoding (AVX2 hosts): Q8_0 blocks whose gguf dequantisation equals the Q5_0 blocks'
    bit for bit, for random values and for blocks whose fifth bits are all set or all clear."""
    raw = random_blocks(Q.Q5_0, 41, 32 * 7, seed=3)
    raw[0, 2:6], raw[1, 2:6] = 0xFF, 0x00  # qh of each row's first block
    recoded = native.q5_0_as_q8_0(torch.from_numpy(raw), 32 * 7).numpy()
    assert recoded.shape == (41, 7 * gguf.GGML_QUANT_SIZES[Q.Q8_0][1])
    assert torch.equal(reference(recoded, Q.Q8_0, 32 * 7), reference(raw, Q.Q5_0, 32 * 7))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("batch", BATCHES)
def test_linear_equals_dequantise_then_matmul(native, qtype, batch):
    rows, cols = shape_for(qtype)
    raw = random_blocks(qtype, rows, cols, seed=batch)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
    y = QuantLinear([(torch.from_numpy(raw), qtype)], cols)(x)
    ref = x @ reference(raw, qtype, cols).T
    assert y.shape == (batch, rows)
    assert close(y, ref), ((y - ref).norm() / ref.norm()).item()


# Block types with their own decode paths, and weight row counts around the kernels' row groups (pairs at
# batch 1; 16, 12, 8, 6 rows for 1-4 groups of 16 rows of x), with a K that leaves a partial 256-value chunk.
PATH_TYPES = [Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.F32]


@pytest.mark.parametrize("qtype", PATH_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 2, 7, 16, 25])
@pytest.mark.parametrize("batch", [1, 2, 4, 8, 9, 16, 31, 33, 48, 64])
def test_row_groups_and_tails(native, qtype, rows, batch):
    cols = 1280 if qtype in (Q.Q4_K, Q.Q6_K) else 896
    raw = random_blocks(qtype, rows, cols, seed=rows * 100 + batch)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
    y = native.linear(x, [torch.from_numpy(raw)], [int(qtype)], None, GEMV_MAX_ROWS)
    assert y.shape == (batch, rows)
    assert within_rounding(y, x, reference(raw, qtype, cols))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("cols", [256, 1280, 2816, 4864])
@pytest.mark.parametrize("wide", [False, True], ids=["8-lane", "16-lane"])
def test_long_k_quant_rows_in_chunks_of_k(native, qtype, cols, wide):
    """2-8 rows of x whose K outgrows L1 (the down projection, 4864) take K in chunks (in_chunks in
    quant_matmul.cpp) over groups of 16 weight rows: a partial last chunk, a partial last group, and the bias.
    AVX-512 builds have two kernels for 3-8 rows, 8-lane (AMD, whose 512-bit operations run in halves) and
    16-lane (Intel); both are run here, whichever this CPU gets."""
    if wide and not native.has_avx512():
        pytest.skip("the 16-lane K-quant kernels are in AVX-512 builds only")
    rows = 37
    raw = random_blocks(qtype, rows, cols, seed=cols)
    w = reference(raw, qtype, cols)
    bias = torch.randn(rows)
    was = native.set_wide_vectors(wide)
    try:
        for batch in range(2, 9):
            x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
            y = native.linear(x, [torch.from_numpy(raw)], [int(qtype)], bias, GEMV_MAX_ROWS)
            assert within_rounding(y - bias, x, w), batch
    finally:
        native.set_wide_vectors(was)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0], ids=lambda t: t.name)
@pytest.mark.parametrize("cols", [896, 1056, 2048, 4864])
def test_long_rows_of_32_value_blocks_in_chunks_of_k(native, qtype, cols):
    """From 6 rows of x, Q8_0 and Q5_0 take K in chunks (in_chunks) once it outgrows two chunks (1024 values
    at 8 rows): none at 896, a partial last chunk at 1056, whole ones at 2048 (a Qwen3-1.7B LM head's K)."""
    rows = 37
    raw = random_blocks(qtype, rows, cols, seed=cols)
    w = reference(raw, qtype, cols)
    bias = torch.randn(rows)
    for batch in range(2, 9):
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
        y = native.linear(x, [torch.from_numpy(raw)], [int(qtype)], bias, GEMV_MAX_ROWS)
        assert within_rounding(y - bias, x, w), batch


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_every_batch_size(native, qtype):
    cols = 256
    raw = random_blocks(qtype, 37, cols, seed=7)
    w = reference(raw, qtype, cols)
    bias = torch.randn(37)
    for batch in range(1, GEMV_MAX_ROWS + 8):
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
        y = native.linear(x, [torch.from_numpy(raw)], [int(qtype)], bias, GEMV_MAX_ROWS)
        assert within_rounding(y - bias, x, w), batch


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q4_K], ids=lambda t: t.name)
def test_rows_past_a_group_of_16_take_the_gemv(native, qtype):
    """On AVX-512 the cache-tile GEMM pays for rows of x in groups of 16, so 9 rows would cost what 16 do: rows
    past a group (up to 8; 9-12 rows as 8 + the rest) go to the register GEMVs instead (row_pieces in
    quant_matmul.cpp). Each piece then equals that piece computed alone, bit for bit."""
    if not native.has_avx512():
        pytest.skip("AVX2 builds take rows 8 at a time and are not split")
    cols = 512
    raw = torch.from_numpy(random_blocks(qtype, 40, cols, seed=3))
    bias = torch.randn(40)
    amx_was = native.set_amx_prefill(False)  # (on AMX hosts 32 rows and more would go to the tiles instead)
    try:
        for batch, pieces in [(9, [8, 1]), (12, [8, 4]), (17, [16, 1]), (24, [16, 8]), (40, [32, 8])]:
            x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
            y = native.linear(x, [raw], [int(qtype)], bias, GEMV_MAX_ROWS)
            alone = torch.cat([native.linear(p, [raw], [int(qtype)], bias, GEMV_MAX_ROWS) for p in x.split(pieces)])
            assert torch.equal(y, alone), batch
        x = torch.randn(13, cols)  # 13-15 rows: the GEMVs would cost more than the group of 16
        y = native.linear(x, [raw], [int(qtype)], bias, GEMV_MAX_ROWS)
        pieces = torch.cat([native.linear(p, [raw], [int(qtype)], bias, GEMV_MAX_ROWS) for p in x.split([8, 5])])
        assert not torch.equal(y, pieces)
    finally:
        native.set_amx_prefill(amx_was)


@pytest.mark.parametrize("batch", [1, 2, 4, 8, 9, 33, GEMV_MAX_ROWS + 1])
def test_stacked_segments_of_mixed_types_with_bias(native, batch):
    cols = 256  # a multiple of every block size
    parts = [(random_blocks(t, n, cols, seed=i), t) for i, (t, n) in enumerate([(Q.Q5_0, 19), (Q.Q8_0, 5), (Q.Q6_K, 9)])]
    bias = torch.randn(33)
    layer = QuantLinear([(torch.from_numpy(r), t) for r, t in parts], cols, bias)
    x = torch.randn(batch, cols)
    weight = torch.cat([reference(r, t, cols) for r, t in parts])
    ref = x @ weight.T + bias
    assert close(layer(x), ref)
    # Stacking separate layers is the same as one layer over all segments (how q/k/v are fused).
    single = [QuantLinear([(torch.from_numpy(r), t)], cols, b) for (r, t), b in zip(parts, bias.split([19, 5, 9]), strict=True)]
    assert torch.equal(QuantLinear.stack(single)(x), layer(x))


def test_leading_dimensions_and_empty_input(native):
    raw = random_blocks(Q.Q8_0, 8, 64)
    layer = QuantLinear([(torch.from_numpy(raw), Q.Q8_0)], 64)
    x = torch.randn(2, 3, 64)
    assert close(layer(x), x @ reference(raw, Q.Q8_0, 64).T)
    assert layer(torch.empty(0, 64)).shape == (0, 8)


def test_embedding_dequantises_only_the_rows_asked_for(native):
    raw = random_blocks(Q.Q5_0, 50, 96)
    emb = QuantEmbedding(torch.from_numpy(raw), Q.Q5_0, 96)
    ids = torch.tensor([[3, 0], [49, 3]])
    assert torch.equal(emb(ids), reference(raw, Q.Q5_0, 96)[ids])
    with pytest.raises(RuntimeError, match="out of range"):
        emb(torch.tensor([50]))


def test_fallback_without_native_kernels_gives_the_same_numbers():
    raw = random_blocks(Q.Q4_0, 21, 128)
    layer = QuantLinear([(torch.from_numpy(raw), Q.Q4_0)], 128, torch.randn(21))
    emb = QuantEmbedding(torch.from_numpy(raw), Q.Q4_0, 128)
    x = torch.randn(3, 128)
    saved = kernels.native()
    kernels.set_native(None)
    try:
        assert torch.equal(layer.dequantized(), reference(raw, Q.Q4_0, 128))
        assert close(layer(x), x @ reference(raw, Q.Q4_0, 128).T + layer.bias)
        assert torch.equal(emb(torch.tensor([2, 20])), reference(raw, Q.Q4_0, 128)[[2, 20]])
    finally:
        kernels.set_native(saved)


def test_bad_weights_are_refused():
    raw = torch.from_numpy(random_blocks(Q.Q8_0, 4, 64))
    with pytest.raises(ValueError, match="uint8"):
        QuantLinear([(raw[:, :-1].contiguous(), Q.Q8_0)], 64)  # a byte short per row
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantLinear([(raw, Q.Q8_0)], 48)
    with pytest.raises(ValueError, match="no quantised kernel"):
        QuantLinear([(raw, Q.Q5_1)], 64)
    with pytest.raises(ValueError, match="bias"):
        QuantLinear([(raw, Q.Q8_0)], 64, torch.zeros(5))


# Prefill products on AMX bfloat16 tiles (amx_linear.cpp): x in three bfloat16 pieces against the weights'
# integers, so every product is exact and only the order of the float32 additions differs. Held to 1e-6 of
# |x| @ |w|.T per value (measured ≤ 1e-7), and to no more error than the float32 path it replaces as a whole
# (measured 2-3x less: the sums run over 32 values before scaling). Leaving out x's third piece gives ~100x
# the float32 path's error and fails every case.
AMX_CASES = [
    ((Q.Q5_0,), 896, (37,), 65),                       # tails in tokens and rows
    ((Q.Q5_0, Q.Q8_0), 256, (20, 7), 32),              # the fewest rows that take the tiles
    ((Q.Q4_K,), 256, (40,), 48),                       # the fewest with Q4_K
    ((Q.Q8_0,), 64, (33,), 100),
    ((Q.Q4_0,), 96, (40,), 80),
    ((Q.Q4_K,), 512, (48,), 97),                       # minimums
    ((Q.Q4_K, Q.Q5_0), 1280, (19, 14), 129),           # minimums in some rows of a panel
    ((Q.Q5_0, Q.Q5_0, Q.Q8_0), 896, (64, 16, 16), 300),  # stacked q/k/v; several token chunks
    ((Q.Q5_0,), 1216, (35,), 70),                      # two K chunks
    ((Q.Q4_K,), 4864, (20,), 180),                     # K chunks of whole super-blocks
    ((Q.Q4_K,), 4864, (3100,), 200),                   # decoded panels kept in two groups (32 MiB each)
    ((Q.BF16,), 1280, (37,), 70),                      # bfloat16 weights: no scaling pass
    ((Q.BF16,), 96, (21,), 17),                        # the fewest rows that take the tiles with BF16
    ((Q.BF16, Q.BF16, Q.BF16), 1088, (40, 8, 8), 300),  # two K chunks, several token chunks
    ((Q.BF16, Q.Q8_0), 256, (20, 13), 32),             # with a scaled type: scale 1 in the scaling pass
]


@pytest.mark.parametrize("case", AMX_CASES, ids=lambda c: "+".join(t.name for t in c[0]) + f"-K{c[1]}-M{c[3]}")
def test_amx_prefill_is_exact_to_float32_rounding(native, case):
    if not native.amx_prefill_available():
        pytest.skip("this CPU (or kernel) gives no AMX tiles")
    qtypes, cols, rows, batch = case
    raws = [random_blocks(t, n, cols, seed=i) for i, (t, n) in enumerate(zip(qtypes, rows, strict=True))]
    weight = torch.cat([reference(r, t, cols) for r, t in zip(raws, qtypes, strict=True)]).double()
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
    bias = torch.randn(sum(rows), generator=torch.Generator().manual_seed(1))
    exact = x.double() @ weight.T + bias.double()
    args = ([torch.from_numpy(r) for r in raws], [int(t) for t in qtypes], bias, GEMV_MAX_ROWS)
    error = (native.linear(x, *args).double() - exact).abs()
    assert (error <= 1e-6 * (x.double().abs() @ weight.abs().T)).all()
    was = native.set_amx_prefill(False)
    try:
        mkl_error = (native.linear(x, *args).double() - exact).norm()
    finally:
        native.set_amx_prefill(was)
    assert error.norm() <= 1.5 * mkl_error, (error.norm() / mkl_error).item()


@pytest.mark.parametrize("qtype,first", [(Q.Q5_0, 32), (Q.Q8_0, 32), (Q.Q4_K, 48), (Q.BF16, 17)])
def test_amx_takes_products_from_17_32_or_48_rows(native, qtype, first):
    # Below the threshold the tiles are slower than the cache-tile GEMM (many-stream decode); from it, faster.
    # bfloat16 weights (no scaling pass) from 17 rows.
    # Whether they ran shows in the last bits: the two paths add in different orders.
    if not native.amx_prefill_available():
        pytest.skip("this CPU (or kernel) gives no AMX tiles")
    raw = random_blocks(qtype, 64, 512, seed=3)
    for batch, tiles in ((first - 1, False), (first, True)):
        x = torch.randn(batch, 512, generator=torch.Generator().manual_seed(batch))
        args = ([torch.from_numpy(raw)], [int(qtype)], None, GEMV_MAX_ROWS)
        on = native.linear(x, *args)
        was = native.set_amx_prefill(False)
        try:
            off = native.linear(x, *args)
        finally:
            native.set_amx_prefill(was)
        assert torch.equal(on, off) != tiles, (batch, qtype.name)


GCC_VERBOSE = """Using built-in specs.
 /usr/lib/gcc/x86_64-linux-gnu/12/cc1plus -E -quiet -v -imultiarch x86_64-linux-gnu -D_GNU_SOURCE - -o /dev/null \
-march=sapphirerapids -mavx512f -mno-avx512er -mamx-tile --param l1-cache-size=48 -mtune=sapphirerapids -dumpbase -
#include "..." search starts here:"""
CLANG_VERBOSE = """clang version 17.0.6
 "/usr/lib/llvm-17/bin/clang" -cc1 -triple x86_64-pc-linux-gnu -E -target-cpu znver4 -target-feature +avx512f \
-target-feature -amx-tile -o /dev/null -x c++ -"""


def test_kernel_cache_is_keyed_by_the_cpus_instruction_sets():
    # A cache shared between machines must not hand a CPU without AMX or AVX-512 a build that uses them.
    assert kernels.target_of(GCC_VERBOSE) == ("-march=sapphirerapids -mavx512f -mno-avx512er -mamx-tile "
                                              "l1-cache-size=48 -mtune=sapphirerapids")
    assert kernels.target_of(CLANG_VERBOSE) == "znver4 +avx512f -amx-tile"
    flags = kernels.BASE_FLAGS + ["-march=native"]
    amx_host = kernels.target_of(GCC_VERBOSE)
    assert kernels.cache_key(flags, amx_host) == kernels.cache_key(flags, amx_host)
    assert kernels.cache_key(flags, amx_host) != kernels.cache_key(flags, amx_host.replace("-mamx-tile", "-mno-amx-tile"))
    # And on this machine the probe reports what the CPU has (when its compiler is gcc and takes -march=native).
    native_flags, target = kernels._native_flags()
    cpu_flags = next((line.split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    if native_flags and "-march=" in target and "avx512f" in cpu_flags:
        assert "-mavx512f" in target.split()


def test_a_build_killed_midway_does_not_block_the_next(tmp_path):
    # A build killed by SIGKILL or a restart leaves torch's lock file behind; waiting on it hung a CI run.
    import signal
    import subprocess
    import sys
    import time

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from qwen_engine import kernels\n"
        f"with kernels.build_lock(Path({str(tmp_path)!r})):\n"
        f"    (Path({str(tmp_path)!r}) / 'lock').touch(); print('building', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "building"
    waiter = subprocess.Popen([sys.executable, "-c", (
        "from pathlib import Path; from qwen_engine import kernels\n"
        f"with kernels.build_lock(Path({str(tmp_path)!r})): print('got it', flush=True)")],
        stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert waiter.poll() is None  # a live build is waited for
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    out, _ = waiter.communicate(timeout=60)
    assert out.strip() == "got it"
    assert not (tmp_path / "lock").exists()  # the killed build's file, removed before torch would wait on it
