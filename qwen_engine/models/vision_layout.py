"""Everything a vision tower needs that depends only on the grids (grid_thw), never on the weights.

For a batch of images / videos the tower needs, per patch: its rotary angles (from its row and column), the
attention segments (one per frame, and on Qwen2.5-VL one per window), and on Qwen3-VL the 4 taps and weights
that resample the learned 48x48 position table bilinearly to the image's grid. All of it is integer layout
plus a few tables, built here with tensor ops per distinct (t, h, w) and cached: the same image sizes recur
constantly, and the reference rebuilds them with Python loops on every call.

Patch order is pixel_values' row order: merge blocks of merge x merge patches, block-major, each block's
patches row-major; a video repeats that frame layout t times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

Grid = tuple[int, int, int]  # (t, h, w) in patches


@dataclass
class VisionLayout:
    """The tables of one grid_thw, on the tower's device (windows already in patch units)."""

    cos: torch.Tensor  # float32 [N, head_dim], rows in window order
    sin: torch.Tensor
    cu_seqlens: torch.Tensor  # int32 [frames + 1]: one full-attention segment per image frame
    window_index: torch.Tensor  # [N / merge²] merged token -> its original row (identity without windows)
    cu_window_seqlens: torch.Tensor  # int32 [windows + 1]
    # Qwen3-VL only (None otherwise): the position table rows and weights each patch sums, in input order.
    pos_index: torch.Tensor | None = None  # long [N, 4]
    pos_weight: torch.Tensor | None = None  # float32 [N, 4]


@lru_cache(maxsize=256)
def merge_block_positions(h: int, w: int, merge: int) -> torch.Tensor:
    """[h*w, 2] (row, column) of one frame's patches in merge-block order."""
    bh, bw = h // merge, w // merge
    rows = torch.arange(bh).view(bh, 1, 1, 1) * merge + torch.arange(merge).view(1, 1, merge, 1)
    cols = torch.arange(bw).view(1, bw, 1, 1) * merge + torch.arange(merge).view(1, 1, 1, merge)
    rows, cols = rows.expand(bh, bw, merge, merge), cols.expand(bh, bw, merge, merge)
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


@lru_cache(maxsize=256)
def window_partition(
    t: int, h: int, w: int, merge: int, window: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged tokens in window order, and the merged tokens per window (per frame when window is None).

    Sorted by (frame, window row, window column, row in window, column in window); edge windows are simply
    smaller. Window ids are dense, so bincount gives every window's size and none is empty.
    """
    bh, bw = h // merge, w // merge
    if window is None:
        return torch.arange(t * bh * bw), torch.full((t,), bh * bw)
    frame = torch.arange(t).view(t, 1, 1)
    r = torch.arange(bh).view(1, bh, 1)
    c = torch.arange(bw).view(1, 1, bw)
    nwh, nww = -(-bh // window), -(-bw // window)
    window_id = (frame * nwh + r // window) * nww + c // window
    key = window_id * window * window + (r % window) * window + c % window
    return torch.argsort(key.flatten()), torch.bincount(window_id.flatten(), minlength=t * nwh * nww)


def _axis_taps(coord: torch.Tensor, size: int, side: int, align_corners: bool) -> tuple[torch.Tensor, ...]:
    """Two taps into a `side`-long axis and their weights, resampling it to `size` points (F.interpolate's
    bilinear source coordinates)."""
    coord = coord.float()
    if align_corners:
        # Endpoints map to endpoints. An exact integer quotient rounded once: its floor is the true floor
        # (the reference's `linspace` could land a hair below an integer).
        src = coord * (side - 1) / max(size - 1, 1)
    else:
        src = ((coord + 0.5) * side / size - 0.5).clamp(min=0)  # half-pixel centres
    low = src.floor()
    frac = src - low
    low = low.long()
    return low, (low + 1).clamp(max=side - 1), 1 - frac, frac


@lru_cache(maxsize=256)
def pos_embed_taps(
    h: int, w: int, merge: int, side: int, align_corners: bool = True
) -> tuple[torch.Tensor, ...]:
    """Bilinear resampling of a side x side position table to one frame's h x w patches (merge-block order):
    long [h*w, 4] flat table rows and float32 [h*w, 4] weights, taps ordered (top-left, top-right, bottom-left,
    bottom-right) as in transformers' get_vision_interpolation_indices_and_weights."""
    pos = merge_block_positions(h, w, merge)
    r0, r1, wr0, wr1 = _axis_taps(pos[:, 0], h, side, align_corners)
    c0, c1, wc0, wc1 = _axis_taps(pos[:, 1], w, side, align_corners)
    index = torch.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], dim=-1)
    weight = torch.stack([wr0 * wc0, wr0 * wc1, wr1 * wc0, wr1 * wc1], dim=-1)
    return index, weight


def build_layout(
    grids: Sequence[Grid],
    *,
    merge: int,
    window: int | None,
    inv_freq: torch.Tensor,
    pos_side: int | None,
    align_corners: bool,
    device: torch.device,
) -> VisionLayout:
    """The layout of a batch of grids. `window`: merged tokens per window side, None for no windows;
    `pos_side`: side of the learned position table (Qwen3-VL), None for none."""
    unit = merge**2
    positions, orders, windows, frames, taps, tap_weights = [], [], [], [], [], []
    offset = 0
    for t, h, w in grids:
        positions.append(merge_block_positions(h, w, merge).repeat(t, 1))
        order, lengths = window_partition(t, h, w, merge, window)
        orders.append(order + offset)
        windows.append(lengths)
        frames.append(torch.full((t,), h * w))
        if pos_side is not None:
            index, weight = pos_embed_taps(h, w, merge, pos_side, align_corners)
            taps.append(index.repeat(t, 1))
            tap_weights.append(weight.repeat(t, 1))
        offset += t * h * w // unit
    window_index = torch.cat(orders)
    # Rotary angles per patch: head_dim/4 frequencies for the row, as many for the column, [rows | columns]
    # doubled for the (i, i + head_dim/2) rotation pairs; then put in the hidden states' (window) order.
    angles = (torch.cat(positions)[..., None].float() * inv_freq.float().cpu()).flatten(1)
    angles = torch.cat([angles, angles], dim=-1)
    if window is not None:
        angles = angles[(window_index[:, None] * unit + torch.arange(unit)).flatten()]

    def cumulative(lengths: torch.Tensor) -> torch.Tensor:
        return F.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)

    return VisionLayout(
        cos=angles.cos().to(device),
        sin=angles.sin().to(device),
        cu_seqlens=cumulative(torch.cat(frames)),
        window_index=window_index.to(device),
        cu_window_seqlens=cumulative(torch.cat(windows) * unit),
        pos_index=torch.cat(taps).to(device) if taps else None,
        pos_weight=torch.cat(tap_weights).to(device) if taps else None,
    )
