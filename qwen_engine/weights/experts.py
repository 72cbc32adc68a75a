"""Checkpoints that store a layer's experts fused, one 3-D tensor per kind, split into the per-expert weights
our models name (`mlp.experts.{j}.{gate,up,down}_proj.weight`).

Two layouts exist. The released Qwen3-VL-MoE files (and transformers 4) hold `experts.gate_up_proj` as
[experts, hidden, 2 · intermediate] and `experts.down_proj` as [experts, intermediate, hidden], multiplied as
x @ W. transformers 5 saves them transposed, [experts, 2 · intermediate, hidden] and [experts, hidden,
intermediate], multiplied as x @ Wᵀ like a linear layer. The shapes tell them apart, except when hidden equals
2 · intermediate (gate_up) or intermediate (down): then the file's `transformers_version` decides.
"""

from __future__ import annotations

import re

import torch

from ..errors import ModelLoadError

_FUSED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")


def split_fused(name: str, tensor: torch.Tensor, hidden: int, intermediate: int,
                saved_by_v5: bool) -> list[tuple[str, torch.Tensor]] | None:
    """The per-expert [out, in] weights in a fused experts tensor; None if `name` is not one."""
    m = _FUSED.fullmatch(name)
    if m is None:
        return None
    prefix, kind = m.groups()
    width = 2 * intermediate if kind == "gate_up_proj" else intermediate
    linear_shape, hub_shape = ((width, hidden), (hidden, width)) if kind == "gate_up_proj" else \
        ((hidden, width), (width, hidden))
    if tensor.dim() != 3 or tuple(tensor.shape[1:]) not in (linear_shape, hub_shape):
        raise ModelLoadError(f"tensor {name} has shape {tuple(tensor.shape)}, expected [experts, "
                             f"{linear_shape[0]}, {linear_shape[1]}] or [experts, {hub_shape[0]}, {hub_shape[1]}]")
    transposed = tuple(tensor.shape[1:]) == hub_shape and (linear_shape != hub_shape or not saved_by_v5)
    weights = tensor.transpose(1, 2) if transposed else tensor  # now [experts, out, in] in every case
    out = []
    for j, w in enumerate(weights):
        if kind == "gate_up_proj":
            out.append((f"{prefix}.{j}.gate_proj.weight", w[:intermediate].contiguous()))
            out.append((f"{prefix}.{j}.up_proj.weight", w[intermediate:].contiguous()))
        else:
            out.append((f"{prefix}.{j}.down_proj.weight", w.contiguous()))
    return out
