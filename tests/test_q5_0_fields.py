"""Q5_0_FIELDS, the load-time re-encoding of Q5_0 weights on AVX2 hosts (kernels/quant_blocks.h: Q5F): four
Q5_0 blocks' values moved into 5-bit lane fields. Its dequantisation must equal gguf's Q5_0 dequantisation bit
for bit, and every kernel path (1 row of x, 2-8, 9-64, prefill) must equal a float32 matmul over those values
up to the rounding of the sums (tests/test_quant_kernels.py's tolerance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_quant_kernels import random_blocks, reference, within_rounding

from qwen_engine import kernels
from qwen_engine.models import quant
from qwen_engine.models.quant import GEMV_MAX_ROWS, OwnType, QuantLinear

FIELDS = OwnType.Q5_0_FIELDS


def q5_0_and_fields(native, rows: int, cols: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    raw = random_blocks(Q.Q5_0, rows, cols, seed=seed)
    return raw, native.q5_0_as_fields(torch.from_numpy(raw), cols)


@pytest.mark.parametrize("cols", [128, 896, 1280])
def test_every_value_is_q5_0s_bit_for_bit(native, cols):
    raw = random_blocks(Q.Q5_0, 23, cols, seed=cols)
    raw[0, 2:6], raw[1, 2:6] = 0xFF, 0x00  # a block whose fifth bits are all set, one all clear
    fields = native.q5_0_as_fields(torch.from_numpy(raw), cols)
    assert fields.shape == (23, cols // 128 * 104)
    assert torch.equal(native.dequantize(fields, int(FIELDS), cols), reference(raw, Q.Q5_0, cols))
    ids = torch.tensor([22, 0, 5, 5])
    assert torch.equal(native.dequantize_rows(fields, int(FIELDS), cols, ids), reference(raw, Q.Q5_0, cols)[ids])


@pytest.mark.parametrize("rows", [1, 2, 7, 25])
@pytest.mark.parametrize("batch", [*range(1, 10), 16, 33, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 7])
def test_products_on_every_path(native, rows, batch):
    raw, fields = q5_0_and_fields(native, rows, 896, seed=rows * 100 + batch)
    x = torch.randn(batch, 896, generator=torch.Generator().manual_seed(batch))
    y = native.linear(x, [fields], [int(FIELDS)], None, GEMV_MAX_ROWS)
    assert y.shape == (batch, rows)
    assert within_rounding(y, x, reference(raw, Q.Q5_0, 896))


@pytest.mark.parametrize("batch", [1, 2, 4, 8, 9, GEMV_MAX_ROWS + 1])
def test_stacked_with_ggml_types_and_a_bias(native, batch):
    cols = 1280
    q5, fields = q5_0_and_fields(native, 33, cols, seed=1)
    q8, q4k = random_blocks(Q.Q8_0, 5, cols, seed=2), random_blocks(Q.Q4_K, 9, cols, seed=3)
    w = torch.cat([reference(q5, Q.Q5_0, cols), reference(q8, Q.Q8_0, cols), reference(q4k, Q.Q4_K, cols)])
    bias = torch.randn(47)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
    layer = QuantLinear([(fields, FIELDS), (torch.from_numpy(q8), Q.Q8_0), (torch.from_numpy(q4k), Q.Q4_K)], cols, bias)
    assert "Q5_0_FIELDS+Q8_0+Q4_K" in repr(layer)
    assert within_rounding(layer(x) - bias, x, w)
    assert torch.equal(layer.dequantized(), w)


def test_rows_must_hold_groups_of_128_values(native):
    raw = random_blocks(Q.Q5_0, 3, 96, seed=0)
    with pytest.raises(RuntimeError, match="groups of 128"):
        native.q5_0_as_fields(torch.from_numpy(raw), 96)
    with pytest.raises(ValueError, match="multiple of 128"):
        QuantLinear([(torch.zeros(3, 104, dtype=torch.uint8), FIELDS)], 96)


def test_without_the_native_kernels_the_type_is_refused_plainly(monkeypatch):
    monkeypatch.setattr(kernels, "native", lambda: None)
    with pytest.raises(RuntimeError, match="Q5_0_FIELDS blocks need the native kernels"):
        quant.dequantize(torch.zeros(2, 104, dtype=torch.uint8), FIELDS, 128)
