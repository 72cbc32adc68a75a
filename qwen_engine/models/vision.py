"""The vision encoders of Qwen2-VL and Qwen2.5-VL: pixel patches in, one embedding per merged 2x2 patch out.

Both towers share the layout: a patch embedding (a Conv3d whose kernel equals its stride, i.e. one matrix
product per flattened patch), 2-D rotary positions over (row, column), pre-norm transformer blocks with
attention restricted to one image / frame (and, on Qwen2.5-VL, to one window except in the blocks listed in
`fullatt_block_indexes`), and a merger that concatenates 2x2 neighbours and projects them to the LLM's width.

Qwen2-VL: LayerNorm, quick_gelu MLP fc1/fc2. Qwen2.5-VL: RMSNorm, gated MLP with bias, window attention.
Parameter names are the checkpoint's names without the `visual.` prefix.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError
from ..weights.safetensors import iter_tensors
from .layers import RMSNorm, apply_rotary

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class VisionConfig:
    family: str  # "qwen2_vl" or "qwen2_5_vl"
    depth: int
    embed_dim: int  # width of the blocks
    num_heads: int
    intermediate_size: int
    out_hidden_size: int  # the LLM's hidden size, what the merger projects to
    hidden_act: str
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int | None = None  # pixels per window side (Qwen2.5-VL); None: no window attention
    fullatt_block_indexes: tuple[int, ...] = field(default_factory=tuple)
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def window_tokens(self) -> int | None:
        """Merged tokens per window side (112 px / 2 / 14 = 4 on the released models)."""
        if self.window_size is None:
            return None
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_dict(cls, vision: dict[str, Any], family: str) -> VisionConfig:
        """From config.json's `vision_config` (HF key names; Hub and transformers-v5 spellings)."""
        if family not in ("qwen2_vl", "qwen2_5_vl"):
            raise ModelLoadError(f"no vision tower is known for model family {family!r}")
        try:
            rope = vision.get("rope_parameters") or {}
            theta = float(rope.get("rope_theta", vision.get("rope_theta", 10000.0)))
            common = dict(
                family=family,
                depth=int(vision["depth"]),
                num_heads=int(vision["num_heads"]),
                patch_size=int(vision.get("patch_size", vision.get("spatial_patch_size", 14))),
                temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
                spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
                in_channels=int(vision.get("in_channels", vision.get("in_chans", 3))),
                rope_theta=theta,
            )
            if family == "qwen2_vl":
                # Qwen2-VL: `embed_dim` is the blocks' width and `hidden_size` the LLM's.
                embed = int(vision["embed_dim"])
                return cls(
                    **common,
                    embed_dim=embed,
                    intermediate_size=int(embed * vision.get("mlp_ratio", 4)),
                    out_hidden_size=int(vision["hidden_size"]),
                    hidden_act=str(vision.get("hidden_act", "quick_gelu")),
                )
            # Qwen2.5-VL: `hidden_size` is the blocks' width and `out_hidden_size` the LLM's.
            return cls(
                **common,
                embed_dim=int(vision["hidden_size"]),
                intermediate_size=int(vision["intermediate_size"]),
                out_hidden_size=int(vision["out_hidden_size"]),
                hidden_act=str(vision.get("hidden_act", "silu")),
                window_size=int(vision.get("window_size", 112)),
                fullatt_block_indexes=tuple(int(i) for i in vision.get("fullatt_block_indexes", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"vision_config is missing or has a bad value: {e}") from None

    @classmethod
    def from_dir(cls, folder: str | Path) -> VisionConfig:
        path = Path(folder) / "config.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: cannot read config ({e})") from None
        vision = data.get("vision_config")
        if not isinstance(vision, dict):
            raise ModelLoadError(f"{path}: no vision_config; not a vision-language model")
        family = data.get("model_type")
        if family not in ("qwen2_vl", "qwen2_5_vl"):
            # Unknown top-level type: the key that only Qwen2-VL's vision_config has decides.
            family = "qwen2_vl" if "embed_dim" in vision else "qwen2_5_vl"
        return cls.from_dict(vision, family)


# ---- integer layout of one grid (positions, windows), cached: the same image sizes recur constantly ----


@lru_cache(maxsize=256)
def _grid_layout(
    t: int, h: int, w: int, merge: int, window: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one image/video grid of (t, h, w) patches, in pixel_values' row order (merge blocks of merge x merge
    patches, block-major):

    positions: [t*h*w, 2] (row, column) of every patch, for the rotary angles.
    window_order: [t*h*w / merge²] merged tokens in window order (identity when window is None).
    window_lengths: merged tokens per window (per frame when window is None), in that order.
    """
    bh, bw = h // merge, w // merge
    rows = torch.arange(bh).view(bh, 1, 1, 1) * merge + torch.arange(merge).view(1, 1, merge, 1)
    cols = torch.arange(bw).view(1, bw, 1, 1) * merge + torch.arange(merge).view(1, 1, 1, merge)
    rows, cols = rows.expand(bh, bw, merge, merge), cols.expand(bh, bw, merge, merge)
    positions = torch.stack([rows.flatten(), cols.flatten()], dim=-1).repeat(t, 1)

    if window is None:
        return positions, torch.arange(t * bh * bw), torch.full((t,), bh * bw)
    # Sort merged tokens by (frame, window row, window column, row in window, column in window); edge windows
    # are simply smaller. Window ids are dense, so bincount gives every window's size and none is empty.
    frame = torch.arange(t).view(t, 1, 1)
    r = torch.arange(bh).view(1, bh, 1)
    c = torch.arange(bw).view(1, 1, bw)
    nwh, nww = -(-bh // window), -(-bw // window)
    window_id = (frame * nwh + r // window) * nww + c // window
    key = window_id * window * window + (r % window) * window + c % window
    window_order = torch.argsort(key.flatten())
    window_lengths = torch.bincount(window_id.flatten(), minlength=t * nwh * nww)
    return positions, window_order, window_lengths


@dataclass
class VisionLayout:
    """Everything forward needs that depends only on grid_thw (in patches; windows already in patch units)."""

    cos: torch.Tensor  # [N, head_dim], rows in window order
    sin: torch.Tensor
    cu_seqlens: torch.Tensor  # int32 [frames + 1]: one full-attention segment per image frame
    window_index: torch.Tensor  # [N / merge²] merged token -> its original row (identity without windows)
    cu_window_seqlens: torch.Tensor  # int32 [windows + 1]


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.embed_dim, kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # A Conv3d whose kernel is the whole patch is one dot product per patch; the weight's (C, T, P, P)
        # order is pixel_values' flattening order.
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.flatten(1))


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=True)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim, bias=True)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        # Rotate in float32 whatever the weights' dtype, as the reference does.
        q = apply_rotary(q.float(), cos, sin).to(v.dtype)
        k = apply_rotary(k.float(), cos, sin).to(v.dtype)
        return self.proj(segment_attention(q, k, v, cu_seqlens).reshape(n, -1))


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Bidirectional attention within each packed segment [cu_seqlens[i], cu_seqlens[i+1]) of [N, heads, d].

    Segments of equal length (most windows, all frames of a video) are gathered into one batch per length,
    so there is one SDPA call per distinct length and never an N x N mask.
    """
    out = torch.empty_like(q)
    starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    for length in torch.unique(lengths).tolist():
        if length == 0:
            continue
        rows = (starts[lengths == length, None] + torch.arange(length, device=q.device)).flatten()

        def batch(t: torch.Tensor, rows: torch.Tensor = rows, length: int = length) -> torch.Tensor:
            return t[rows].view(-1, length, *t.shape[1:]).transpose(1, 2)  # [segments, heads, length, d]

        attended = F.scaled_dot_product_attention(batch(q), batch(k), batch(v))
        out[rows] = attended.transpose(1, 2).reshape(-1, *q.shape[1:])
    return out


class VisionMLP(nn.Module):
    """Qwen2-VL: fc1 -> act -> fc2."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.embed_dim)
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionGatedMLP(nn.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), every projection with a bias."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.embed_dim, config.intermediate_size)
        self.up_proj = nn.Linear(config.embed_dim, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.embed_dim)
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = _norm(config)
        self.norm2 = _norm(config)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config) if config.family == "qwen2_vl" else VisionGatedMLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm each patch, concatenate the merge x merge neighbours (consecutive rows), project to the LLM width."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.merged_dim = config.embed_dim * config.spatial_merge_size**2
        self.ln_q = _norm(config)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim),
            nn.GELU(),
            nn.Linear(self.merged_dim, config.out_hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.head_dim % 4:
            raise ModelLoadError(f"vision head_dim {config.head_dim} is not a multiple of 4 (2-D rotary)")
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        # Row and column each get head_dim/4 frequencies; the angles are [rows | columns], then doubled for the
        # (i, i + head_dim/2) rotation pairs.
        quarter = config.head_dim // 2
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float32) / quarter)
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = inv_freq
        self._layouts: dict[tuple[tuple[int, int, int], ...], VisionLayout] = {}

    def layout(self, grid_thw: torch.Tensor) -> VisionLayout:
        """The rotary tables and segment boundaries for these grids, cached per grid_thw."""
        grids = tuple((int(t), int(h), int(w)) for t, h, w in grid_thw.tolist())
        cached = self._layouts.get(grids)
        device = self.merger.mlp[0].weight.device
        if cached is not None and cached.cos.device == device:
            return cached
        cfg = self.config
        unit = cfg.spatial_merge_size**2
        positions, orders, windows, frames = [], [], [], []
        offset = 0
        for t, h, w in grids:
            pos, order, lengths = _grid_layout(t, h, w, cfg.spatial_merge_size, cfg.window_tokens)
            positions.append(pos)
            orders.append(order + offset)
            windows.append(lengths)
            frames.append(torch.full((t,), h * w))
            offset += t * h * w // unit
        window_index = torch.cat(orders)
        # Rotary angles per patch, then put in the same window order as the hidden states.
        angles = (torch.cat(positions).to(device)[..., None].float() * self.inv_freq.to(device)).flatten(1)
        angles = torch.cat([angles, angles], dim=-1)
        patch_order = (window_index[:, None] * unit + torch.arange(unit)).flatten().to(device)
        angles = angles[patch_order]

        def cumulative(lengths: torch.Tensor) -> torch.Tensor:
            return F.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)

        layout = VisionLayout(
            cos=angles.cos(),
            sin=angles.sin(),
            cu_seqlens=cumulative(torch.cat(frames)),
            window_index=window_index.to(device),
            cu_window_seqlens=cumulative(torch.cat(windows) * unit),
        )
        if len(self._layouts) >= 64:  # a server sees unbounded size combinations; keep the cache small
            self._layouts.pop(next(iter(self._layouts)))
        self._layouts[grids] = layout
        return layout

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C*T*P*P] (rows as the image processor emits them), grid_thw [images, 3] in patches
        -> [N / merge², out_hidden_size], one row per merged token in the same order as the input."""
        cfg = self.config
        unit = cfg.spatial_merge_size**2
        n = pixel_values.shape[0]
        if pixel_values.dim() != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(f"pixel_values must be [N, {cfg.patch_dim}], got {list(pixel_values.shape)}")
        if bool((grid_thw[:, 1:] % cfg.spatial_merge_size).any()):
            raise ValueError(f"grid_thw heights and widths must be multiples of {cfg.spatial_merge_size}")
        if int(grid_thw.prod(-1).sum()) != n:
            raise ValueError(
                f"grid_thw covers {int(grid_thw.prod(-1).sum())} patches but pixel_values has {n}"
            )
        layout = self.layout(grid_thw)
        x = self.patch_embed(pixel_values)
        windowed = cfg.window_tokens is not None
        if windowed:
            # Move whole merge groups so each window is contiguous; the merger's 4-row groups stay intact.
            x = x.view(n // unit, unit, -1)[layout.window_index].view(n, -1)
        cos, sin = layout.cos, layout.sin  # float32 whatever the weights: VisionAttention rotates in float32
        full = set(cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            segments = layout.cu_window_seqlens if windowed and i not in full else layout.cu_seqlens
            x = block(x, cos, sin, segments)
        merged = self.merger(x)
        if windowed:
            merged = merged[torch.argsort(layout.window_index)]
        return merged


def load_vision_weights(model: VisionTransformer, folder: str | Path) -> None:
    """Copy the checkpoint's `visual.*` tensors into `model`; every parameter must be present exactly once."""
    params = dict(model.named_parameters())
    seen: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor in iter_tensors(Path(folder)):
            # transformers v5 may write the new-style prefix; released Qwen2/2.5-VL checkpoints use `visual.`.
            for prefix in ("visual.", "model.visual."):
                if name.startswith(prefix):
                    break
            else:
                continue
            local = name[len(prefix) :]
            param = params.get(local)
            if param is None:
                unexpected.append(name)
                continue
            if tuple(tensor.shape) != tuple(param.shape):
                raise ModelLoadError(
                    f"{name}: shape {list(tensor.shape)} in the checkpoint, {list(param.shape)} expected"
                )
            if local in seen:
                raise ModelLoadError(f"{name}: the checkpoint holds this vision tensor twice")
            param.copy_(tensor)
            seen.add(local)
    missing = sorted(set(params) - seen)
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder}: vision weights do not match the config: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {sorted(unexpected)[:5]}{'…' if len(unexpected) > 5 else ''}"
        )


def _norm(config: VisionConfig) -> nn.Module:
    return (
        nn.LayerNorm(config.embed_dim, eps=1e-6)
        if config.family == "qwen2_vl"
        else RMSNorm(config.embed_dim, 1e-6)
    )


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ModelLoadError(
            f"vision hidden_act {name!r} is not supported; known: {sorted(_ACTIVATIONS)}"
        ) from None
