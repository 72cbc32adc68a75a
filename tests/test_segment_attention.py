"""The vision towers' attention kernel (kernels/segment_attention.cpp) against float64 attention over the same
rounded inputs, and the dispatch in models/vision.segment_attention.

Error bound: q·k are products of bf16 values, exact in float32, summed in float32 (~1e-7 relative), and the
softmax weights p are rounded to bf16 before they multiply V, each by at most 2^-9 relative. So every output
moves by at most 2^-9 · Σ p |v| / Σ p ≤ 2^-9 · max |v| of its segment; the tests allow twice that. With int8
scores the float64 reference takes q and k as the kernel rounds them (each row, less its segment's mean key for
k, to int8 with max|x|/127 as scale, half to even), and the same bound holds. A kernel that mixed up keys, heads,
pairs of dims or segments misses it by orders of magnitude (an output is an average of values of size ~1).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwen_engine import kernels
from qwen_engine.models.vision import segment_attention

NATIVE = kernels.native()
pytestmark = pytest.mark.skipif(
    NATIVE is None or not NATIVE.segment_attention_supports(64, True),
    reason="this build has no AVX512-BF16 and VNNI kernels",
)

SEGMENTS = {
    "one image": [0, 300],
    "ragged": [0, 1, 64, 65, 129, 329],  # 1, 63, 1, 64 and 200 keys: partial, exact and multi-block
    "empty segments": [0, 0, 70, 70, 77],
}


def _qkv(n: int, heads: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of one fused [N, 3, heads, dim] bf16 tensor, strided as the towers' qkv output is."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(n, 3, heads, dim, generator=g) * 1.5).bfloat16()
    q, k, v = qkv.unbind(1)
    return q, k, v


def _float64_attention(q, k, v, cu: list[int]) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float64)
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        if b > a:
            qs, ks, vs = (t[a:b].double().transpose(0, 1) for t in (q, k, v))
            weights = (qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1)
            out[a:b] = (weights @ vs).transpose(0, 1)
    return out


def _as_int8_rounds(x: torch.Tensor, minus: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of x (less `minus`) rounded as the kernel rounds them to int8, and scaled back, in float64."""
    x = x.float() - (minus if minus is not None else 0.0)
    amax = x.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(x * inv).double() * (amax / 127.0).double())


def _int8_scores_inputs(q, k, cu: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    qr, kr = _as_int8_rounds(q), torch.zeros(k.shape, dtype=torch.float64)
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        if b > a:
            mean = k[a:b].double().mean(0).float()  # [heads, d]: per head, over the segment's keys
            kr[a:b] = _as_int8_rounds(k[a:b], mean)
    return qr, kr


def _bound(v: torch.Tensor, cu: list[int]) -> torch.Tensor:
    """2 · 2^-9 · max|v| of each row's segment and head, per row [N, heads, 1]."""
    bound = torch.zeros(v.shape[0], v.shape[1], 1, dtype=torch.float64)
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        if b > a:
            bound[a:b] = 2 * 2.0**-9 * v[a:b].double().abs().amax(dim=(0, 2), keepdim=True)
    return bound


@pytest.mark.parametrize("dim", [16, 64, 72, 80, 128, 6])
@pytest.mark.parametrize("segments", list(SEGMENTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16_products_match_float64_within_bf16_rounding(dim: int, segments: str, dtype: torch.dtype) -> None:
    cu = SEGMENTS[segments]
    q, k, v = (t.to(dtype) for t in _qkv(cu[-1], 3, dim))
    if dtype == torch.float32:  # spread below bf16's resolution: the kernel rounds them first
        q, k, v = (t + 1e-3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(5)) for t in (q, k, v))
    got = NATIVE.segment_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), dim**-0.5, False, True)
    want = _float64_attention(*(t.bfloat16() for t in (q, k, v)), cu)
    assert got.dtype == torch.float32 and got.shape == q.shape
    excess = (got.double() - want).abs() - _bound(v.bfloat16(), cu)
    assert excess.max().item() <= 0, f"worst excess over the bound {excess.max().item():.2e}"


