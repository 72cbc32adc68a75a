"""Reading GGUF files: metadata as plain Python values, tensors dequantised one at a time by the `gguf` package.

The header is parsed here rather than with `gguf.GGUFReader`, which builds a numpy view per array element and
spends ~13 s on the demo model's 300k vocabulary strings; this parser takes well under a second. Tensor data
stays memory-mapped, and dequantisation is the `gguf` package's.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..errors import ModelLoadError

# Small float32 tensors (norms, biases) are read into memory of their own rather than viewed through the map:
# touching one mapped page maps the whole large folio of page cache around it into this process (hundreds of KiB
# of the neighbouring weights), which would count ~70 MB of weights never used against a w8a8 model's RSS.
SMALL_TENSOR_BYTES = 1 << 20

# llama.cpp tensor names → the Hugging Face names our models use.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # Mixtures of experts (qwen2moe, qwen3moe): the router, and Qwen2-MoE's shared expert and its gate.
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    # Qwen3.5 (qwen35, qwen35moe) and Qwen3-Next (qwen3next): the norm before the MLP has another name, and the
    # gated-DeltaNet layers.
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight",
    "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight",
    "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_ba.weight": "linear_attn.in_proj_ba.weight",  # qwen3next: b and a fused, split at load
    "ssm_conv1d.weight": "linear_attn.conv1d.weight",
    "ssm_a": "linear_attn.A_log",
    "ssm_dt.bias": "linear_attn.dt_bias",
    "ssm_dt": "linear_attn.dt_bias",  # (ollama's published files)
    "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight",
}
# The experts' weights, one 3-D tensor [experts, out, in] per kind where the checkpoints have one per expert.
_EXPERT_NAMES = {
    "ffn_gate_exps.weight": "gate_proj.weight",
    "ffn_up_exps.weight": "up_proj.weight",
    "ffn_down_exps.weight": "down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")

# GGUF value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array, 10 u64, 11 i64, 12 f64
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_U64 = struct.Struct("<Q")
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


def has_gguf_magic(path: Path, what: str) -> bool:
    """Whether the file starts as a GGUF does; ModelLoadError naming `what` it was to be if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise ModelLoadError(f"cannot read {what} {str(path)!r}: {e.strerror}") from None


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def block_index(gguf_name: str) -> int:
    """The layer a tensor belongs to (-1 for the global ones)."""
    m = _BLOCK.fullmatch(gguf_name)
    return int(m.group(1)) if m else -1


def hf_value(hf_tensor: str, values: np.ndarray) -> np.ndarray:
    """A tensor's values as the Hugging Face checkpoint holds them, where llama.cpp's converter stores them
    transformed: A = -exp(A_log) (back to A_log), the convolution as [channels, kernel] (back to Conv1d's
    [channels, 1, kernel]). Other transforms of that converter (norm weights stored as 1 + w, value heads in
    tiled order) are followed by the model's configuration instead (ModelConfig.from_gguf)."""
    if hf_tensor.endswith("linear_attn.A_log"):
        return np.log(-values.astype(np.float32))
    if hf_tensor.endswith("linear_attn.conv1d.weight"):
        return values.reshape(values.shape[0], 1, -1)
    return values


def hf_expert_names(gguf_name: str, experts: int) -> list[str] | None:
    """For a 3-D experts tensor, the Hugging Face name of each expert's slice; None for any other tensor."""
    m = _BLOCK.fullmatch(gguf_name)
    if not m or m.group(2) not in _EXPERT_NAMES:
        return None
    return [f"model.layers.{m.group(1)}.mlp.experts.{j}.{_EXPERT_NAMES[m.group(2)]}" for j in range(experts)]


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: innermost dimension first
    qtype: Any  # gguf.GGMLQuantizationType
    offset: int  # from the start of the data section
    n_bytes: int


