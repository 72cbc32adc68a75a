"""A GGUF model whose weights stay in the file's quantised blocks, memory-mapped (the default for GGUF on CPU).

Linear weights of a type the native kernels read (models/quant.py: KERNEL_TYPES) become QuantLinear views of the
mapped file; the token embedding becomes a QuantEmbedding that dequantises only the rows it looks up. Norm
weights, biases and float32 matrices are plain tensors over the same mapping (no copy). Anything else — a block
type without a kernel — is dequantised to float32 at load, exactly as the reference path does.

Loading therefore reads only the header: the operating system pages weights in as the first forward pass
touches them, and they are shared with the page cache instead of being copied.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..config import ModelConfig
from ..errors import ModelLoadError
from ..kernels import native as native_kernels
from ..models.layers import RotaryEmbedding
from ..models.moe import swiglus
from ..models.quant import BlockType, OwnType, QuantEmbedding, QuantLinear, block_size, has_kernel
from ..models.qwen import QwenForCausalLM
from .arena import WeightArena, huge_pages_wanted
from .gguf import GGUFFile, block_index, hf_expert_names, hf_name, hf_value
from .linear_projections import ba_rows

Q = GGMLQuantizationType


def build_quantized(config: ModelConfig, gguf: GGUFFile, path: Path, layers_replaced: bool = False) -> QwenForCausalLM:
    """layers_replaced: the linear layers are about to be replaced (by w8a8), so they stay views of the file's
    blocks: none is re-laid (recode) or copied into huge pages (_streamed_sizes)."""
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    # (A vision tower is not in this file: weights/mmproj.py loads it from the projector file.)
    expected = {name for name, _ in model.named_parameters() if not name.startswith("visual.")}
    blocks: dict[str, tuple[torch.Tensor, BlockType, int]] = {}  # module name → (bytes, type, K)
    loaded = set()
    recoded = {} if layers_replaced else _recoded_sizes(model, gguf, expected)
    size = sum(s for _, s in recoded.values())
    copied = {} if layers_replaced else _streamed_sizes(model, gguf, expected, recoded)
    huge = huge_pages_wanted(size + sum(copied.values()))
    if huge:
        size += sum(copied.values())
    else:  # in small pages a copy streams no faster than the file's own pages
        copied = {}
    arena = WeightArena(size, huge_pages=huge) if size else None
    for gguf_name, info in gguf.tensors.items():
        if block_index(gguf_name) >= config.num_layers:  # multi-token-prediction layers (Qwen3.5): not run here
            continue
        experts = hf_expert_names(gguf_name, info.shape[-1]) if len(info.shape) == 3 else None
        if experts is not None:  # [experts, out, in]: each expert's rows are a slice of the same blocks
            _take_experts(model, gguf, gguf_name, experts, expected, blocks, loaded, path)
            continue
        name = hf_name(gguf_name)
        if name is not None and name.endswith("linear_attn.in_proj_ba.weight"):  # qwen3next: b, a rows fused
            _take_ba(model, gguf, gguf_name, name.removesuffix("_ba.weight"), config, blocks, loaded)
            continue
        if name is None or name not in expected:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        shape = tuple(reversed(info.shape))  # [out, in]
        if name.endswith(("linear_attn.A_log", "linear_attn.conv1d.weight")):  # small, stored transformed
            value = torch.from_numpy(hf_value(name, _float32(gguf, gguf_name, shape)).copy())
            if value.shape != getattr(module, attr).shape:
                raise ModelLoadError(f"{path}: tensor {name} has shape {tuple(value.shape)}, expected "
                                     f"{tuple(getattr(module, attr).shape)}")
            setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
            loaded.add(name)
            continue
        if tuple(getattr(module, attr).shape) == (1, *shape):  # a one-row weight written as a vector
            shape = (1, *shape)
        if tuple(getattr(module, attr).shape) != shape:
            raise ModelLoadError(f"{path}: tensor {name} has shape {shape}, expected {tuple(getattr(module, attr).shape)}")
        if len(shape) == 2 and info.qtype != GGMLQuantizationType.F32 and has_kernel(info.qtype, shape[1]):
            if gguf_name in recoded:
                qtype = recoded[gguf_name][0]
                data = _relay(qtype)(torch.from_numpy(gguf.read(gguf_name)), shape[1])
                blocks[module_name] = (arena.hold(data), qtype, shape[1])
            elif gguf_name in copied:
                data = arena.take(tuple(gguf.raw(gguf_name).shape))
                gguf.read_into(gguf_name, data)
                blocks[module_name] = (data, info.qtype, shape[1])
            else:
                blocks[module_name] = (torch.from_numpy(gguf.raw(gguf_name)), info.qtype, shape[1])
        else:
            setattr(module, attr, torch.nn.Parameter(torch.from_numpy(_float32(gguf, gguf_name, shape)),
                                                     requires_grad=False))
        loaded.add(name)
    missing = sorted(expected - loaded - {"lm_head.weight"})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{path}: checkpoint lacks tensors {shown}")

    for module_name, (data, qtype, in_features) in blocks.items():
        old = model.get_submodule(module_name)
        if isinstance(old, torch.nn.Embedding):
            replace_module(model, module_name, QuantEmbedding(data, qtype, in_features))
        else:
            bias = linear_bias(old, module_name, path)
            replace_module(model, module_name, QuantLinear([(data, qtype)], in_features, bias))

    if config.tie_word_embeddings or "lm_head.weight" not in loaded:
        tie_lm_head(model)
    fuse_projections(model)
    model.model.rotary = RotaryEmbedding(config.rope, config.rotary_dim)
    return model.eval()


def _take_ba(model: QwenForCausalLM, gguf: GGUFFile, gguf_name: str, module_name: str, config: ModelConfig,
             blocks: dict, loaded: set[str]) -> None:
    """Qwen3-Next's fused `ssm_ba` rows as the DeltaNet layer's in_proj_b and in_proj_a (rows copied: 2·Hv)."""
    info = gguf.tensors[gguf_name]
    in_features = int(info.shape[0])
    parent = module_name.removesuffix("in_proj")  # "model.layers.N.linear_attn."
    for rows, target in zip(ba_rows(config.linear_attention), ("in_proj_b", "in_proj_a"), strict=True):
        if info.qtype != GGMLQuantizationType.F32 and has_kernel(info.qtype, in_features):
            blocks[parent + target] = (torch.from_numpy(gguf.raw(gguf_name))[rows].contiguous(), info.qtype,
                                       in_features)
        else:
            values = torch.from_numpy(_float32(gguf, gguf_name, (int(info.shape[1]), in_features)))[rows]
            model.get_submodule(parent + target).weight = torch.nn.Parameter(values.contiguous(), requires_grad=False)
        loaded.add(parent + target + ".weight")


def _take_experts(model: QwenForCausalLM, gguf: GGUFFile, gguf_name: str, names: list[str], expected: set[str],
                  blocks: dict, loaded: set[str], path: Path) -> None:
    """The experts of one 3-D GGUF tensor, each as a view of its rows in the file's blocks (or float32 where no
    kernel reads the type)."""
    info = gguf.tensors[gguf_name]
    experts, rows, in_features = (int(d) for d in reversed(info.shape))
    missing = [n for n in names if n not in expected]
    if missing:
        raise ModelLoadError(f"{path}: tensor {gguf_name} holds {experts} experts, but the model has "
                             f"{len(names) - len(missing)} in that layer")
    module = model.get_submodule(names[0].rpartition(".")[0])
    if (module.out_features, module.in_features) != (rows, in_features):
        raise ModelLoadError(f"{path}: tensor {gguf_name} has experts of shape {(rows, in_features)}, expected "
                             f"{(module.out_features, module.in_features)}")
    if info.qtype != GGMLQuantizationType.F32 and has_kernel(info.qtype, in_features):
        raw = torch.from_numpy(gguf.raw(gguf_name)).view(experts, rows, -1)
        for j, name in enumerate(names):
            blocks[name.rpartition(".")[0]] = (raw[j], info.qtype, in_features)
    else:
        values = _float32(gguf, gguf_name, (experts, rows, in_features))
        for j, name in enumerate(names):
            module = model.get_submodule(name.rpartition(".")[0])
            module.weight = torch.nn.Parameter(torch.from_numpy(values[j]), requires_grad=False)
    loaded.update(names)


def _recoded_sizes(model: QwenForCausalLM, gguf: GGUFFile, expected: set[str]) -> dict[str, tuple[BlockType, int]]:
    """GGUF tensor name → (its new block type, its bytes in the arena), for the weights build_quantized re-lays
    (recode). They go to one WeightArena, sized before any is converted, so that loading never holds two copies
    of them."""
    sizes = {}
    for gguf_name, info in gguf.tensors.items():
        name = hf_name(gguf_name)
        if name is None or name not in expected or info.qtype not in (Q.Q5_0, Q.Q6_K) or len(info.shape) != 2:
            continue
        module_name, _, attr = name.rpartition(".")
        rows, in_features = int(info.shape[1]), int(info.shape[0])
        if attr == "weight" and has_kernel(info.qtype, in_features):
            qtype = recode(model.get_submodule(module_name), info.qtype, in_features)
            if qtype is not None:
                block, size = block_size(qtype)
                sizes[gguf_name] = (qtype, WeightArena.size_for_bytes(rows * in_features // block * size))
    return sizes


def _streamed_sizes(model: QwenForCausalLM, gguf: GGUFFile, expected: set[str], recoded: dict) -> dict[str, int]:
    """GGUF tensor name → its bytes in the arena, for the weights kept in the file's blocks that a decode step
    reads whole: the linear layers', and the token embedding's when it is the output projection too (tied)."""
    tied = model.config.tie_word_embeddings or "output.weight" not in gguf.tensors
    sizes = {}
    for gguf_name, info in gguf.tensors.items():
        name = hf_name(gguf_name)
        if name is None or name not in expected or gguf_name in recoded or len(info.shape) != 2:
            continue
        if not name.endswith(".weight") or info.qtype == Q.F32 or not has_kernel(info.qtype, int(info.shape[0])):
            continue
        if isinstance(model.get_submodule(name.rpartition(".")[0]), torch.nn.Embedding) and not tied:
            continue
        sizes[gguf_name] = WeightArena.size_for_bytes(info.n_bytes)
    return sizes


def _relay(qtype: BlockType):
    """The native function that converts a file's weight to `qtype` (the re-layouts `recode` picks)."""
    native = native_kernels()
    return {Q.Q8_0: native.q5_0_as_q8_0, OwnType.Q5_0_FIELDS: native.q5_0_as_fields,
            OwnType.Q6_K_FIELDS: native.q6_k_as_fields}[qtype]


