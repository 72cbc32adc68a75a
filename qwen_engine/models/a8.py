"""The optional mode `a8`: the GGUF's own weights, exactly, with activations rounded to int8 — the arithmetic
llama.cpp itself uses on a CPU.

The default path multiplies in float32 and keeps the model's numbers; where float32 products are compute-bound
(prefill, many sequences decoding at once) llama.cpp is faster because it rounds each product's activations to
8 bits and multiplies integers (its `Q8_0`/`Q8_K` blocks against the weights' own quants). This mode does the
same and changes nothing else:

- each weight's GGUF blocks are re-encoded at load, exactly, as int8 values with one scale per group of 32 values
  (16 for Q6_K, whose scales change every 16) — and, for the K-quants with minima (Q4_K, Q5_K), one offset per
  group: a weight is `scale * q + offset`, bit for bit the float the reference dequantises
  (`test_a8.py: test_exact_re_encoding`);
- each row of activations is rounded to int8 on the fly, one scale per group of the same size (llama.cpp rounds
  per 32 for Q5_0/Q8_0 and per 256 for the K-quants, so it rounds more coarsely);
- the group dot products are exact integers (the w8a8 mode's kernels, kernels/int8_matmul.cpp, with offsets
  added as offset × the group's sum of x); only the scaling is float.
- with AVX-512 VNNI, a weight of one 4- or 5-bit type (Q4_0, Q5_0, Q4_K, Q5_K) is kept in nibble units rather
  than a byte a value: the GGUF's own codes as 4 bits plus a bit plane for the fifth (`pack_nibbles16`). A
  decode step of one sequence leans on the bytes it streams: Q5_0, the demo model's q/k/v, o and gate/up, takes
  0.75 bytes a value with its scales instead of 1.125, and gate/up ran 1.24x faster (docs/benchmarks.md,
  thirty-fifth pass). The integers are the same, so are the outputs. (Q6_K's two planes gained 1.0-1.1x at one
  row and lost 8-25 % at 4-32 rows: it stays in bytes.)

Mixtures of experts: every expert's gate/up and down (and a shared expert's) are converted like a dense MLP's;
the router and the shared expert's gate, a few outputs each, stay on the default path, so routing sees the
float products (it can still choose differently where rounded activations upstream move a score past another).

So its only loss is the activations' rounding. `benchmarks/compare.py` prints its mean KL divergence from the
float32 model beside llama.cpp's. A product with a block type outside `GROUPS` (F16, BF16, other quants) stays on
the default path's kernels. Embeddings, norms and attention stay float32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K
from torch import nn

from .. import kernels
from ..weights import w8a8_store
from . import w8a8
from .quant import QuantLinear

Q = GGMLQuantizationType
MODE = "a8"

# The group each block type's scales change at (values along a row).
GROUPS = {Q.Q4_0: 32, Q.Q5_0: 32, Q.Q8_0: 32, Q.Q4_K: 32, Q.Q5_K: 32, Q.Q6_K: 16}
ROWS_AT_ONCE = 4096  # weight rows re-encoded at a time
# Types kept in nibble units with AVX-512: (bit planes above the nibble, the code of weight 0 — the GGUF's own
# quants are scale * (code - zero), plus an offset for the K-quants with minima)
NIBBLES = {Q.Q4_0: (0, 8), Q.Q5_0: (1, 16), Q.Q4_K: (0, 0), Q.Q5_K: (1, 0)}


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of each block, as float32."""
    return blocks[..., at : at + 2].contiguous().view(torch.float16).float().squeeze(-1)