class GGUFFile:
    """A memory-mapped GGUF file. Nothing is dequantised until a tensor is asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            # Copy-on-write: writable views (torch.from_numpy accepts them) that never write to the file.
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{self.path}: cannot read file ({e})") from None
        try:
            self.metadata, self.tensors, data_start = _parse_header(self._map)
        except ModelLoadError:
            raise
        except (struct.error, ValueError, IndexError, UnicodeDecodeError, KeyError) as e:
            raise ModelLoadError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self._data_start = data_start
        end = max((t.offset + t.n_bytes for t in self.tensors.values()), default=0) + data_start
        if end > len(self._map):
            raise ModelLoadError(
                f"{self.path}: file is truncated ({len(self._map)} bytes, its tensors need {end})"
            )

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture"))

    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored, shaped [rows, bytes per row] (a view of the memory map)."""
        t = self.tensors[name]
        start = self._data_start + t.offset
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        return self._map[start : start + t.n_bytes].reshape(rows, -1)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in the Hugging Face shape (reversed ggml order)."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        if t.qtype == GGMLQuantizationType.F32 and t.n_bytes <= SMALL_TENSOR_BYTES:
            return self._read(t).view(np.float32).reshape(tuple(reversed(t.shape)))
        try:
            values = dequantize(self.raw(name), t.qtype)
        except NotImplementedError:
            raise ModelLoadError(
                f"{self.path}: tensor {name} uses quantisation type {t.qtype.name}, which the gguf "
                f"package cannot dequantise"
            ) from None
        values = values.reshape(tuple(reversed(t.shape))).astype(np.float32, copy=False)
        # Larger F32 tensors come back as views of the copy-on-write map: shared with the page cache, never copied.
        return values

    def read(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored, shaped [rows, bytes per row], read into memory of their own: for a
        weight that is converted at load, so the map's pages it would touch never count in the process's RSS."""
        t = self.tensors[name]
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        return self._read(t).reshape(rows, -1)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """The tensor's bytes as stored, read straight into the contiguous uint8 tensor `out` (no buffer between)."""
        t = self.tensors[name]
        if out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() != t.n_bytes:
            raise ValueError(f"{name}: needs a contiguous uint8 tensor of {t.n_bytes} bytes")
        view = memoryview(out.numpy()).cast("B")
        with open(self.path, "rb") as f:
            done = 0
            while done < t.n_bytes:
                n = os.preadv(f.fileno(), [view[done:]], self._data_start + t.offset + done)
                if n <= 0:
                    raise ModelLoadError(f"{self.path}: the file ends inside tensor {name}")
                done += n

    def _read(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes read into memory of their own (not through the map)."""
        with open(self.path, "rb") as f:  # its length was checked against the tensors when the file was opened
            return np.frombuffer(bytearray(os.pread(f.fileno(), t.n_bytes, self._data_start + t.offset)), np.uint8)

    def hf_tensors(self, layers: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(Hugging Face name, float32 array) for every tensor the text models use, one at a time; an experts
        tensor as one array per expert. Blocks from `layers` on are skipped (Qwen3.5's multi-token prediction)."""
        for name, info in self.tensors.items():
            if layers is not None and block_index(name) >= layers:
                continue
            target = hf_name(name)
            if target is not None:
                yield target, hf_value(target, self.dequantize(name))
            elif (per_expert := hf_expert_names(name, info.shape[-1])) is not None and len(info.shape) == 3:
                values = self.dequantize(name)
                for j, expert_name in enumerate(per_expert):
                    yield expert_name, values[j]


_SKIPPED = object()  # an array left unread by a header-only summary


@dataclass
class GGUFSummary:
    """What a model listing needs from a GGUF: its metadata without arrays, and a few derived facts."""

    metadata: dict[str, Any]
    n_params: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture"))

    @property
    def file_type(self) -> str | None:
        """The quantisation mix, e.g. "Q4_K_M", from general.file_type."""
        from gguf import LlamaFileType

        value = self.metadata.get("general.file_type")
        try:
            return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return None if value is None else str(value)


def read_summary(path: str | Path) -> GGUFSummary:
    """Metadata and parameter count without decoding the vocabulary: a few tens of milliseconds."""
    path = Path(path)
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
        metadata, tensors, _ = _parse_header(buf, skip_arrays=True)
    except ModelLoadError:
        raise
    except (OSError, struct.error, ValueError, IndexError, UnicodeDecodeError, KeyError) as e:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    n_params = sum(int(np.prod(t.shape)) for t in tensors.values())
    return GGUFSummary(metadata, n_params)


class _Cursor:
    def __init__(self, buf: np.ndarray, skip_arrays: bool = False):
        self.buf = memoryview(buf)
        self.pos = 0
        self.skip_arrays = skip_arrays

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        s = str(self.buf[self.pos : self.pos + n], "utf-8")
        self.pos += n
        return s

    def strings(self, count: int) -> list[str]:
        # The vocabulary and merges are ~300k strings: keep this loop free of attribute look-ups.
        unpack, buf, pos, out = _U64.unpack_from, self.buf, self.pos, []
        append = out.append
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            append(str(buf[pos : pos + n], "utf-8"))
            pos += n
        if pos > len(buf):
            raise ValueError("string array runs past the end of the file")
        self.pos = pos
        return out

    def skip_strings(self, count: int) -> None:
        unpack, buf, pos = _U64.unpack_from, self.buf, self.pos
        for _ in range(count):
            pos += 8 + unpack(buf, pos)[0]
        if pos > len(buf):
            raise ValueError("string array runs past the end of the file")
        self.pos = pos

    def value(self, vtype: int) -> Any:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if self.skip_arrays and etype == 8:
                self.skip_strings(count)
                return _SKIPPED
            if self.skip_arrays and etype in _NUMPY:
                self.pos += count * np.dtype(_NUMPY[etype]).itemsize
                return _SKIPPED
            if etype == 8:
                return self.strings(count)
            if etype in _NUMPY:
                arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        raise ValueError(f"unknown metadata value type {vtype}")


def _parse_header(
    buf: np.ndarray, skip_arrays: bool = False
) -> tuple[dict[str, Any], dict[str, TensorInfo], int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cur = _Cursor(buf, skip_arrays)
    if bytes(cur.buf[:4]) != b"GGUF":
        raise ValueError("bad magic")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ModelLoadError(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        value = cur.value(cur.scalar("<I"))
        if value is not _SKIPPED:
            metadata[key] = value
    tensors: dict[str, TensorInfo] = {}
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.scalar("<Q") for _ in range(cur.scalar("<I")))
        qtype = GGMLQuantizationType(cur.scalar("<I"))
        offset = cur.scalar("<Q")
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(dims)) // block * type_size
        tensors[name] = TensorInfo(name, dims, qtype, offset, n_bytes)
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    return metadata, tensors, data_start