def recode(module: torch.nn.Module, qtype: BlockType, in_features: int) -> BlockType | None:
    """The block type a Q5_0 or Q6_K weight of this module is re-laid in at load, if any: where the kernels run
    the file's layout slowly (AVX2 builds, and AVX-512 ones on AMD's Zen 4: prefers_fields in
    kernels/quant_matmul.cpp), for linear layers (an embedding reads a row a token). The values are the same
    float32s; the weight lives in memory of its own instead of the file's map.

    Q5_0 rows of a multiple of 128 values become Q5_0_FIELDS (the values in 5-bit lane fields, 104 bytes per
    128 values against Q5_0's 88: a decode as cheap as Q8_0's, ~24 % fewer bytes than Q8_0), others Q8_0 (136
    bytes). QWEN_ENGINE_RECODE_Q5_0=0 keeps the file's Q5_0 blocks, =q8_0 takes Q8_0 for every row length.
    Q6_K becomes Q6_K_FIELDS (6-bit lane fields, the same 210 bytes a block); QWEN_ENGINE_RECODE_Q6_K=0 keeps
    the file's Q6_K."""
    variable = "QWEN_ENGINE_RECODE_Q5_0" if qtype == Q.Q5_0 else "QWEN_ENGINE_RECODE_Q6_K"
    choice = os.environ.get(variable, "1")
    if isinstance(module, torch.nn.Embedding) or choice == "0" or qtype not in (Q.Q5_0, Q.Q6_K):
        return None
    native = native_kernels()
    if native is None or not hasattr(native, "prefers_fields") or not native.prefers_fields():
        return None
    if qtype == Q.Q6_K:
        return OwnType.Q6_K_FIELDS if hasattr(native, "q6_k_as_fields") else None
    if choice != "q8_0" and in_features % block_size(OwnType.Q5_0_FIELDS)[0] == 0 and hasattr(native, "q5_0_as_fields"):
        return OwnType.Q5_0_FIELDS
    return Q.Q8_0


