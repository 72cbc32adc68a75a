"""The recurrent state of linear-attention layers (Qwen3.5), one slot per running sequence.

Softmax attention keeps every past key and value, so its cache grows with the sequence and can be paged and
shared between prompts with a common prefix. A linear-attention layer instead folds the past into a fixed-size
state (models/gated_deltanet.py): the last few inputs of its convolution, and the delta rule's matrix per value
head. A sequence therefore owns one slot of this pool from its first computed token until it finishes or is
preempted; a slot is zeroed when a sequence (re)starts from its first token.

Because a state summarises a whole prefix and cannot be cut back to a shorter one, hybrid models run without
prefix caching (the engine turns it off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import LinearAttentionConfig


class RecurrentStatePool:
    def __init__(self, cfg: LinearAttentionConfig, num_slots: int, dtype: torch.dtype, device: torch.device | str):
        layers = len(cfg.layers)
        # The convolution's inputs are kept in the model's type (as the reference does), the delta rule's state
        # in float32. Uninitialised: a slot is zeroed when a sequence takes it, and untouched pages cost nothing.
        self.conv = torch.empty(layers, num_slots, cfg.conv_channels, cfg.conv_kernel - 1, dtype=dtype, device=device)
        self.delta = torch.empty(layers, num_slots, cfg.num_value_heads, cfg.key_head_dim, cfg.value_head_dim,
                                 dtype=torch.float32, device=device)
        self.free = list(range(num_slots - 1, -1, -1))
        self.owner: dict[int, int] = {}  # id(sequence) → slot

    def slot_for(self, seq: object, fresh: bool) -> int:
        """The slot of `seq`, taken now if it has none; zeroed if `fresh` (the sequence starts at token 0)."""
        slot = self.owner.get(id(seq))
        if slot is None:
            if not self.free:
                raise RuntimeError("no free recurrent-state slot: more sequences run than the pool was sized for")
            slot = self.owner[id(seq)] = self.free.pop()
        if fresh:
            self.conv[:, slot].zero_()
            self.delta[:, slot].zero_()
        return slot

    def release(self, seq: object) -> None:
        slot = self.owner.pop(id(seq), None)
        if slot is not None:
            self.free.append(slot)


@dataclass
class RecurrentBatch:
    """Which rows of a packed batch belong to which state slot: the view a linear-attention layer reads.

    `single_rows` (rows, slots) are sequences that add one token this step, updated together; `runs` are
    (start, stop, slot) chunks of several tokens of one sequence each. Rows and slots that are consecutive (the
    usual decode step) are slices, so the layers read and update the pool in place instead of gathering and
    scattering every state (which cost ~4 ms of a ~30 ms step of Qwen3.5-0.8B's shapes)."""

    conv: torch.Tensor
    delta: torch.Tensor
    single_rows: tuple[torch.Tensor | slice, torch.Tensor | slice] | None
    runs: list[tuple[int, int, int]]

    @classmethod
    def build(cls, conv: torch.Tensor, delta: torch.Tensor, pieces: list[tuple[int, int, int]]) -> RecurrentBatch:
        """`pieces`: (start, stop, slot) of each sequence's rows in the batch."""
        singles = [(start, slot) for start, stop, slot in pieces if stop - start == 1]
        rows = None
        if singles:
            rows = (_index([r for r, _ in singles], conv.device), _index([s for _, s in singles], conv.device))
        return cls(conv, delta, rows, [p for p in pieces if p[1] - p[0] > 1])

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(convolution inputs [slots, channels, kernel − 1], delta-rule state [slots, Hv, Dk, Dv]) of one layer."""
        return self.conv[index], self.delta[index]


def _index(values: list[int], device: torch.device) -> torch.Tensor | slice:
    if values == list(range(values[0], values[0] + len(values))):
        return slice(values[0], values[0] + len(values))
    return torch.tensor(values, device=device)


def single_sequence_states(cfg: LinearAttentionConfig, dtype: torch.dtype, device: torch.device | str) -> RecurrentBatch:
    """A zeroed one-slot state for a lone sequence outside the engine's pool (KVCache: LLM.logits); the batch
    layout is set per call with `for_rows`."""
    pool = RecurrentStatePool(cfg, 1, dtype, device)
    pool.slot_for(None, fresh=True)
    return RecurrentBatch(pool.conv, pool.delta, None, [])


def for_rows(states: RecurrentBatch, count: int) -> RecurrentBatch:
    """The lone sequence's state (slot 0) over `count` new rows."""
    return RecurrentBatch.build(states.conv, states.delta, [(0, count, 0)])
