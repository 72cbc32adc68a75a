"""M-RoPE positions: where each token of a vision-language prompt sits in (time, height, width).

Text advances all three axes together, one step per token. A block of vision tokens (an image, a video, or on
Qwen3-VL one frame group of a video) starts where the text left off and spreads over its grid of merged patches:
height and width count rows and columns, time counts frames — on Qwen2.5-VL scaled to absolute time
(`second_per_grid_t * tokens_per_second` positions per frame group). The text after a block resumes at the
largest position used so far plus one, as the original Qwen code and transformers 4.x do (transformers 5.x
resumes at start + max(h, w), which ignores a video's time extent; see shared/design/oracle.md §6).

Generated tokens continue from the prompt: token i sits at i + rope_delta on every axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisionSpan:
    start: int  # index of the block's first placeholder token
    grid: tuple[int, int, int]  # (t, h, w) in merged tokens: t frame groups, h rows, w columns
    # Qwen2.5-VL videos: seconds per frame group and temporal positions per second; None: one step per group.
    seconds_per_group: float | None = None
    tokens_per_second: float = 1.0

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


def mrope_positions(num_tokens: int, spans: list[VisionSpan]) -> tuple[torch.Tensor, int]:
    """int64 [3, num_tokens] positions and rope_delta (= largest position + 1 - num_tokens)."""
    pieces = []
    cursor = 0  # next token index
    next_pos = 0  # where the next text token goes
    for span in sorted(spans, key=lambda s: s.start):
        if span.start < cursor or span.start + span.num_tokens > num_tokens:
            raise ValueError(f"vision block at token {span.start} overlaps another or runs past the prompt")
        text = span.start - cursor
        pieces.append(torch.arange(next_pos, next_pos + text).expand(3, -1))
        next_pos += text
        block = _block_positions(span) + next_pos
        pieces.append(block)
        next_pos = int(block.max()) + 1
        cursor = span.start + span.num_tokens
    pieces.append(torch.arange(next_pos, next_pos + num_tokens - cursor).expand(3, -1))
    positions = torch.cat(pieces, dim=1)
    return positions, int(positions.max()) + 1 - num_tokens if num_tokens else 0


def _block_positions(span: VisionSpan) -> torch.Tensor:
    t, h, w = span.grid
    time = torch.arange(t)
    if span.seconds_per_group is not None:
        # As the reference: float32 (group index x seconds per group) x tokens per second, truncated.
        time = (time * torch.tensor(span.seconds_per_group, dtype=torch.float32) * span.tokens_per_second).long()
    grid = torch.stack(torch.meshgrid(time, torch.arange(h), torch.arange(w), indexing="ij"))
    return grid.reshape(3, -1)
