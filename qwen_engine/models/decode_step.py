"""Decode steps in one native call: every decoder layer of a step in which each sequence adds one token.

A decode step of a small model is mostly small operations (norms, SiLU, residual adds, splits, the rotation),
each costing more to dispatch from Python than to compute. `kernels/decode_step.cpp` runs the whole stack of
layers natively over the same weights — GGUF blocks through the quantised kernels, float32 weights read in
place — and the same KV pool; for hybrid models (Qwen3.5, Qwen3-Next) also their DeltaNet layers, over the
same recurrent state pools. The PyTorch layers (models/qwen.py) stay the reference: prefill, vision rows,
non-float32 dtypes, CUDA and machines without the kernels use them, and tests compare the two.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from .a8 import A8Parts
from .layers import ZeroCenteredRMSNorm
from .moe import ExpertMixture, named_swiglus
from .quant import GEMV_MAX_ROWS, QuantLinear
from .w8a8 import W8A8Linear

F32 = 0  # ggml's type number for float32 rows


def _segments(layers: list[nn.Module]) -> tuple[list[torch.Tensor], list[int], torch.Tensor | None]:
    """Weight segments (uint8 rows) and block types of layers applied side by side, and their joint bias."""
    blocks: list[torch.Tensor] = []
    types: list[int] = []
    biases: list[torch.Tensor | None] = []
    for layer in layers:
        if _int8_parts(layer):  # set afterwards (DecodeStep.set_int8)
            return [], [], None
        if isinstance(layer, QuantLinear):
            blocks.extend(layer.blocks)
            types.extend(layer._type_ids)
            biases.append(layer.bias)
        elif isinstance(layer, nn.Linear):
            weight = layer.weight.detach().contiguous()
            blocks.append(weight.view(torch.uint8))  # [rows, 4 · in_features] bytes, read in place
            types.append(F32)
            biases.append(None if layer.bias is None else layer.bias.detach().float())
        else:
            raise TypeError(f"no native decode for {type(layer).__name__}")
    if all(b is None for b in biases):
        return blocks, types, None
    rows = [sum(int(b.shape[0]) for b in layer.blocks) if isinstance(layer, QuantLinear) else layer.out_features
            for layer in layers]
    bias = torch.cat([b if b is not None else torch.zeros(n) for b, n in zip(biases, rows, strict=True)])
    return blocks, types, bias.contiguous()


def _float32_cpu(model: nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return all(t.device.type == "cpu" for t in tensors) and all(
        t.dtype == torch.float32 for t in model.parameters() if t.is_floating_point())


def build(model: nn.Module):
    """The native decode step for a QwenForCausalLM, or None where it does not apply (then the PyTorch layers run)."""
    native = kernels.native()
    if native is None or not hasattr(native, "DecodeStep") or not _float32_cpu(model.model.layers):
        return None
    cfg = model.config
    step = native.DecodeStep(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                             cfg.rms_norm_eps, _norm_scale(model.model.norm), GEMV_MAX_ROWS)
    int8 = hasattr(native, "int8_linear_units")
    for index, layer in enumerate(model.model.layers):
        attn, mlp = getattr(layer, "self_attn", None), layer.mlp
        mixture = mlp if isinstance(mlp, ExpertMixture) else None
        if mixture is not None:  # the dense MLP's slots stay empty: set_moe below gives the layer its experts
            projections: dict[str, list[nn.Module]] = {"gate_up": [], "down": []}
        else:
            gate_up = [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj]
            projections = {"gate_up": gate_up, "down": [mlp.down_proj]}
        if attn is not None:
            qkv = [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
            projections |= {"qkv": qkv, "o": [attn.o_proj]}
        else:  # a hybrid's gated DeltaNet layer
            mixer = layer.linear_attn
            projections |= {"in_qkv": [mixer.in_proj_qkv], "in_z": [mixer.in_proj_z], "in_b": [mixer.in_proj_b],
                            "in_a": [mixer.in_proj_a], "out_proj": [mixer.out_proj]}
        try:
            parts = {name: _segments(p) for name, p in projections.items()}
            moe_args = _mixture_args(mixture) if mixture is not None else None
        except TypeError:
            return None
        if moe_args is None and mixture is not None:
            return None
        w8 = {name: int8 for name, p in projections.items() if p and (int8 := _int8_parts(p[0]))}
        if mixture is not None:  # the a8 mode's experts (set after set_moe, which makes their slots)
            w8 |= _expert_int8(mixture)
        if any(bias is not None for name, (_, _, bias) in parts.items() if name != "qkv") or any(
                p.bias is not None for n in w8 if n != "qkv" for p in w8[n]):
            return None  # Qwen has biases on q/k/v only; anything else is not this architecture
        if w8 and (not int8 or any(p.packed is None for ps in w8.values() for p in ps)):  # (x is padded natively)
            return None
        norms = _norm_scale(layer.input_layernorm), _norm_scale(layer.post_attention_layernorm)
        mlp_parts = (*parts["gate_up"][:2], *parts["down"][:2])
        if attn is not None:
            heads = (None, None) if attn.q_norm is None else (_norm_scale(attn.q_norm), _norm_scale(attn.k_norm))
            step.add_layer(*norms, *heads, *parts["qkv"], *parts["o"][:2], *mlp_parts)
            step.set_attention(index, attn.layer, cfg.rotary_dim, attn.output_gate)
        else:
            names = ("in_qkv", "in_z", "in_b", "in_a", "out_proj")
            step.add_linear_layer(*norms, [parts[n][0] for n in names], [parts[n][1] for n in names],
                                  mixer.conv1d.weight.detach()[:, 0].contiguous(), mixer.A_log.detach(),
                                  mixer.dt_bias.detach(), mixer.norm.weight.detach(), mixer.num_k_heads, mixer.tiled,
                                  mixer.index, *mlp_parts)
        if moe_args is not None:
            step.set_moe(index, *moe_args)
        for name, ps in w8.items():
            for i, p in enumerate(ps):
                step.set_int8(index, name, p.packed, p.weight_scales, p.bias, p.group, p.out_features,
                              p.input_factors, p.weight_offsets, p.layout == "amx", p.planes, p.zero, append=i > 0)
    return step


def _int8_parts(layer: nn.Module) -> list[W8A8Linear]:
    """The int8 products a layer is made of, side by side (one, or a8's A8Parts); empty for any other layer."""
    if isinstance(layer, W8A8Linear):
        return [layer]
    return list(layer.parts) if isinstance(layer, A8Parts) else []


def _expert_int8(mixture: ExpertMixture) -> dict[str, list[W8A8Linear]]:
    """A mixture's int8 products by DecodeStep.set_int8's names for them ("experts.3.gate_up", "shared_expert.down")."""
    found = {}
    for owner, mlp in named_swiglus(mixture, "mlp"):
        for kind, layer in (("gate_up", mlp.gate_up_proj), ("down", mlp.down_proj)):
            if int8 := _int8_parts(layer):
                found[f"{owner.removeprefix('mlp.')}.{kind}"] = int8
    return found


def _norm_scale(norm: nn.Module) -> torch.Tensor:
    """What an RMSNorm multiplies by: its weight, or 1 + weight for Qwen3.5's zero-centred norms (computed as
    ZeroCenteredRMSNorm computes it, so the two paths multiply by the same floats)."""
    if isinstance(norm, ZeroCenteredRMSNorm):
        return 1.0 + norm.weight.detach().float()
    return norm.weight.detach()


def _mixture_args(mixture: ExpertMixture) -> tuple | None:
    """DecodeStep.set_moe's arguments after the layer index, or None if a product has a bias (not Qwen's)."""
    router, router_types, router_bias = _segments([mixture.gate])

    def expert(mlp) -> tuple[list, list, list, list] | None:
        gate_up = [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj]
        gu, gu_types, gu_bias = _segments(gate_up)
        down, down_types, down_bias = _segments([mlp.down_proj])
        return None if gu_bias is not None or down_bias is not None else (gu, gu_types, down, down_types)

    experts = [expert(e) for e in mixture.experts]
    shared = expert(mixture.shared_expert) if mixture.shared_expert is not None else ([], [], [], [])
    shared_gate, shared_gate_types, shared_gate_bias = (_segments([mixture.shared_expert_gate])
                                                        if mixture.shared_expert_gate is not None else ([], [], None))
    if router_bias is not None or shared_gate_bias is not None or shared is None or any(e is None for e in experts):
        return None
    width = mixture.experts[0].intermediate
    shared_width = mixture.shared_expert.intermediate if mixture.shared_expert is not None else 0
    return (router, router_types, mixture.top_k, mixture.norm_topk_prob, width,
            [e[0] for e in experts], [e[1] for e in experts], [e[2] for e in experts], [e[3] for e in experts],
            shared[0], shared[1], shared[2], shared[3], shared_gate, shared_gate_types, shared_width)
