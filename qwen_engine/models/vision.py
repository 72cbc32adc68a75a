"""The vision encoders of Qwen2-VL, Qwen2.5-VL and Qwen3-VL: pixel patches in, one embedding per merged 2x2
patch out (and on Qwen3-VL, DeepStack features from intermediate blocks).

All towers share the layout: a patch embedding (a Conv3d whose kernel equals its stride, i.e. one matrix
product per flattened patch), 2-D rotary positions over (row, column), pre-norm transformer blocks with
attention restricted to one image / frame (and, on Qwen2.5-VL, to one window except in the blocks listed in
`fullatt_block_indexes`), and a merger that concatenates 2x2 neighbours and projects them to the LLM's width.

Qwen2-VL: LayerNorm, quick_gelu MLP fc1/fc2. Qwen2.5-VL: RMSNorm, gated MLP with bias, window attention.
Qwen3-VL: patch embedding with bias, a learned 48x48 position table resampled bilinearly to each image's grid,
LayerNorm, gelu-tanh MLP linear_fc1/linear_fc2, and after each block in `deepstack_visual_indexes` a merger of
its own (LayerNorm over the concatenated 2x2 group) whose output the LLM adds to its first layers.
Parameter names are the checkpoint's names without the `visual.` / `model.visual.` prefix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import ModelLoadError
from ..weights.safetensors import iter_tensors
from .heap import heap_for_large_tensors
from .layers import RMSNorm, rotate_in_float32
from .vision_layout import VisionLayout, build_layout

__all__ = ["VisionConfig", "VisionLayout", "VisionTransformer", "load_vision_weights", "segment_attention"]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}

# config.json model_type -> tower family
_FAMILIES = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl",  # the MoE is in the LLM; the tower is Qwen3-VL's
}


@dataclass(frozen=True)
class VisionConfig:
    family: str  # "qwen2_vl", "qwen2_5_vl" or "qwen3_vl"
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
    num_position_embeddings: int | None = None  # learned position table (Qwen3-VL: 48*48); None: none
    deepstack_visual_indexes: tuple[int, ...] = field(default_factory=tuple)  # Qwen3-VL

    def __post_init__(self) -> None:
        if self.family not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            raise ModelLoadError(f"no vision tower is known for model family {self.family!r}")
        if self.num_position_embeddings is not None:
            side = math.isqrt(self.num_position_embeddings)
            if side < 2 or side * side != self.num_position_embeddings:
                raise ModelLoadError(
                    f"num_position_embeddings {self.num_position_embeddings} is not a square grid"
                )
        indexes = self.deepstack_visual_indexes
        if len(set(indexes)) != len(indexes) or any(not 0 <= i < self.depth for i in indexes):
            raise ModelLoadError(
                f"deepstack_visual_indexes {list(indexes)} must be distinct blocks in 0..{self.depth - 1}"
            )

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

    @property
    def pos_side(self) -> int | None:
        """Side of the square learned position table (48 on Qwen3-VL), None without one."""
        if self.num_position_embeddings is None:
            return None
        return math.isqrt(self.num_position_embeddings)

    @classmethod
    def from_dict(cls, vision: dict[str, Any], family: str) -> VisionConfig:
        """From config.json's `vision_config` (HF key names; Hub and transformers-v5 spellings). `family` is
        the top-level model_type (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe)."""
        canonical = _FAMILIES.get(family)
        if canonical is None:
            raise ModelLoadError(f"no vision tower is known for model family {family!r}")
        try:
            rope = vision.get("rope_parameters") or {}
            theta = float(rope.get("rope_theta", vision.get("rope_theta", 10000.0)))
            default_patch = 16 if canonical == "qwen3_vl" else 14
            common = dict(
                family=canonical,
                depth=int(vision["depth"]),
                num_heads=int(vision["num_heads"]),
                patch_size=int(vision.get("patch_size", vision.get("spatial_patch_size", default_patch))),
                temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
                spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
                in_channels=int(vision.get("in_channels", vision.get("in_chans", 3))),
                rope_theta=theta,
            )
            if canonical == "qwen2_vl":
                # Qwen2-VL: `embed_dim` is the blocks' width and `hidden_size` the LLM's.
                embed = int(vision["embed_dim"])
                return cls(
                    **common,
                    embed_dim=embed,
                    intermediate_size=int(embed * vision.get("mlp_ratio", 4)),
                    out_hidden_size=int(vision["hidden_size"]),
                    hidden_act=str(vision.get("hidden_act", "quick_gelu")),
                )
            # Qwen2.5-VL / Qwen3-VL: `hidden_size` is the blocks' width and `out_hidden_size` the LLM's.
            widths = dict(
                embed_dim=int(vision["hidden_size"]),
                intermediate_size=int(vision["intermediate_size"]),
                out_hidden_size=int(vision["out_hidden_size"]),
            )
            if canonical == "qwen3_vl":
                # Defaults are transformers' Qwen3VLVisionConfig's; released configs spell them all out.
                return cls(
                    **common,
                    **widths,
                    hidden_act=str(vision.get("hidden_act", "gelu_pytorch_tanh")),
                    num_position_embeddings=int(vision.get("num_position_embeddings", 2304)),
                    deepstack_visual_indexes=tuple(
                        int(i) for i in vision.get("deepstack_visual_indexes", (8, 16, 24))
                    ),
                )
            return cls(
                **common,
                **widths,
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
        if family not in _FAMILIES:
            # Unknown top-level type: keys that only one family's vision_config has decide.
            if "embed_dim" in vision:
                family = "qwen2_vl"
            elif "num_position_embeddings" in vision or "deepstack_visual_indexes" in vision:
                family = "qwen3_vl"
            else:
                family = "qwen2_5_vl"
        return cls.from_dict(vision, family)


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        bias = config.family == "qwen3_vl"
        self.proj = nn.Conv3d(config.in_channels, config.embed_dim, kernel, stride=kernel, bias=bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # A Conv3d whose kernel is the whole patch is one dot product per patch; the weight's (C, T, P, P)
        # order is pixel_values' flattening order.
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.flatten(1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=True)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim, bias=True)
        self.products: str | None = None  # VisionTransformer.lossy_attention

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        # Rotated in float32 whatever the weights' dtype, as the reference does; in place (q and k are views of
        # this layer's qkv output) where a native kernel can.
        q = rotate_in_float32(q, cos, sin)
        k = rotate_in_float32(k, cos, sin)
        attended = segment_attention(q, k, v, cu_seqlens, products=self.products)
        return self.proj(attended.reshape(n, -1))


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, products: str | None = None
) -> torch.Tensor:
    """Bidirectional attention within each packed segment [cu_seqlens[i], cu_seqlens[i+1]) of [N, heads, d].

    On the CPU the native kernel (kernels/segment_attention.cpp) takes bfloat16 inputs (a bf16 tower): bf16
    products summed in float32, as PyTorch's bf16 attention computes, at about twice its speed. `products`
    sends float32 inputs there too (lossy; the result stays float32): "bf16" rounds q, k, v and the softmax
    weights to bf16; "int8" also computes q·k in int8 (each query row and each key, less its segment's mean key,
    with a scale of its own), ~1.25x faster again.

    Where the CPU has AMX tiles, those bf16 and int8 cases run PyTorch's SDPA on bf16 copies of q, k and v
    instead (oneDNN multiplies them on the tiles; the result is rounded to bf16, then returned in q's dtype):
    at full attention over a 1024x1024 image's 4096-5476 patches it is 2-2.4x as fast as the kernel's int8
    scores there, as fast over windows, and no less accurate than the "bf16" kernel (docs/benchmarks.md,
    twenty-seventh pass).

    Otherwise SDPA: segments of equal length (most windows, all frames of a video) are gathered into one batch
    per length, so there is one call per distinct length and never an N x N mask.
    """
    if products not in (None, "bf16", "int8"):
        raise ValueError(f"attention products {products!r}: choose None, 'bf16' or 'int8'")
    kind = products or ("bf16" if q.dtype == torch.bfloat16 else None)
    if kind is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16):
        native = kernels.native()
        if native is not None and native.amx_prefill_available():  # AMX bf16 tiles granted to this process
            bf16 = [t.to(torch.bfloat16) for t in (q, k, v)]
            return _sdpa_by_length(*bf16, cu_seqlens).to(q.dtype)
        int8 = kind == "int8"
        if native is not None and native.segment_attention_supports(q.shape[-1], int8):
            scale = q.shape[-1] ** -0.5
            return native.segment_attention(q, k, v, cu_seqlens, scale, int8, q.dtype == torch.float32)
    return _sdpa_by_length(q, k, v, cu_seqlens)


def _sdpa_by_length(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """segment_attention on SDPA, one call per distinct segment length (q's dtype throughout)."""
    starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    distinct = torch.unique(lengths).tolist()
    if len(distinct) == 1 and distinct[0] > 0:
        # One image, or frames of one size: the segments tile the rows, so a reshape is the batch.
        def tiled(t: torch.Tensor) -> torch.Tensor:
            return t.view(-1, distinct[0], *t.shape[1:]).transpose(1, 2)

        return F.scaled_dot_product_attention(tiled(q), tiled(k), tiled(v)).transpose(1, 2).reshape(q.shape)
    out = torch.empty_like(q)
    for length in distinct:
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
        self.silu = config.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        native = kernels.native() if gate.device.type == "cpu" and self.silu else None
        if native is not None and gate.dtype == torch.bfloat16 and native.bf16_kernels():
            return self.down_proj(native.silu_mul_bf16(gate, up))  # one pass, rounded as the two PyTorch ops round
        if native is not None and gate.dtype == torch.float32 and gate.is_contiguous() and up.is_contiguous():
            return self.down_proj(native.silu_mul_(gate, up))  # one pass, in place
        return self.down_proj(self.act(gate) * up)


class Qwen3VisionMLP(nn.Module):
    """Qwen3-VL: linear_fc1 -> act (gelu-tanh) -> linear_fc2."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.embed_dim, config.intermediate_size)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.embed_dim)
        self.act = _activation(config.hidden_act)
        self.gelu_tanh = config.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        native = kernels.native() if self.gelu_tanh and h.device.type == "cpu" else None
        if native is not None and native.gelu_tanh_supports(h):
            return self.linear_fc2(native.gelu_tanh_(h))  # one pass, in place (kernels/activations.cpp)
        return self.linear_fc2(self.act(h))


_MLPS: dict[str, type[nn.Module]] = {
    "qwen2_vl": VisionMLP,
    "qwen2_5_vl": VisionGatedMLP,
    "qwen3_vl": Qwen3VisionMLP,
}


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = _norm(config)
        self.norm2 = _norm(config)
        self.attn = VisionAttention(config)
        self.mlp = _MLPS[config.family](config)

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


class Qwen3PatchMerger(nn.Module):
    """Qwen3-VL: LayerNorm, concatenate the merge x merge neighbours, linear_fc1 -> GELU -> linear_fc2.

    The final merger normalises each patch before concatenating (`postshuffle=False`); the DeepStack mergers
    normalise the concatenated group over merge² x width (`postshuffle=True`).
    """

    def __init__(self, config: VisionConfig, postshuffle: bool):
        super().__init__()
        self.merged_dim = config.embed_dim * config.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.merged_dim if postshuffle else config.embed_dim, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged_dim, self.merged_dim)
        self.linear_fc2 = nn.Linear(self.merged_dim, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle:
            x = self.norm(x.view(-1, self.merged_dim))
        else:
            x = self.norm(x).view(-1, self.merged_dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.head_dim % 4:
            raise ModelLoadError(f"vision head_dim {config.head_dim} is not a multiple of 4 (2-D rotary)")
        self.config = config
        qwen3 = config.family == "qwen3_vl"
        self.patch_embed = PatchEmbed(config)
        self.pos_embed: nn.Embedding | None = None
        if config.num_position_embeddings is not None:
            self.pos_embed = nn.Embedding(config.num_position_embeddings, config.embed_dim)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger: nn.Module = Qwen3PatchMerger(config, postshuffle=False) if qwen3 else PatchMerger(config)
        self.deepstack_merger_list = nn.ModuleList(
            Qwen3PatchMerger(config, postshuffle=True) for _ in config.deepstack_visual_indexes
        )
        # The learned position table is resampled like F.interpolate(align_corners=True); a switch only so
        # tests can show the flag is observable.
        self.interpolation_align_corners = True
        # Large activations from the heap during a pass (models/heap.py): set by w8a8.convert_tower, where it
        # pays (a 10-second video 1.34x faster, +83 MiB at its peak); a float32 tower gains 1.03-1.09x for up to
        # +357 MiB of peak (fragments of the windows' many sizes), so it stays off there.
        self.reuse_freed_memory = False
        self._layouts: dict[tuple[Any, ...], VisionLayout] = {}
        self.reset_computed_state()

    def reset_computed_state(self, device: torch.device | str = "cpu") -> None:
        """Recompute what is derived rather than loaded (the rotary frequencies; row and column each get
        head_dim/4), e.g. after the tower was built on the meta device and its weights loaded. A plain
        attribute on the CPU, not a buffer: model.to(bfloat16) must not round the frequencies."""
        quarter = self.config.head_dim // 2
        exponents = torch.arange(0, quarter, 2, dtype=torch.float32, device="cpu") / quarter
        self.inv_freq = 1.0 / self.config.rope_theta**exponents
        self._layouts.clear()

    def lossy_attention(self, products: str | None) -> None:
        """A lossy option for float32 towers: every block's attention with "bf16" products (q, k, v and the
        softmax weights rounded to bf16; sums, softmax and output float32), ~2x faster on CPUs with AVX512-BF16,
        or also with "int8" scores (q·k in int8), ~2.5x; with AMX tiles both are PyTorch's bf16 SDPA
        (segment_attention); None: float32 again. Without those instruction sets, or off the CPU, nothing
        changes. benchmarks/vision_tower.py measures what each moves."""
        for block in self.blocks:
            block.attn.products = products

    def layout(self, grid_thw: torch.Tensor) -> VisionLayout:
        """The rotary tables, segment boundaries and position-table taps for these grids, cached per grid_thw."""
        grids = tuple((int(t), int(h), int(w)) for t, h, w in grid_thw.tolist())
        key = (grids, self.interpolation_align_corners)
        device = self.patch_embed.proj.weight.device
        cached = self._layouts.get(key)
        if cached is not None and cached.cos.device == device:
            return cached
        cfg = self.config
        layout = build_layout(
            grids,
            merge=cfg.spatial_merge_size,
            window=cfg.window_tokens,
            inv_freq=self.inv_freq,
            pos_side=cfg.pos_side,
            align_corners=self.interpolation_align_corners,
            device=device,
        )
        if len(self._layouts) >= 64:  # a server sees unbounded size combinations; keep the cache small
            self._layouts.pop(next(iter(self._layouts)))
        self._layouts[key] = layout
        return layout

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C*T*P*P] (rows as the image processor emits them), grid_thw [images, 3] in patches
        -> [N / merge², out_hidden_size], one row per merged token in the same order as the input."""
        return self.encode(pixel_values, grid_thw)[0]

    def encode(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """As forward, plus the DeepStack features: one [N / merge², out_hidden_size] tensor per entry of
        `deepstack_visual_indexes` (in block order, i.e. feature k feeds LLM layer k); empty before Qwen3-VL."""
        if not self.reuse_freed_memory:
            return self._encode(pixel_values, grid_thw)
        with heap_for_large_tensors():  # the blocks' large activations reuse each other's pages (models/heap.py)
            return self._encode(pixel_values, grid_thw)

    def _encode(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
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
        if self.pos_embed is not None:
            # Each patch sums 4 weighted rows of the table; float32 weights as in the reference.
            table = self.pos_embed.weight.float()
            pos = F.embedding_bag(layout.pos_index, table, per_sample_weights=layout.pos_weight, mode="sum")
            x = x + pos.to(x.dtype)
        windowed = cfg.window_tokens is not None
        if windowed:
            # Move whole merge groups so each window is contiguous; the merger's 4-row groups stay intact.
            x = x.view(n // unit, unit, -1)[layout.window_index].view(n, -1)
        cos, sin = layout.cos, layout.sin  # float32 whatever the weights: VisionAttention rotates in float32
        full = set(cfg.fullatt_block_indexes)
        taps = {block: k for k, block in enumerate(cfg.deepstack_visual_indexes)}
        deepstack: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            segments = layout.cu_window_seqlens if windowed and i not in full else layout.cu_seqlens
            x = block(x, cos, sin, segments)
            if i in taps:
                deepstack.append(self.deepstack_merger_list[taps[i]](x))
        merged = self.merger(x)
        if windowed:
            restore = torch.argsort(layout.window_index)
            merged, deepstack = merged[restore], [d[restore] for d in deepstack]
        return merged, deepstack


def load_vision_weights(model: VisionTransformer, folder: str | Path) -> None:
    """Copy the checkpoint's `visual.*` / `model.visual.*` tensors into `model`; every parameter must be
    present exactly once."""
    params = dict(model.named_parameters())
    seen: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor in iter_tensors(Path(folder)):
            # Released Qwen2/2.5-VL checkpoints use `visual.`; Qwen3-VL and transformers v5 `model.visual.`.
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
    if config.family == "qwen2_5_vl":
        return RMSNorm(config.embed_dim, 1e-6)
    return nn.LayerNorm(config.embed_dim, eps=1e-6)


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ModelLoadError(
            f"vision hidden_act {name!r} is not supported; known: {sorted(_ACTIVATIONS)}"
        ) from None
