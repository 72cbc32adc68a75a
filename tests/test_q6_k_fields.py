"""Q6_K_FIELDS, the load-time re-layout of Q6_K weights on AVX2 and AMD AVX-512 hosts (kernels/quant_blocks.h:
Q6F): a block's 6-bit values moved into lane fields, its scales kept. Its dequantisation must equal gguf's Q6_K
dequantisation bit for bit, and every kernel path (1 row of x, 2-8, 9-64, prefill) must equal a float32 matmul
over those values up to the rounding of the sums (tests/test_quant_kernels.py's tolerance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_quant_kernels import random_blocks, reference, within_rounding

from qwen_engine import kernels
from qwen_engine.models import quant
from qwen_engine.models.quant import GEMV_MAX_ROWS, OwnType, QuantLinear
from qwen_engine.weights import quantized

FIELDS = OwnType.Q6_K_FIELDS


def q6_k_and_fields(native, rows: int, cols: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    raw = random_blocks(Q.Q6_K, rows, cols, seed=seed)
    return raw, native.q6_k_as_fields(torch.from_numpy(raw), cols)


@pytest.mark.parametrize("cols", [256, 1280, 4864])
def test_every_value_is_q6_ks_bit_for_bit(native, cols):
    raw = random_blocks(Q.Q6_K, 23, cols, seed=cols)
    raw[0, :192], raw[1, :192] = 0xFF, 0x00  # a block whose values are all 63 (every spare bit set), one all 0
    fields = native.q6_k_as_fields(torch.from_numpy(raw), cols)
    assert fields.shape == (23, cols // 256 * 210)
    assert torch.equal(native.dequantize(fields, int(FIELDS), cols), reference(raw, Q.Q6_K, cols))
    ids = torch.tensor([22, 0, 1, 5, 5])
    assert torch.equal(native.dequantize_rows(fields, int(FIELDS), cols, ids), reference(raw, Q.Q6_K, cols)[ids])


@pytest.mark.parametrize("rows", [1, 2, 7, 25])
@pytest.mark.parametrize("batch", [*range(1, 10), 16, 33, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 7])
def test_products_on_every_path(native, rows, batch):
    raw, fields = q6_k_and_fields(native, rows, 1280, seed=rows * 100 + batch)
    x = torch.randn(batch, 1280, generator=torch.Generator().manual_seed(batch))
    y = native.linear(x, [fields], [int(FIELDS)], None, GEMV_MAX_ROWS)
    assert y.shape == (batch, rows)
    assert within_rounding(y, x, reference(raw, Q.Q6_K, 1280))


@pytest.mark.parametrize("batch", [1, 2, 4, 8, 9, GEMV_MAX_ROWS + 1])
def test_stacked_with_ggml_types_and_a_bias(native, batch):
    cols = 1280
    q6, fields = q6_k_and_fields(native, 33, cols, seed=1)
    q8, q4k = random_blocks(Q.Q8_0, 5, cols, seed=2), random_blocks(Q.Q4_K, 9, cols, seed=3)
    w = torch.cat([reference(q6, Q.Q6_K, cols), reference(q8, Q.Q8_0, cols), reference(q4k, Q.Q4_K, cols)])
    bias = torch.randn(47)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
    layer = QuantLinear([(fields, FIELDS), (torch.from_numpy(q8), Q.Q8_0), (torch.from_numpy(q4k), Q.Q4_K)], cols, bias)
    assert "Q6_K_FIELDS+Q8_0+Q4_K" in repr(layer)
    assert within_rounding(layer(x) - bias, x, w)
    assert torch.equal(layer.dequantized(), w)


def test_demo_models_q6_k_weights_are_relaid_where_the_kernels_prefer_fields(native, demo_llm, monkeypatch):
    downs = [layer.mlp.down_proj for layer in demo_llm.model.model.layers]
    types = {t for d in downs for t in d.qtypes}  # the file's ffn_down: Q6_K in half the layers, Q4_K in the rest
    if native.prefers_fields():
        assert types == {FIELDS, Q.Q4_K}
    else:
        assert types == {Q.Q6_K, Q.Q4_K}
    monkeypatch.setenv("QWEN_ENGINE_RECODE_Q6_K", "0")
    assert quantized.recode(torch.nn.Linear(4864, 1), Q.Q6_K, 4864) is None


def test_without_the_native_kernels_the_type_is_refused_plainly(monkeypatch):
    monkeypatch.setattr(kernels, "native", lambda: None)
    with pytest.raises(RuntimeError, match="Q6_K_FIELDS blocks need the native kernels"):
        quant.dequantize(torch.zeros(2, 210, dtype=torch.uint8), FIELDS, 256)
