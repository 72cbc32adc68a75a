"""The recurrent state of linear-attention layers (Qwen3.5), one slot per running sequence.

Softmax attention keeps every past key and value, so its cache grows with the sequence and can be paged and
shared between prompts with a common prefix. A linear-attention layer instead folds the past into a fixed-size
state (models/gated_deltanet.py): the last few inputs of its convolution, and the delta rule's matrix per value
head. A sequence therefore owns one slot of this pool from its first computed token until it finishes or is
preempted; a slot is zeroed when a sequence (re)starts from its first token.

A state summarises its whole prefix and cannot be cut back to a shorter one, so prefix caching needs states
saved where a later request may resume: the pool keeps snapshots of states at block boundaries, named by the hash
of the block that ends there (the prefix cache's own names, which cover the tokens and any images before).
The engine saves one at the last block boundary of each prompt (the scheduler ends a prefill chunk there) and
one at the latest boundary a sequence's answer crossed (the next turn of a chat resumes from it); the prefix
cache then matches only as far as the last block whose state was saved. Least recently used snapshots go first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..config import LinearAttentionConfig


class RecurrentStatePool:
    def __init__(self, cfg: LinearAttentionConfig, num_slots: int, dtype: torch.dtype, device: torch.device | str,
                 num_snapshots: int = 0):
        layers = len(cfg.layers)
        # The convolution's inputs are kept in the model's type (as the reference does), the delta rule's state
        # in float32. Uninitialised: a slot is zeroed when a sequence takes it, and untouched pages cost nothing.
        # Snapshots sit after the running slots, in the same tensors.
        total = num_slots + num_snapshots
        self.conv = torch.empty(layers, total, cfg.conv_channels, cfg.conv_kernel - 1, dtype=dtype, device=device)
        self.delta = torch.empty(layers, total, cfg.num_value_heads, cfg.key_head_dim, cfg.value_head_dim,
                                 dtype=torch.float32, device=device)
        self.free = list(range(num_slots - 1, -1, -1))
        self.owner: dict[int, int] = {}  # id(sequence) → slot
        self.free_snapshots = list(range(total - 1, num_slots - 1, -1))
        self.snapshots: OrderedDict[bytes, int] = OrderedDict()  # block hash → snapshot slot, least recent first
        self.latest: dict[int, bytes] = {}  # id(sequence) → its answer's latest snapshot, replaced as it grows
        self.restored = 0  # statistics: sequences resumed from a snapshot

    def slot_for(self, seq: object, fresh: bool, resume: bytes | None = None) -> int:
        """The slot of `seq`, taken now if it has none; zeroed if `fresh` (the sequence starts at token 0), or
        filled from the snapshot `resume` (its computed prefix came from the prefix cache)."""
        slot = self.owner.get(id(seq))
        if slot is None:
            if not self.free:
                raise RuntimeError("no free recurrent-state slot: more sequences run than the pool was sized for")
            slot = self.owner[id(seq)] = self.free.pop()
            if resume is not None:
                self._copy(self.snapshots[resume], slot)
                self.snapshots.move_to_end(resume)
                self.restored += 1
                return slot
        if fresh:
            self.conv[:, slot].zero_()
            self.delta[:, slot].zero_()
        return slot

    def release(self, seq: object) -> None:
        slot = self.owner.pop(id(seq), None)
        self.latest.pop(id(seq), None)
        if slot is not None:
            self.free.append(slot)

    # -- snapshots -------------------------------------------------------------------------------------------

    def has_snapshot(self, key: bytes) -> bool:
        return key in self.snapshots

    def save(self, seq: object, key: bytes, replaces_latest: bool = False) -> None:
        """Keep the state of `seq` as snapshot `key`. `replaces_latest`: it supersedes the snapshot this sequence
        saved last the same way (answers save one per block, and only the newest is worth keeping)."""
        slot = self.owner.get(id(seq))
        if slot is None or key in self.snapshots:
            return
        if replaces_latest and (old := self.latest.pop(id(seq), None)) in self.snapshots:
            self.free_snapshots.append(self.snapshots.pop(old))
        if not self.free_snapshots:
            if not self.snapshots:
                return  # (no room for snapshots at all)
            _, evicted = self.snapshots.popitem(last=False)
            self.free_snapshots.append(evicted)
        target = self.snapshots[key] = self.free_snapshots.pop()
        self._copy(slot, target)
        if replaces_latest:
            self.latest[id(seq)] = key

    def _copy(self, source: int, target: int) -> None:
        self.conv[:, target].copy_(self.conv[:, source])
        self.delta[:, target].copy_(self.delta[:, source])


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

    def single_slots(self) -> torch.Tensor:
        """The state slot of each single row, int64 (the native kernels' form of `single_rows`' slots)."""
        slots = self.single_rows[1]
        if isinstance(slots, slice):
            return torch.arange(slots.start, slots.stop, dtype=torch.int64, device=self.conv.device)
        return slots.to(torch.int64).contiguous()

    def decode_slots(self, count: int) -> torch.Tensor | None:
        """Each row's state slot where rows 0..count-1 each add one token, in order (a native decode step), else
        None."""
        rows = self.single_rows[0] if self.single_rows is not None and not self.runs else None
        if not isinstance(rows, slice) or rows != slice(0, count):
            return None
        return self.single_slots()

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