def fuse_projections(model: QwenForCausalLM) -> None:
    """q/k/v and gate/up become one stacked QuantLinear each: one kernel call instead of three or two. (Stacking
    the four input projections of Qwen3.5's DeltaNet layers as well measured no faster: not done.)"""
    for layer in model.model.layers:
        attn = getattr(layer, "self_attn", None)  # (hybrid models: absent from linear-attention layers)
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj] if attn is not None else []
        if qkv and all(isinstance(p, QuantLinear) for p in qkv):
            attn.qkv_proj = QuantLinear.stack(qkv)
            del attn.q_proj, attn.k_proj, attn.v_proj
        for mlp in swiglus(layer.mlp):
            gate_up = [mlp.gate_proj, mlp.up_proj]
            if all(isinstance(p, QuantLinear) for p in gate_up):
                mlp.gate_up_proj = QuantLinear.stack(gate_up)
                del mlp.gate_proj, mlp.up_proj


def _float32(gguf: GGUFFile, name: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        values = gguf.dequantize(name)
    except ModelLoadError:
        raise
    except Exception as e:  # a truncated file shows up as a short buffer while dequantising
        raise ModelLoadError(f"{gguf.path}: damaged tensor data ({type(e).__name__}: {e})") from None
    return values.reshape(shape)


def replace_module(model: torch.nn.Module, module_name: str, new: torch.nn.Module) -> None:
    """Put `new` where the submodule `module_name` is."""
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def linear_bias(old: torch.nn.Module, module_name: str, path: Path | None) -> torch.Tensor | None:
    """The loaded bias of a linear layer being replaced; one still on the meta device was not in the checkpoint."""
    if old.bias is None:
        return None
    if old.bias.device.type == "meta":
        raise ModelLoadError(f"{path or 'the model'}: checkpoint lacks tensor {module_name}.bias")
    return old.bias


def tie_lm_head(model: QwenForCausalLM) -> None:
    """The output projection shares the token embedding's weight (tied embeddings, or no output tensor saved)."""
    embed = model.model.embed_tokens
    if isinstance(embed, QuantEmbedding):
        model.lm_head = embed.as_linear()
    else:
        model.lm_head.weight = embed.weight
