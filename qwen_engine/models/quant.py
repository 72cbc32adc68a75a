"""Linear layers and embeddings whose weights stay in a GGUF's quantised blocks.

A weight is kept as its raw bytes, a uint8 tensor [rows, bytes per row] that is usually a view of the memory-
mapped file, plus its ggml block type. The native kernels (qwen_engine/kernels) dequantise inside the matrix
product; without them, the weight is dequantised by the `gguf` package and multiplied in PyTorch — the same
numbers up to the order of the sums.

Blocks never span rows, so weights that share an input (q/k/v, gate/up) can be stacked as segments of one
layer and computed in one call, even when their block types differ.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from .. import kernels

Q = GGMLQuantizationType


class OwnType(IntEnum):
    """Block types of our own, not ggml's: exact re-encodings of GGUF blocks made at load for faster kernels
    (kernels/quant_blocks.h), numbered past ggml's. Only the native kernels read them."""

    Q5_0_FIELDS = 1006  # four Q5_0 blocks' values in 5-bit lane fields: 104 bytes per 128 values
    Q6_K_FIELDS = 1007  # a Q6_K block's values in 6-bit lane fields, its scales as Q6_K's: 210 bytes per 256


OWN_SIZES = {OwnType.Q5_0_FIELDS: (128, 104), OwnType.Q6_K_FIELDS: (256, 210)}  # values, bytes per block
BlockType = GGMLQuantizationType | OwnType
# Block types the native kernels read directly; any other type is dequantised to float32 at load.
KERNEL_TYPES = frozenset(
    {Q.F16, Q.BF16, Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K, OwnType.Q5_0_FIELDS, OwnType.Q6_K_FIELDS}
)
# Up to this many rows of x (a batch of decodes), the kernel reads the weights once and dequantises them in
# registers (≤ 3 rows) or into a small cache-resident tile (more); above it (prefill), it dequantises into a
# scratch buffer and lets MKL multiply. The tile path was faster than MKL up to ~128 rows on the AVX-512 host,
# and up to 64 on an AVX2 one (Zen 3).
GEMV_MAX_ROWS = 64


def block_type(t: int) -> BlockType:
    return OwnType(t) if t in OWN_SIZES else GGMLQuantizationType(t)


def block_size(qtype: BlockType) -> tuple[int, int]:
    """(values, bytes) of one block."""
    return OWN_SIZES[qtype] if qtype in OWN_SIZES else GGML_QUANT_SIZES[qtype]


def row_multiple(qtype: BlockType) -> int:
    """Values a row of this type must hold a multiple of: its block, and 16 for F16/BF16 (the kernels read those
    16 values at a time)."""
    block = block_size(qtype)[0]
    return 16 if qtype in (Q.F16, Q.BF16) else block


def has_kernel(qtype: BlockType, in_features: int) -> bool:
    return qtype in KERNEL_TYPES and in_features % row_multiple(qtype) == 0


def check_blocks(blocks: torch.Tensor, qtype: BlockType, in_features: int) -> None:
    if qtype not in KERNEL_TYPES:
        raise ValueError(f"no quantised kernel for GGUF type {qtype.name}")
    block, size = block_size(qtype)
    if in_features % row_multiple(qtype):
        raise ValueError(f"{qtype.name} rows need a multiple of {row_multiple(qtype)} values, got {in_features}")
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != in_features // block * size:
        raise ValueError(
            f"{qtype.name} weight with {in_features} inputs must be uint8 [rows, {in_features // block * size}], "
            f"got {blocks.dtype} {list(blocks.shape)}"
        )


def dequantize(blocks: torch.Tensor, qtype: BlockType, in_features: int) -> torch.Tensor:
    """float32 [rows, in_features]: the native kernel's dequantisation, or the gguf package's (the reference)."""
    native = kernels.native()
    if native is not None:
        return native.dequantize(blocks, int(qtype), in_features)
    if qtype in OWN_SIZES:
        raise RuntimeError(f"{qtype.name} blocks need the native kernels, which are not available")
    from gguf.quants import dequantize as reference

    values = reference(blocks.numpy(), qtype).reshape(blocks.shape[0], in_features)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W in GGUF blocks, made of one or more stacked segments (one per original weight)."""

    def __init__(
        self,
        segments: list[tuple[torch.Tensor, BlockType]],
        in_features: int,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        if not segments:
            raise ValueError("a QuantLinear needs at least one weight")
        for blocks, qtype in segments:
            check_blocks(blocks, qtype, in_features)
        self.blocks = [b for b, _ in segments]
        self.qtypes = [block_type(t) for _, t in segments]
        self.in_features = in_features
        self.out_features = sum(int(b.shape[0]) for b in self.blocks)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self.bias = None if bias is None else bias.float().contiguous()
        self._type_ids = [int(t) for t in self.qtypes]

    @classmethod
    def stack(cls, layers: list[QuantLinear]) -> QuantLinear:
        """One layer computing `layers` side by side (outputs concatenated): exact, rows are independent."""
        in_features = layers[0].in_features
        if any(layer.in_features != in_features for layer in layers):
            raise ValueError("stacked layers must share their input size")
        segments = [seg for layer in layers for seg in zip(layer.blocks, layer.qtypes, strict=True)]
        if all(layer.bias is None for layer in layers):
            bias = None
        else:
            bias = torch.cat([layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
                              for layer in layers])
        return cls(segments, in_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        native = kernels.native()
        if native is not None and x2.dtype == torch.float32 and x2.device.type == "cpu":
            y = native.linear(x2, self.blocks, self._type_ids, self.bias, GEMV_MAX_ROWS)
        else:
            y = F.linear(x2.float(), self.dequantized(), self.bias)
        return y.view(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The whole weight as float32 [out_features, in_features]."""
        return torch.cat([dequantize(b, t, self.in_features) for b, t in zip(self.blocks, self.qtypes, strict=True)])

    def extra_repr(self) -> str:
        types = "+".join(t.name for t in self.qtypes)
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={types}"


class QuantEmbedding(nn.Module):
    """Token embeddings in GGUF blocks: only the rows looked up are dequantised."""

    def __init__(self, blocks: torch.Tensor, qtype: GGMLQuantizationType, dim: int):
        super().__init__()
        check_blocks(blocks, qtype, dim)
        self.blocks, self.qtype, self.dim = blocks, block_type(qtype), dim
        self.num_embeddings = int(blocks.shape[0])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        native = kernels.native()
        if native is not None:
            rows = native.dequantize_rows(self.blocks, int(self.qtype), self.dim, flat.cpu().long())
        else:
            rows = dequantize(self.blocks[flat.cpu()], self.qtype, self.dim)
        return rows.to(ids.device).view(*ids.shape, self.dim)

    def as_linear(self) -> QuantLinear:
        """The same blocks as an output projection (tied embeddings)."""
        return QuantLinear([(self.blocks, self.qtype)], self.dim)
