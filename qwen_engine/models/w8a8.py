"""The optional lossy mode `w8a8`: int8 weights and int8 activations, for throughput on CPUs with AVX2,
AVX-512 VNNI or AMX.

The default path keeps the model's numbers (GGUF blocks dequantised inside float32 products). This mode trades
a measured amount of accuracy for speed where float32 products are compute-bound — many sequences decoding at
once, and prefill:

- every linear layer's weight (and the LM head) is re-quantised at load to int8 in groups of 128 (or 64) values
  along each row, one scale per group (symmetric, max |w| / 127); one scale per whole row was 1.8x further
  from the float model (mean KL on the demo model, docs/benchmarks.md);
- each row of activations is quantised on the fly to int8 in groups of the same size, one scale per group
  (per-token scales lose several times more: activations have outlier channels);
- before both, each input column j of the q/k/v, o, gate/up products and the LM head is smoothed (SmoothQuant):
  the weight's column is multiplied by s_j = max|x_j|^½ / max|W_j|^½ and the activations by 1/s_j as they are
  quantised, which leaves the product unchanged but meets the activations' outlier columns halfway. max|x_j|
  comes from float passes over fixed texts (models/calibration.py) at conversion; s is kept with the int8
  layers (down_proj is left as it is: see UNSMOOTHED);
- the group dot products are exact integers (AVX2 vpmaddubsw or AVX-512 VNNI on weights packed in units of 8 or 16
  rows, or AMX tiles; kernels/int8_matmul.cpp), scaled in float32.

`benchmarks/compare.py --quantization w8a8` prints its mean KL divergence from the float32 model and its greedy
agreement; `tests/test_w8a8.py` bounds both on the demo model. Embeddings, norms and attention stay float32.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..weights import w8a8_store
from .moe import named_swiglus
from .quant import QuantLinear, dequantize

# "w8a8-vision": the same, and a vision tower's linear layers in int8 too, its attention with int8 scores and
# bf16 products of weights and values (convert_tower; bf16 SDPA where the CPU has AMX tiles); measured only on random weights at real sizes (benchmarks/vision_tower.py).
MODES = ("w8a8", "w8a8-vision")


def padded_size(in_features: int) -> int:
    """Inputs are zero-padded to a multiple of 64 (the kernels' byte stretch) where they are not one already."""
    return -(-in_features // 64) * 64


def group_size(in_features: int) -> int:
    """Activation group along the (padded) input: 128 values, or 64 where 128 does not divide it."""
    return 128 if padded_size(in_features) % 128 == 0 else 64


def weight_layout() -> str:
    """How the int8 weights are kept: "amx" (tiles, pack_amx) where the CPU has AMX, "units16" (pack_units16) in
    AVX-512 VNNI builds, "units" (pack_units) in AVX2 builds, else "rows" (no int8 kernels: the PyTorch reference
    of the same arithmetic, reference_linear)."""
    native = kernels.native()
    if native is not None and hasattr(native, "int8_has_amx") and native.int8_has_amx():
        return "amx"
    if native is not None and hasattr(native, "int8_units_layout"):
        return native.int8_units_layout() or "rows"
    return "rows"


def store_kind(calibration: list[list[int]] | None) -> str:
    """What a kept conversion depends on besides the model (weights/w8a8_store.py): the layout, and the smoothing
    with the calibration it was measured on."""
    if calibration is None:
        return weight_layout()
    digest = hashlib.sha256(json.dumps([SMOOTHING_ALPHA, UNSMOOTHED, calibration]).encode()).hexdigest()[:12]
    return f"{weight_layout()}-smooth-{digest}"


# rows per unit of a packed layout (padded to whole units); nibbles16 is the a8 mode's (models/a8.py)
PACKED_ROWS = {"amx": 32, "units": 8, "units16": 16, "nibbles16": 16}


def quantize_weight(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] → (uint8 [N, K] holding int8 values + 128, float32 scales [N, K / group]): symmetric, max |w| /
    127 per group of `group` values along each row."""
    w = weight.float().reshape(weight.shape[0], -1, group)
    scales = w.abs().amax(dim=2) / 127
    q = torch.round(w / torch.where(scales > 0, scales, 1)[:, :, None]).clamp_(-127, 127)
    return (q + 128).to(torch.uint8).view(weight.shape).contiguous(), scales.contiguous()


def quantize_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [M, K] → (int8 [M, K], scales [M, K / group]): symmetric, max |x| / 127 per group."""
    g = x.reshape(x.shape[0], -1, group)
    scales = g.abs().amax(dim=2) / 127
    q = torch.round(g / torch.where(scales > 0, scales, 1)[:, :, None]).clamp_(-127, 127)
    return q.to(torch.int8).view(x.shape), scales


SMOOTHING_ALPHA = 0.5  # 0.3-0.5 measured alike on the demo model; 0.7 was worse than none


def smoothing(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float = SMOOTHING_ALPHA) -> torch.Tensor:
    """Per input column, s = max|x|^alpha / max|W|^(1 - alpha): x / s and W * s make the same product, with the
    activations' outlier columns shrunk and the weight's columns grown to meet them."""
    return x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.float().clamp(min=1e-5).pow(1 - alpha)


def padded_to_units(rows: torch.Tensor, unit: int) -> torch.Tensor:
    """uint8 rows (int8 + 128) padded with zero weights (128) to a whole number of units of `unit` rows."""
    padded = torch.full((-(-rows.shape[0] // unit) * unit, rows.shape[1]), 128, dtype=torch.uint8)
    padded[: rows.shape[0]] = rows
    return padded


def pack_amx(rows: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] → the AMX kernel's layout: per unit of 32 rows and 64-byte stretch of K, two 1 KiB tiles
    [k / 4][row][k % 4] (N padded to 32 with zero weights)."""
    K = rows.shape[1]
    padded = padded_to_units(rows, 32)
    return padded.view(-1, 2, 16, K // 64, 16, 4).permute(0, 3, 1, 4, 2, 5).contiguous().view(-1)


def unpack_amx(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The inverse of pack_amx."""
    tiles = packed.view(-1, K // 64, 2, 16, 16, 4).permute(0, 2, 4, 1, 3, 5)
    return tiles.reshape(-1, K)[:N].contiguous()


def pack_units(rows: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] (int8 + 128) → the AVX2 kernel's layout: units of 8 rows, each [k / 4][row][k % 4], as the
    int8 values themselves (the +128 taken off: the top bit flipped), N padded to 8 with zero weights."""
    K = rows.shape[1]
    padded = padded_to_units(rows, 8)
    return padded.view(-1, 8, K // 4, 4).permute(0, 2, 1, 3).bitwise_xor(128).contiguous().view(-1)


def unpack_units(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The inverse of pack_units."""
    units = packed.view(-1, K // 4, 8, 4).permute(0, 2, 1, 3).bitwise_xor(128)
    return units.reshape(-1, K)[:N].contiguous()


def pack_units16(rows: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] (int8 + 128) → the AVX-512 VNNI kernel's layout: units of 16 rows, each [k / 4][row][k % 4],
    the bytes as they are (vpdpbusd takes them unsigned), N padded to 16 with zero weights (128)."""
    K = rows.shape[1]
    padded = padded_to_units(rows, 16)
    return padded.view(-1, 16, K // 4, 4).permute(0, 2, 1, 3).contiguous().view(-1)


def unpack_units16(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The inverse of pack_units16."""
    return packed.view(-1, K // 4, 16, 4).permute(0, 2, 1, 3).reshape(-1, K)[:N].contiguous()


PACK = {"amx": (pack_amx, unpack_amx), "units": (pack_units, unpack_units),
        "units16": (pack_units16, unpack_units16)}


def reference_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                     group: int, factors: torch.Tensor | None = None,
                     offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The same numbers as the kernel, in PyTorch (up to the order of float sums): the fallback and the tests'
    reference. `scales`: the weight's, [K / group, N]. Group dot products of int8 values stay below 2^24, so
    float32 holds them exactly. `factors` multiply x's first columns (the layer's smoothing) before it is
    quantised. `offsets` [K / group, N] (the a8 mode's K-quants: weights scale * q + offset) add offset times
    each group's sum of x as quantised."""
    if factors is not None:
        x = torch.cat([x[:, : factors.numel()] * factors, x[:, factors.numel() :]], dim=1)
    q, sx = quantize_activations(x, group)
    w = weight.to(torch.int16).sub_(128).float()
    M, N, G = q.shape[0], w.shape[0], q.shape[1] // group
    y = torch.empty(M, N)
    for m0 in range(0, M, 64):  # [rows, N, groups] at a time
        qg = q[m0 : m0 + 64].float().view(-1, G, group).transpose(0, 1)  # [G, rows, group]
        dots = torch.bmm(qg, w.view(N, G, group).permute(1, 2, 0))  # [G, rows, N], exact integers
        y[m0 : m0 + 64] = (dots * sx[m0 : m0 + 64].t()[:, :, None] * scales[:, None, :]).sum(0)
    if offsets is not None:
        sums = q.float().view(M, G, group).sum(2) * sx  # [M, groups]: each group of x as quantised, summed
        y.addmm_(sums, offsets)
    return y if bias is None else y.add_(bias)


class W8A8Linear(nn.Module):
    """y = x @ W^T + b with W as int8 rows and x quantised to int8, both per group of `group` inputs."""

    # A byte a weight (int8 + 128). The a8 mode keeps 4- and 5-bit quants in nibble units instead (models/a8.py).
    planes, zero = -1, 128

    def __init__(self, weight: torch.Tensor | list[torch.Tensor], bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None):
        """`weight`: float [N, K], or a list of row blocks stacked in order (each is quantised and dropped in
        turn, so a large weight is never whole in float32). `smooth` [K]: the weight's columns are multiplied
        by it and the inputs divided by it (`smoothing`)."""
        super().__init__()
        parts = weight if isinstance(weight, list) else [weight]
        self.out_features, self.in_features = sum(int(p.shape[0]) for p in parts), int(parts[0].shape[1])
        # Zero columns (and zero inputs) past in_features change no product.
        self.padded = padded_size(self.in_features)
        self.group = group_size(self.in_features)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.input_factors = None if smooth is None else (1 / smooth.float()).contiguous()
        self.weight_offsets = None
        native = kernels.native()

        def quantized():
            for part in parts:
                values = part.float() if smooth is None else part.float() * smooth.float()
                values = F.pad(values, (0, self.padded - self.in_features)).contiguous()
                if native is not None and hasattr(native, "int8_quantize_weight"):
                    yield native.int8_quantize_weight(values, self.group)
                else:
                    yield quantize_weight(values, self.group)

        self._pack(weight_layout(), quantized())

    def _pack(self, layout: str, blocks) -> None:
        """Keeps `blocks` ((uint8 rows [n, padded] = int8 + 128, their scales [n, groups]) in order) in `layout`.
        In a packed layout (AMX tiles, units of 8 or 16 rows) the weight is kept only packed (weight_rows() gives
        the rows back); each block is packed in turn, so no second copy of the whole weight is ever made."""
        self.layout = layout
        unit = PACKED_ROWS.get(layout, 0)
        # [groups, N]: a group's scales of adjacent outputs are adjacent, as the kernels read them
        self.weight_scales = torch.empty(self.padded // self.group, self.out_features)
        if unit:
            rows = -(-self.out_features // unit) * unit
            self.packed = torch.empty(rows * self.padded * self.eighths // 8, dtype=torch.uint8)
            self.weight_u8 = None
        else:
            self.packed = None
            self.weight_u8 = torch.empty(self.out_features, self.padded, dtype=torch.uint8)
        row, pending = 0, []  # pending: rows not yet packed (a unit takes `unit` rows at a time)
        for u8, scales in blocks:
            rows = int(u8.shape[0])
            self.weight_scales[:, row : row + rows] = scales.t()
            row += rows
            if not unit:
                self.weight_u8[row - rows : row] = u8
                continue
            pending.append(u8)
            if row % unit == 0 or row == self.out_features:
                block = torch.cat(pending) if len(pending) > 1 else pending[0]
                start = (row - block.shape[0]) * self.padded * self.eighths // 8
                packed = self._packed_form(block)
                self.packed[start : start + packed.numel()] = packed
                pending = []

    @property
    def eighths(self) -> int:
        """Eighths of a byte a packed weight takes: 8, or 4 + planes in nibble units."""
        return 8 if self.planes < 0 else 4 + self.planes

    def _packed_form(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 rows (int8 + 128), a whole number of units (or the last rows), in this layer's packed layout."""
        return PACK[self.layout][0](rows)

    @classmethod
    def stored(cls, in_features: int, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
               factors: torch.Tensor | None = None, offsets: torch.Tensor | None = None, group: int | None = None,
               layout: str | None = None, planes: int = -1, zero: int = 128) -> W8A8Linear:
        """A layer from the tensors `tensors()` gave (the weight in this CPU's layout), taken as they are. (The a8
        mode's layers give their group, offsets, layout and nibble form: models/a8.py.)"""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.planes, layer.zero = planes, zero
        layer.out_features, layer.in_features = int(scales.shape[-1]), in_features
        layer.padded, layer.group = padded_size(in_features), group or group_size(in_features)
        layer.weight_scales, layer.bias, layer.input_factors = scales, bias, factors
        layer.weight_offsets = offsets
        layer.layout = layout or weight_layout()
        unit = PACKED_ROWS.get(layer.layout, 0)
        rows = -(-layer.out_features // unit) * unit if unit else layer.out_features
        if weight.dtype != torch.uint8 or weight.numel() * 8 != rows * layer.padded * layer.eighths or (
                scales.dtype != torch.float32 or scales.shape != (layer.padded // layer.group, layer.out_features)) or (
                bias is not None and bias.shape != (layer.out_features,)) or (
                factors is not None and (factors.dtype != torch.float32 or factors.shape != (in_features,))) or (
                offsets is not None and offsets.shape != scales.shape):
            raise ValueError(f"stored int8 layer does not fit {layer.out_features} x {in_features}")
        layer.packed, layer.weight_u8 = (weight, None) if unit else (None, weight.view(-1, layer.padded))
        return layer

    def tensors(self) -> dict[str, torch.Tensor]:
        """What `stored` takes back: the weight as kept, its scales, the bias and the input factors if any."""
        kept = {"weight": self.packed if self.packed is not None else self.weight_u8, "scales": self.weight_scales}
        if self.bias is not None:
            kept["bias"] = self.bias
        if self.input_factors is not None:
            kept["factors"] = self.input_factors
        return kept

    def weight_rows(self) -> torch.Tensor:
        """uint8 [N, K]: the int8 weight + 128, row by row."""
        if self.packed is not None:
            return self._unpacked_rows()
        return self.weight_u8

    def _unpacked_rows(self) -> torch.Tensor:
        return PACK[self.layout][1](self.packed, self.out_features, self.padded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        native = kernels.native()
        if native is not None and self.packed is not None:  # the kernels pad x with zeros as they quantise it
            if self.layout == "amx":
                y = native.int8_linear_amx(x2, self.packed, self.out_features, self.weight_scales, self.bias,
                                           self.group, self.input_factors)
            else:
                y = native.int8_linear_units(x2, self.packed, self.out_features, self.weight_scales, self.bias,
                                             self.group, self.input_factors, self.weight_offsets, self.planes,
                                             self.zero)
        else:
            if self.padded != self.in_features:
                x2 = F.pad(x2, (0, self.padded - self.in_features))
            y = reference_linear(x2, self.weight_rows(), self.weight_scales, self.bias, self.group, self.input_factors,
                                 self.weight_offsets)
        return y.view(*lead, self.out_features)

    def weight_float(self) -> torch.Tensor:
        """The int8 weight as float32 [N, K] (what the products multiply by, up to the activations' rounding),
        its smoothing undone."""
        values = (self.weight_rows().to(torch.int16) - 128).float().view(self.out_features, -1, self.group)
        w = values * self.weight_scales.t()[:, :, None]
        if self.weight_offsets is not None:
            w = w + self.weight_offsets.t()[:, :, None]
        w = w.reshape(self.out_features, -1)[:, : self.in_features]
        return w if self.input_factors is None else w * self.input_factors

    def extra_repr(self) -> str:
        smoothed = ", smoothed" if self.input_factors is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}{smoothed}"


ROWS_AT_ONCE = 8192  # weight rows dequantised at a time while converting (~30 MB of float32 for the LM head)


def _dense(layers: list[nn.Module]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The float weight of layers applied side by side (outputs concatenated), as lazily made row blocks, and
    their joint bias."""
    parts, biases, rows = [], [], []
    for layer in layers:
        if isinstance(layer, QuantLinear):
            for blocks, qtype in zip(layer.blocks, layer.qtypes, strict=True):
                for r in range(0, blocks.shape[0], ROWS_AT_ONCE):
                    parts.append(_Rows(blocks[r : r + ROWS_AT_ONCE], qtype, layer.in_features))
            biases.append(layer.bias)
            rows.append(layer.out_features)
        elif isinstance(layer, nn.Linear):
            weight = layer.weight.detach()
            parts.extend(weight[r : r + ROWS_AT_ONCE] for r in range(0, weight.shape[0], ROWS_AT_ONCE))
            biases.append(None if layer.bias is None else layer.bias.detach().float())
            rows.append(layer.out_features)
        else:
            raise TypeError(f"w8a8 cannot convert {type(layer).__name__}")
    if all(b is None for b in biases):
        return parts, None
    return parts, torch.cat([b if b is not None else torch.zeros(n) for b, n in zip(biases, rows, strict=True)])


class _Rows:
    """Rows of a GGUF weight, dequantised when W8A8Linear asks for them (shape first, values on .float())."""

    def __init__(self, blocks: torch.Tensor, qtype, in_features: int):
        self.blocks, self.qtype, self.shape = blocks, qtype, (int(blocks.shape[0]), in_features)

    def float(self) -> torch.Tensor:
        return dequantize(self.blocks, self.qtype, self.shape[1])


def _release(layers: list[nn.Module]) -> None:
    """Give back the memory a conversion leaves behind, where the C library allows (elsewhere nothing happens):
    - the GGUF bytes just converted, read once, would stay in this process's resident memory next to their int8
      copy: MADV_PAGEOUT lets the OS reclaim them (the data stays; it is re-read if touched again, as the
      embedding rows are);
    - the float32 scratch (tens of MB, freed in turn) lands on glibc's heap between the int8 weights kept, and
      the heap holds on to what is freed: without malloc_trim the demo model's first load peaked at 1.0-1.75 GB
      by run and kept ~450 MB of free heap."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    page = mmap.PAGESIZE
    for layer in layers:
        for blocks in getattr(layer, "blocks", []):
            start = (blocks.data_ptr() + page - 1) // page * page
            end = (blocks.data_ptr() + blocks.numel()) // page * page
            if end > start:
                libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 21)  # MADV_PAGEOUT
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _int8(layers: list[nn.Module], x_absmax: torch.Tensor | None = None) -> W8A8Linear:
    """Layers applied side by side as one W8A8Linear (the memory their conversion used then given back), smoothed
    where their input's max |x| per column is given."""
    parts, bias = _dense(layers)
    smooth = None
    if x_absmax is not None:
        w_absmax = torch.stack([part.float().abs().amax(dim=0) for part in parts]).amax(dim=0)
        smooth = smoothing(x_absmax, w_absmax)
    made = W8A8Linear(parts, bias, smooth)
    _release(layers)
    return made


# Products left unsmoothed. down_proj's input, silu(gate) * up, has rare spikes in single columns that a short
# calibration text misses (on held-out text the demo's maxima exceeded the calibrated ones up to 20-55x, against
# 2-4x for the other inputs); smoothing it made the demo's KL worse than smoothing the others alone (0.00227
# against 0.00189 nats on compare.py's corpus; 0.00244 unsmoothed), and still does with weight scales per group
# (0.00131 against 0.00106; 0.00159 unsmoothed).
UNSMOOTHED = ("down_proj",)


def calibrate(model: nn.Module, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """max |x| per input column of every product `convert` makes, over float passes of `model` on `sequences`
    (token ids; each from position 0)."""
    from ..engine.kv_cache import KVCache

    absmax: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        m = x.detach().reshape(-1, x.shape[-1]).float().abs().amax(dim=0)
        absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)

    hooks = [layers[0].register_forward_pre_hook(lambda _, args, name=name: record(name, args[0]))
             for name, _, attr, _, layers in _products(model) if name != "lm_head" and attr not in UNSMOOTHED]
    cfg = model.config
    try:
        for ids in sequences:
            cache = KVCache.for_model(cfg, len(ids))
            with torch.no_grad():
                hidden = model(torch.tensor(ids, dtype=torch.long), torch.arange(len(ids)), cache)
            record("lm_head", hidden)  # the LM head runs outside the model's forward
    finally:
        for hook in hooks:
            hook.remove()
    return absmax


def _products(model: nn.Module) -> list[tuple[str, nn.Module, str, tuple[str, ...], list[nn.Module]]]:
    """(name, module, attribute, the separate layers it may stand for, the layers now there) of every product
    the mode converts."""
    found = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = getattr(layer, "self_attn", None), layer.mlp
        if attn is not None:
            wanted = [(attn, "self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")), (attn, "self_attn", "o_proj", ())]
        else:  # a linear-attention layer (Qwen3.5): its projections one by one, as its forward calls them
            mixer = layer.linear_attn
            wanted = [(mixer, "linear_attn", attr, ()) for attr in
                      ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")]
        for where, swiglu in named_swiglus(mlp, "mlp"):
            wanted += [(swiglu, where, "gate_up_proj", ("gate_proj", "up_proj")), (swiglu, where, "down_proj", ())]
        for parent, where, attr, parts in wanted:
            current = getattr(parent, attr, None)
            layers = [current] if current is not None else [getattr(parent, p, None) for p in parts]
            if layers and all(x is not None for x in layers):
                found.append((f"model.layers.{i}.{where}.{attr}", parent, attr, parts, layers))
    found.append(("lm_head", model, "lm_head", (), [model.lm_head]))
    return found


def _stored_layer(in_features: int, tensors: dict[str, torch.Tensor], name: str) -> W8A8Linear:
    return W8A8Linear.stored(in_features, tensors[f"{name}.weight"], tensors[f"{name}.scales"],
                             tensors.get(f"{name}.bias"), tensors.get(f"{name}.factors"))


def from_store(path: Path, products: list, layer_from=_stored_layer) -> dict[str, W8A8Linear] | None:
    """The layers kept in `path` by an earlier load, if it holds exactly this model's products (the path names the
    smoothing they were made with: store_kind). `layer_from(in_features, tensors, name)` makes one (a8 has its
    own)."""
    tensors = w8a8_store.read(path)
    if tensors is None:
        return None
    made = {}
    try:
        for name, _, _, _, layers in products:
            layer = layer_from(int(layers[0].in_features), tensors, name)
            if layer.out_features != sum(int(p.out_features) for p in layers):
                return None
            made[name] = layer
    except (KeyError, ValueError, AttributeError):
        return None
    return made


def convert(model: nn.Module, store: Path | None = None, calibration: list[list[int]] | None = None) -> int:
    """Replace the decoder's products and the LM head by W8A8Linear, one at a time (only one weight is held in
    float32 at once); q/k/v and gate/up become one layer each, as in the quantised GGUF path (rows are
    independent and share their input's quantisation, so stacking changes no number). With `store`
    (weights/w8a8_store.py), layers an earlier load kept there are taken from it instead, and freshly made ones are
    kept there. With `calibration` (token id sequences; models/calibration.py), the products are smoothed by max |x| per
    input column measured on them first. Returns how many layers were made. A vision tower stays float32: its
    accuracy under int8 could only be measured on random weights here (convert_linears does it on request)."""
    products = [p for p in _products(model) if all(isinstance(x, (QuantLinear, nn.Linear)) for x in p[4])]
    stored = from_store(store, products) if store is not None else None
    absmax = calibrate(model, calibration) if stored is None and calibration else {}
    made = {}
    for name, parent, attr, parts, layers in products:
        made[name] = stored[name] if stored is not None else _int8(layers, absmax.get(name))
        setattr(parent, attr, made[name])
        for p in parts:  # the separate layers are folded into `attr`
            setattr(parent, p, None)
    if store is not None and stored is None:
        tensors = {f"{name}.{key}": t for name, layer in made.items() for key, t in layer.tensors().items()}
        w8a8_store.write(store, tensors)
    model._decode_step = None  # built again over the new layers
    return len(made)


def convert_tower(tower: nn.Module) -> int:
    """The "w8a8-vision" mode's vision tower: its linear layers as W8A8Linear and its attention with int8 scores
    (VisionTransformer.lossy_attention("int8"), where the CPU has AVX512-BF16 and VNNI; bf16 SDPA where it has AMX
    tiles: vision.segment_attention). Returns the layers made."""
    made = convert_linears(tower)
    if hasattr(tower, "lossy_attention"):
        tower.lossy_attention("int8")
        tower.reuse_freed_memory = True  # its int8 products lose ~20 % to page faults otherwise (models/heap.py)
    return made


def convert_linears(module: nn.Module) -> int:
    """Every nn.Linear inside `module` as a W8A8Linear — for a vision tower, on request only (the "w8a8-vision"
    mode, not "w8a8": on random weights at real sizes its merged tokens move by 3-6 % of their largest value, and
    no real checkpoint was at hand to tell what that does to answers; benchmarks/vision_tower.py measures it)."""
    made = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, W8A8Linear(*_dense([child])))
                made += 1
    return made
