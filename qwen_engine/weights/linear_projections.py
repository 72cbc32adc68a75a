"""Qwen3-Next's fused linear-attention projections, split into Qwen3.5's four.

Qwen3-Next stores q, k, v and the output gate z of its gated-DeltaNet layers as one matrix `in_proj_qkvz`,
grouped by key head: for each of the Hk key heads, its q rows (Dk), k rows (Dk), then the v rows and z rows of
the Hv/Hk value heads it serves. The decay and write-rate projections are likewise `in_proj_ba`, grouped as
(b, a) per key head. Qwen3.5 stores `in_proj_qkv` (all q heads, all k heads, all v heads: the order the
convolution's channels are in for both), `in_proj_z`, `in_proj_b` and `in_proj_a`. Regrouping the rows at load
lets one module (models/gated_deltanet.py) run both.
"""

from __future__ import annotations

import torch

from ..config import LinearAttentionConfig
from ..errors import ModelLoadError


def ba_rows(lin: LinearAttentionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a fused `in_proj_ba` (or GGUF `ssm_ba`) that are b, and those that are a, in value-head order."""
    per_key = lin.num_value_heads // lin.num_key_heads
    rows = torch.arange(2 * lin.num_value_heads).view(lin.num_key_heads, 2, per_key)
    return rows[:, 0].reshape(-1), rows[:, 1].reshape(-1)


def split_fused(name: str, tensor: torch.Tensor, lin: LinearAttentionConfig) -> list[tuple[str, torch.Tensor]] | None:
    """Qwen3.5-style (name, tensor) pairs for a fused Qwen3-Next projection; None for any other tensor."""
    prefix, fused = name.rpartition(".linear_attn.")[0], name.rpartition(".")[0].rpartition(".")[2]
    if fused not in ("in_proj_qkvz", "in_proj_ba") or not name.endswith(".weight"):
        return None
    heads, dk, dv = lin.num_key_heads, lin.key_head_dim, lin.value_head_dim
    per_key = lin.num_value_heads // lin.num_key_heads
    sizes = [dk, dk, per_key * dv, per_key * dv] if fused == "in_proj_qkvz" else [per_key, per_key]
    if tensor.dim() != 2 or tensor.shape[0] != heads * sum(sizes):
        raise ModelLoadError(f"tensor {name} has shape {tuple(tensor.shape)}, expected "
                             f"({heads * sum(sizes)}, hidden_size)")
    base = f"{prefix}.linear_attn."
    if fused == "in_proj_ba":
        b_rows, a_rows = ba_rows(lin)
        return [(base + "in_proj_b.weight", tensor[b_rows]), (base + "in_proj_a.weight", tensor[a_rows])]
    parts = [p.reshape(-1, tensor.shape[1]) for p in tensor.view(heads, sum(sizes), -1).split(sizes, dim=1)]
    return [(base + "in_proj_qkv.weight", torch.cat(parts[:3])), (base + "in_proj_z.weight", parts[3])]