@pytest.mark.parametrize("dim", [16, 64, 80, 128, 4])
@pytest.mark.parametrize("segments", list(SEGMENTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_scores_match_float64_of_the_rounded_inputs(dim: int, segments: str, dtype: torch.dtype) -> None:
    cu = SEGMENTS[segments]
    q, k, v = (t.to(dtype) for t in _qkv(cu[-1], 3, dim, seed=2))
    k = k + torch.randn(3, dim).to(dtype) * 3  # a mean key per head, which the kernel takes off
    got = NATIVE.segment_attention(q, k, v, torch.tensor(cu), dim**-0.5, True, True)
    qr, kr = _int8_scores_inputs(q, k, cu)
    want = _float64_attention(qr, kr, v.bfloat16(), cu)
    excess = (got.double() - want).abs() - _bound(v.bfloat16(), cu)
    assert excess.max().item() <= 0, f"worst excess over the bound {excess.max().item():.2e}"
    exact = _float64_attention(q, k, v, cu)  # and the rounding is an int8 one: near, not equal
    assert 0 < (got.double() - exact).abs().max() <= 0.05 * v.abs().max()


def test_kernel_long_segment_and_bf16_output() -> None:
    """4100 keys (64 blocks and a partial one, as an image's rows); the bf16 result is the float32 one rounded."""
    cu = [0, 4100]
    q, k, v = _qkv(4100, 2, 64, seed=1)
    cu_t = torch.tensor(cu)
    as_float = NATIVE.segment_attention(q, k, v, cu_t, 0.125, False, True)
    as_bf16 = NATIVE.segment_attention(q, k, v, cu_t, 0.125, False, False)
    assert torch.equal(as_bf16, as_float.bfloat16())
    excess = (as_float.double() - _float64_attention(q, k, v, cu)).abs() - _bound(v, cu)
    assert excess.max().item() <= 0


@pytest.mark.parametrize("int8_scores", [False, True])
def test_values_are_rounded_to_bf16_as_torch_rounds(int8_scores: bool) -> None:
    """Each query here attends to one key of its segment: the others' weights underflow and their values are 0.
    So the output is that key's values as the kernel stored them: rounded to bf16, which must be as Tensor.to
    gives (ties to even both ways, a carry into the exponent, overflow to inf, -0.0). Not subnormals: vdpbf16ps
    reads bf16 subnormals as zero."""
    import numpy as np

    patterns = [0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3F80FFFF, 0x3FFFFFFF, 0x7F7F8000, 0x7F7F7FFF,
                0x00818000, 0x80808001, 0x80000000, 0x3F800001, 0x40490FDB, 0xC2F6E979, 0x477FE000, 0x3E000000,
                0x3F7FC000, 0x3F7F8000, 0x1234ABCD, 0x3F80C000]  # 20 values: a masked tail in the second vector
    row = torch.from_numpy(np.array(patterns, dtype=np.uint32).view(np.float32).copy())
    n, dim = 6, len(patterns)
    q, k, v = torch.zeros(n, 1, dim), torch.zeros(n, 1, dim), torch.zeros(n, 1, dim)
    q[:, 0, 0] = 1.0
    k[[1, 4], 0, 0] = 60.0  # keys 1 and 4: the largest score of segments [0, 3) and [3, 6)
    v[1, 0], v[4, 0] = row, -row
    out = NATIVE.segment_attention(q, k, v, torch.tensor([0, 3, 6]), 10.0, int8_scores, True)
    # Within a float32 ulp or two: the softmax's sum keeps the unrounded weight (2^0 by the polynomial,
    # 1 + 2^-23), while a bf16 step is 2^-8 relative.
    torch.testing.assert_close(out[:3, 0], row.bfloat16().float().expand(3, dim), rtol=2**-21, atol=0)
    torch.testing.assert_close(out[3:, 0], (-row).bfloat16().float().expand(3, dim), rtol=2**-21, atol=0)


def test_kernel_rejects_what_it_cannot_run() -> None:
    q, k, v = _qkv(10, 2, 64)
    cu = torch.tensor([0, 10])
    assert not NATIVE.segment_attention_supports(7, False) and not NATIVE.segment_attention_supports(130, False)
    assert NATIVE.segment_attention_supports(6, False) and not NATIVE.segment_attention_supports(6, True)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        NATIVE.segment_attention(q.double(), k.double(), v.double(), cu, 0.125, False, True)
    with pytest.raises(RuntimeError, match="from 0 to 10"):
        NATIVE.segment_attention(q, k, v, torch.tensor([0, 9]), 0.125, False, True)


def test_dispatch() -> None:
    """bf16 inputs take the kernel (PyTorch's bf16 SDPA where the CPU has AMX tiles); float32 inputs stay on
    SDPA unless `products` asks; a head size the kernel lacks falls back to SDPA."""
    cu = SEGMENTS["ragged"]
    cu_t = torch.tensor(cu, dtype=torch.int32)
    q, k, v = _qkv(cu[-1], 2, 64)

    def per_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
            for a, b in zip(cu[:-1], cu[1:], strict=True)
        ])

    # With AMX tiles, segments of one length go to SDPA as one batch: within a bf16 rounding of one call each.
    tiles = NATIVE.amx_prefill_available()
    if tiles:
        torch.testing.assert_close(segment_attention(q, k, v, cu_t), per_segment(q, k, v), rtol=2**-7, atol=2**-8)
    else:
        assert torch.equal(segment_attention(q, k, v, cu_t), NATIVE.segment_attention(q, k, v, cu_t, 0.125, False, False))

    qf, kf, vf = (t.float() for t in (q, k, v))
    assert torch.allclose(segment_attention(qf, kf, vf, cu_t), per_segment(qf, kf, vf), rtol=1e-5, atol=1e-6)
    for products in ("bf16", "int8"):
        lossy = segment_attention(qf, kf, vf, cu_t, products=products)
        assert lossy.dtype == torch.float32
        if tiles:  # both as bf16 SDPA, the result rounded to bf16
            assert torch.equal(lossy, segment_attention(q, k, v, cu_t).float())
            assert (lossy - per_segment(qf, kf, vf)).abs().max() < 0.02  # float32 within bf16 rounding
        else:
            assert torch.equal(lossy, NATIVE.segment_attention(qf, kf, vf, cu_t, 0.125, products == "int8", True))
    with pytest.raises(ValueError, match="int4"):
        segment_attention(qf, kf, vf, cu_t, products="int4")

    q7, k7, v7 = _qkv(cu[-1], 2, 7)  # odd head size: SDPA in bf16
    want = torch.cat([
        F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q7, k7, v7))).transpose(0, 1)
        for a, b in zip(cu[:-1], cu[1:], strict=True)
    ])
    got7 = segment_attention(q7, k7, v7, cu_t)
    assert got7.dtype == torch.bfloat16 and torch.allclose(got7.float(), want.float(), rtol=1e-2, atol=1e-2)
