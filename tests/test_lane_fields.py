"""The load-time re-layouts of GGUF weights in lane fields (kernels/quant_blocks.h), on AVX2 and AMD AVX-512
hosts: Q5_0_FIELDS (Q5F: four Q5_0 blocks' values in 5-bit fields of 32-bit lanes) and Q6_K_FIELDS (Q6F: a Q6_K
block's 6-bit values in lane fields, its scales kept). Each one's dequantisation must equal gguf's dequantisation
of the original type bit for bit, and every kernel path (1 row of x, 2-8, 9-64, prefill) must equal a float32
matmul over those values up to the rounding of the sums (tests/test_quant_kernels.py's tolerance)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_quant_kernels import random_blocks, reference, within_rounding

from qwen_engine import kernels
from qwen_engine.models import quant
from qwen_engine.models.quant import GEMV_MAX_ROWS, OwnType, QuantLinear
from qwen_engine.weights import quantized


@dataclass(frozen=True)
class Layout:
    source: Q  # the GGUF type re-laid
    fields: OwnType
    relay: str  # the native function that re-lays a [rows, bytes] tensor of `source` blocks
    values: int  # values a fields block holds
    nbytes: int  # and its bytes
    widths: tuple[int, ...]  # row lengths tried for bit equality
    width: int  # the row length of the products
    extreme_bytes: slice  # of a row's first block: all set gives every value its top bits, all clear none

    def blocks(self, native, rows: int, cols: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
        raw = random_blocks(self.source, rows, cols, seed=seed)
        return raw, getattr(native, self.relay)(torch.from_numpy(raw), cols)


Q5F = Layout(Q.Q5_0, OwnType.Q5_0_FIELDS, "q5_0_as_fields", 128, 104, (128, 896, 1280), 896, slice(2, 6))
Q6F = Layout(Q.Q6_K, OwnType.Q6_K_FIELDS, "q6_k_as_fields", 256, 210, (256, 1280, 4864), 1280, slice(0, 192))
LAYOUTS = [pytest.param(Q5F, id="Q5_0_FIELDS"), pytest.param(Q6F, id="Q6_K_FIELDS")]


@pytest.mark.parametrize("width", range(3))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_value_is_the_source_types_bit_for_bit(native, layout, width):
    cols = layout.widths[width]
    raw = random_blocks(layout.source, 23, cols, seed=cols)
    raw[0, layout.extreme_bytes], raw[1, layout.extreme_bytes] = 0xFF, 0x00
    fields = getattr(native, layout.relay)(torch.from_numpy(raw), cols)
    assert fields.shape == (23, cols // layout.values * layout.nbytes)
    want = reference(raw, layout.source, cols)
    assert torch.equal(native.dequantize(fields, int(layout.fields), cols), want)
    ids = torch.tensor([22, 0, 1, 5, 5])
    assert torch.equal(native.dequantize_rows(fields, int(layout.fields), cols, ids), want[ids])


@pytest.mark.parametrize("rows", [1, 2, 7, 25])
@pytest.mark.parametrize("batch", [*range(1, 10), 16, 33, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 7])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_products_on_every_path(native, layout, rows, batch):
    cols = layout.width
    raw, fields = layout.blocks(native, rows, cols, seed=rows * 100 + batch)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
    y = native.linear(x, [fields], [int(layout.fields)], None, GEMV_MAX_ROWS)
    assert y.shape == (batch, rows)
    assert within_rounding(y, x, reference(raw, layout.source, cols))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_long_rows_at_2_to_8_rows_of_x(native, layout):
    """Q6F at 7-8 rows reads x interleaved and scaled (fields_x) in chunks of K (in_chunks): K of whole chunks
    and a partial last one, with a bias; fewer rows read x as given."""
    cols = layout.widths[-1]
    raw, fields = layout.blocks(native, 37, cols, seed=5)
    w = reference(raw, layout.source, cols)
    bias = torch.randn(37)
    for batch in range(2, 9):
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
        y = native.linear(x, [fields], [int(layout.fields)], bias, GEMV_MAX_ROWS)
        assert within_rounding(y - bias, x, w), batch


@pytest.mark.parametrize("batch", [1, 2, 4, 8, 9, GEMV_MAX_ROWS + 1])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_stacked_with_ggml_types_and_a_bias(native, layout, batch):
    cols = 1280
    raw, fields = layout.blocks(native, 33, cols, seed=1)
    q8, q4k = random_blocks(Q.Q8_0, 5, cols, seed=2), random_blocks(Q.Q4_K, 9, cols, seed=3)
    w = torch.cat([reference(raw, layout.source, cols), reference(q8, Q.Q8_0, cols), reference(q4k, Q.Q4_K, cols)])
    bias = torch.randn(47)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
    layer = QuantLinear([(fields, layout.fields), (torch.from_numpy(q8), Q.Q8_0), (torch.from_numpy(q4k), Q.Q4_K)],
                        cols, bias)
    assert f"{layout.fields.name}+Q8_0+Q4_K" in repr(layer)
    assert within_rounding(layer(x) - bias, x, w)
    assert torch.equal(layer.dequantized(), w)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_the_native_kernels_the_type_is_refused_plainly(monkeypatch, layout):
    monkeypatch.setattr(kernels, "native", lambda: None)
    with pytest.raises(RuntimeError, match=f"{layout.fields.name} blocks need the native kernels"):
        quant.dequantize(torch.zeros(2, layout.nbytes, dtype=torch.uint8), layout.fields, layout.values)


def test_q5_0_rows_must_hold_groups_of_128_values(native):
    raw = random_blocks(Q.Q5_0, 3, 96, seed=0)
    with pytest.raises(RuntimeError, match="groups of 128"):
        native.q5_0_as_fields(torch.from_numpy(raw), 96)
    with pytest.raises(ValueError, match="multiple of 128"):
        QuantLinear([(torch.zeros(3, 104, dtype=torch.uint8), OwnType.Q5_0_FIELDS)], 96)


def test_demo_models_q6_k_weights_are_relaid_where_the_kernels_prefer_fields(native, demo_llm, monkeypatch):
    downs = [layer.mlp.down_proj for layer in demo_llm.model.model.layers]
    types = {t for d in downs for t in d.qtypes}  # the file's ffn_down: Q6_K in half the layers, Q4_K in the rest
    if native.prefers_fields():
        assert types == {OwnType.Q6_K_FIELDS, Q.Q4_K}
    else:
        assert types == {Q.Q6_K, Q.Q4_K}
    monkeypatch.setenv("QWEN_ENGINE_RECODE_Q6_K", "0")
    assert quantized.recode(torch.nn.Linear(4864, 1), Q.Q6_K, 4864) is None