def _nibbles(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (packed & 0x0F).to(torch.int16), (packed >> 4).to(torch.int16)


def _bits(words: torch.Tensor, count: int) -> torch.Tensor:
    """Bits 0..count-1 of little-endian bytes [..., count / 8], as [..., count] (0 or 1)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((words[..., :, None] >> shifts) & 1).flatten(-2).to(torch.int16)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes [rows, nblocks, 12] → 8 six-bit scales and 8 six-bit minima per block (the gguf
    package's own unpacking)."""
    sc, m = Q4_K.get_scale_min(packed.contiguous().numpy().reshape(-1, 12))
    shape = (*packed.shape[:-1], 8)
    return torch.from_numpy(sc.astype("int16")).view(shape), torch.from_numpy(m.astype("int16")).view(shape)


def _decode(blocks: torch.Tensor, qtype: Q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """uint8 [rows, nblocks, bytes] → (q int16 [rows, nblocks * values], scale and offset per group [rows,
    groups] float32, offset None where the type has none): value = scale * q + offset."""
    rows = blocks.shape[0]
    if qtype == Q.Q8_0:
        q = blocks[..., 2:].contiguous().view(torch.int8).to(torch.int16)
        return q.reshape(rows, -1), _f16(blocks, 0), None
    if qtype in (Q.Q4_0, Q.Q5_0):
        lo, hi = _nibbles(blocks[..., -16:])
        q = torch.cat([lo, hi], -1)
        if qtype == Q.Q5_0:
            q = q | (_bits(blocks[..., 2:6], 32) << 4)
        return (q - (8 if qtype == Q.Q4_0 else 16)).reshape(rows, -1), _f16(blocks, 0), None
    if qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, m = _k_scales(blocks[..., 4:16])
        lo, hi = _nibbles(blocks[..., -128:].reshape(rows, -1, 4, 32))  # 4 chunks of 64 values: low, then high
        q = torch.stack([lo, hi], 3)  # [rows, nblocks, 4, 2, 32]: sub-block 2j, then 2j + 1
        if qtype == Q.Q5_K:
            high = _bits(blocks[..., 16:48], 256).view(rows, -1, 32, 8).permute(0, 1, 3, 2)  # [.., bit, value]
            q = q | (high.reshape(rows, -1, 4, 2, 32) << 4)
        scale = d[..., None] * sc.float()
        offset = -(dmin[..., None] * m.float())
        return q.reshape(rows, -1), scale.reshape(rows, -1), offset.reshape(rows, -1)
    if qtype == Q.Q6_K:
        ql, qh = blocks[..., 0:128].reshape(rows, -1, 2, 64), blocks[..., 128:192].reshape(rows, -1, 2, 32)
        sc = blocks[..., 192:208].contiguous().view(torch.int8).float()
        d = _f16(blocks, 208)
        lo, hi = _nibbles(ql)  # per half of 128 values: ql[0:32] and ql[32:64], low then high nibbles
        h = qh.to(torch.int16)
        parts = [lo[..., :32] | ((h & 3) << 4), lo[..., 32:] | (((h >> 2) & 3) << 4),
                 hi[..., :32] | (((h >> 4) & 3) << 4), hi[..., 32:] | (((h >> 6) & 3) << 4)]
        q = torch.stack(parts, 3) - 32  # [rows, nblocks, half, 4, 32]
        return q.reshape(rows, -1), (d[..., None] * sc).reshape(rows, -1), None
    raise ValueError(f"a8 has no exact int8 form of {qtype.name}")


def int8_form(blocks: torch.Tensor, qtype: Q, in_features: int,
              group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A GGUF weight's blocks uint8 [rows, bytes] → (uint8 [rows, in_features] = q + 128, scales and offsets
    [rows, in_features / group]): `group` a divisor of the type's own (GROUPS), its scales repeated."""
    own = GROUPS[qtype]
    if own % group:
        raise ValueError(f"{qtype.name} scales change every {own} values; group {group} does not divide that")
    values, size = GGML_QUANT_SIZES[qtype]
    q, scale, offset = _decode(blocks.view(blocks.shape[0], in_features // values, size), qtype)
    repeat = own // group
    offset = None if offset is None else offset.repeat_interleave(repeat, 1).contiguous()
    return (q + 128).to(torch.uint8), scale.repeat_interleave(repeat, 1).contiguous(), offset


def store_path(source: Path) -> Path | None:
    """Where the a8 layers of the GGUF at `source` are kept (weights/w8a8_store.py), or None if turned off."""
    # (stores made before nibble units, or before A8Parts, are made again: the same numbers, slower layouts)
    kind = layout() + ("-nibbles" if layout() == "units16" else "") + "-parts"
    return w8a8_store.store_path(source, kind, mode=MODE)


def _steps(codes: torch.Tensor, group: int) -> torch.Tensor:
    """uint8 [units · 16, K] → [units, groups, group / 4 steps, 64]: a step is 4 values of each of a unit's 16 rows,
    byte 4 · row + k % 4 (the byte units' order, w8a8.pack_units16)."""
    K = codes.shape[1]
    steps = codes.view(-1, 16, K // 4, 4).permute(0, 2, 1, 3)
    return steps.reshape(-1, K // group, group // 4, 64)


def pack_nibbles16(codes: torch.Tensor, group: int, planes: int, zero: int) -> torch.Tensor:
    """Codes uint8 [N, K] (each below 16 << planes) → nibble units (kernels/int8_matmul.cpp: nibble_pair, units_tile): per
    unit of 16 rows (the last padded with `zero`) and group, the low nibbles of its steps two by two (step 2v low,
    2v + 1 high) as 64-byte vectors, then `planes` bit planes (bit 4 + p of each step's 64 bytes as 8 bytes)."""
    pad = -codes.shape[0] % 16
    if pad:
        codes = torch.cat([codes, torch.full((pad, codes.shape[1]), zero, dtype=torch.uint8)])
    steps = _steps(codes, group)
    pairs = steps.view(*steps.shape[:2], group // 8, 2, 64)
    nibbles = (pairs[..., 0, :] & 0x0F) | ((pairs[..., 1, :] & 0x0F) << 4)
    parts = [nibbles.flatten(2)]
    weights = 1 << torch.arange(8, dtype=torch.uint8)
    for p in range(planes):
        bits = ((steps >> (4 + p)) & 1).view(*steps.shape[:3], 8, 8)
        parts.append((bits * weights).sum(-1, dtype=torch.uint8).flatten(2))
    return torch.cat(parts, -1).reshape(-1)


def unpack_nibbles16(packed: torch.Tensor, N: int, K: int, group: int, planes: int) -> torch.Tensor:
    """The codes uint8 [N, K] of pack_nibbles16's units."""
    groups = K // group
    units = packed.numel() // (K * (8 + 2 * planes))
    data = packed.view(units, groups, group * (8 + 2 * planes))
    nibbles = data[..., : 8 * group].reshape(units, groups, group // 8, 64)
    steps = torch.stack([nibbles & 0x0F, nibbles >> 4], 3).reshape(units, groups, group // 4, 64)
    shifts = torch.arange(8, dtype=torch.uint8)
    for p in range(planes):
        masks = data[..., 8 * group + 2 * group * p : 8 * group + 2 * group * (p + 1)]
        bits = ((masks.reshape(units, groups, group // 4, 8, 1) >> shifts) & 1).reshape(units, groups, group // 4, 64)
        steps = steps | (bits << (4 + p))
    rows = steps.reshape(units, K // 4, 16, 4).permute(0, 2, 1, 3).reshape(units * 16, K)
    return rows[:N].contiguous()


def layout() -> str:
    """Units of rows (AVX-512 VNNI or AVX2; where AMX tiles run, the kernel hands them 8+ rows of x over the same
    units: kernels/int8_matmul.cpp, amx_units_range), else rows for the PyTorch reference."""
    native = kernels.native()
    if native is not None and hasattr(native, "int8_units_layout"):
        return native.int8_units_layout() or "rows"
    return "rows"


class A8Linear(w8a8.W8A8Linear):
    """y = x @ W^T + b with W a GGUF weight re-encoded exactly as int8 (+ offsets) per group of `group` inputs,
    and x rounded to int8 in the same groups."""

    def __init__(self, segments: list[tuple[torch.Tensor, Q]], in_features: int, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = sum(int(b.shape[0]) for b, _ in segments)
        self.padded = w8a8.padded_size(in_features)
        self.group = min(GROUPS[t] for _, t in segments)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.input_factors = None
        with_offsets = any(t in (Q.Q4_K, Q.Q5_K) for _, t in segments)
        groups = self.padded // self.group
        self.weight_offsets = torch.zeros(groups, self.out_features) if with_offsets else None
        pad = self.padded - in_features
        packing = layout()
        kinds = {t for _, t in segments}
        if packing == "units16" and len(kinds) == 1 and next(iter(kinds)) in NIBBLES:
            packing = "nibbles16"
            self.planes, self.zero = NIBBLES[next(iter(kinds))]

        def blocks():
            row = 0
            for raw, qtype in segments:
                for r in range(0, raw.shape[0], ROWS_AT_ONCE):
                    u8, scale, offset = int8_form(raw[r : r + ROWS_AT_ONCE], qtype, in_features, self.group)
                    if packing == "units" and qtype == Q.Q8_0 and bool((u8 == 0).any()):
                        # AVX2's kernel moves x's sign onto the weight, and -(-128) is no int8. ggml's own
                        # Q8_0 rounding stays within ±127; only a file made otherwise has -128.
                        raise ValueError("a Q8_0 weight holds -128, which a8's AVX2 kernel cannot multiply")
                    n = u8.shape[0]
                    if pad:  # zero weights (128) with zero scales past in_features
                        u8 = torch.nn.functional.pad(u8, (0, pad), value=128)
                        scale = torch.nn.functional.pad(scale, (0, groups - scale.shape[1]))
                    if offset is not None:
                        self.weight_offsets[: offset.shape[1], row : row + n] = offset.t()
                    row += n
                    yield u8, scale

        self._pack(packing, blocks())

    def _packed_form(self, rows: torch.Tensor) -> torch.Tensor:
        if self.layout != "nibbles16":
            return super()._packed_form(rows)
        codes = (rows.to(torch.int16) - 128 + self.zero).to(torch.uint8)
        return pack_nibbles16(codes, self.group, self.planes, self.zero)

    def _unpacked_rows(self) -> torch.Tensor:
        if self.layout != "nibbles16":
            return super()._unpacked_rows()
        codes = unpack_nibbles16(self.packed, self.out_features, self.padded, self.group, self.planes)
        return (codes.to(torch.int16) - self.zero + 128).to(torch.uint8)

    def tensors(self) -> dict[str, torch.Tensor]:
        kept = super().tensors()
        kept["group"] = torch.tensor([float(self.group)])
        if self.planes >= 0:
            kept["nibbles"] = torch.tensor([float(self.planes), float(self.zero)])
        if self.weight_offsets is not None:
            kept["offsets"] = self.weight_offsets
        return kept

    def extra_repr(self) -> str:
        offsets = ", offsets" if self.weight_offsets is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}{offsets}"


class A8Parts(nn.Module):
    """Products side by side (q/k/v, gate/up) whose block types want different groups or packings — a Q6_K v
    (groups of 16, bytes) beside Q4_K q and k (32, nibbles) — as one A8Linear each, outputs concatenated. One
    A8Linear of them all would take the finest group and bytes for every part: the Q4_K_M files' q/k/v then read
    1.5 bytes a weight instead of ~0.8 and scale every 16 products."""

    def __init__(self, parts: list[A8Linear]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], -1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"part{i}.{key}": t for i, part in enumerate(self.parts) for key, t in part.tensors().items()}


def _a8_product(segments: list[tuple[torch.Tensor, Q]], in_features: int,
                bias: torch.Tensor | None) -> A8Linear | A8Parts:
    """One A8Linear for a weight's segments, or A8Parts where their kinds differ (runs of one kind each): the
    group, and with AVX-512 VNNI (nibble units) the packing."""
    nibbles = layout() == "units16"

    def kind(qtype: Q) -> tuple:
        return GROUPS[qtype], NIBBLES.get(qtype) if nibbles else None

    runs: list[list[tuple[torch.Tensor, Q]]] = []
    for segment in segments:
        if runs and kind(runs[-1][-1][1]) == kind(segment[1]):
            runs[-1].append(segment)
        else:
            runs.append([segment])
    if len(runs) == 1:
        return A8Linear(segments, in_features, bias)
    parts, row = [], 0
    for run in runs:
        rows = sum(int(raw.shape[0]) for raw, _ in run)
        parts.append(A8Linear(run, in_features, None if bias is None else bias[row : row + rows]))
        row += rows
    return A8Parts(parts)


def convertible(layers: list[nn.Module]) -> bool:
    return all(isinstance(x, QuantLinear) and all(t in GROUPS for t in x.qtypes) for x in layers)


def _stored_layer(in_features: int, tensors: dict[str, torch.Tensor], name: str) -> A8Linear | A8Parts:
    if f"{name}.part0.weight" in tensors:
        count = sum(1 for key in tensors if key.startswith(f"{name}.part") and key.endswith(".weight"))
        return A8Parts([_stored_layer(in_features, tensors, f"{name}.part{i}") for i in range(count)])
    nibbles = tensors.get(f"{name}.nibbles")
    planes, zero = (-1, 128) if nibbles is None else (int(nibbles[0]), int(nibbles[1]))
    return A8Linear.stored(in_features, tensors[f"{name}.weight"], tensors[f"{name}.scales"],
                           tensors.get(f"{name}.bias"), offsets=tensors.get(f"{name}.offsets"),
                           group=int(tensors[f"{name}.group"][0]), layout="nibbles16" if planes >= 0 else layout(),
                           planes=planes, zero=zero)


def converted_bytes(products: list) -> int:
    """About how many bytes the a8 layers of `products` (w8a8._products' rows) take: int8 weights (4-bit codes and
    bit planes where nibble units are kept), a float32 scale per group, and an offset per group for Q4_K/Q5_K."""
    nibbles = layout() == "units16"
    total = 0
    for _, _, _, _, layers in products:
        for layer in layers:
            K = w8a8.padded_size(layer.in_features)
            for raw, qtype in zip(layer.blocks, layer.qtypes, strict=True):
                group = GROUPS[qtype]
                weight = (4 + NIBBLES[qtype][0]) / 8 if nibbles and qtype in NIBBLES else 1.0
                per_value = weight + 4 / group * (2 if qtype in (Q.Q4_K, Q.Q5_K) else 1)
                total += int(raw.shape[0] * K * per_value)
    return total


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (free memory plus what the kernel can reclaim, such as a mapped
    file's pages), or None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def convert(model: nn.Module, store=None) -> int:
    """Replace the decoder's products (experts' too) and the LM head whose blocks have an exact int8 form by
    A8Linear (q/k/v and gate/up one layer each, or A8Parts where their block types differ in kind). With `store`
    (weights/w8a8_store.py), the layers an earlier load kept there are taken from it instead (w8a8_store.read),
    and fresh ones kept there. Raises MemoryError, before converting, where the layers would not fit in the
    memory available. Returns how many layers were made."""
    products = [p for p in w8a8._products(model) if convertible(p[4])]
    stored = w8a8.from_store(store, products, _stored_layer) if store is not None else None
    if stored is None:  # the converted layers are all in memory before they are kept (or for good, without a store)
        need, have = converted_bytes(products), available_memory()
        if have is not None and need > have:
            raise MemoryError(f"its int8 layers would take ~{need / 2**30:.1f} GiB of memory and "
                              f"{have / 2**30:.1f} GiB are available; run without it (the file's own blocks, mapped)")
    made = {}
    for name, parent, attr, parts, layers in products:
        if stored is not None:
            made[name] = stored[name]
        else:  # (GGUF loads stack q/k/v and gate/up already: weights/quantized.py, fuse_projections)
            joint = layers[0] if len(layers) == 1 else QuantLinear.stack(layers)
            made[name] = _a8_product(list(zip(joint.blocks, joint.qtypes, strict=True)), joint.in_features,
                                     joint.bias)
            w8a8._release(layers)
        setattr(parent, attr, made[name])
        for p in parts:
            setattr(parent, p, None)
    if store is not None and stored is None:
        w8a8_store.write(store, {f"{name}.{key}": t for name, layer in made.items()
                                 for key, t in layer.tensors().items()})
    model._decode_step = None  # built again over the new layers
    return len(made)
