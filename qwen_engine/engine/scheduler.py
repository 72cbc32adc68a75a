"""Continuous batching: every step, decide which sequences advance and by how many tokens.

Every request is "N more tokens to compute" (vLLM v1's view), so prefill and decode mix freely: running
sequences go first (a decode needs one token, an unfinished prefill takes what the budget allows), then waiting
ones join while budget and blocks last. Long prompts are prefilled in chunks, so running streams keep moving.
When blocks run out, the newest running sequence is preempted: its blocks are released and it is recomputed
later (its full blocks usually come straight back from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class Chunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed


class Scheduler:
    def __init__(
        self, blocks: BlockManager, max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
        max_tokens_alone: int = 2048, on_release=None, resumable=None,
    ):
        self.blocks = blocks
        # Called with a sequence whose computed tokens are dropped (finished, cancelled or preempted): hybrid
        # models free its recurrent state there.
        self.on_release = on_release
        # Hybrid models with prefix caching: whether computing may resume after a cached block (a recurrent state
        # was saved there; BlockManager.match_prefix), and prompts are prefilled in chunks that stop at their
        # last block boundary, where the engine saves the state (engine/recurrent_state.py).
        self.resumable = resumable
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Chunks keep other sequences moving; a lone sequence has nobody to wait for, and bigger products run
        # faster, so it may take up to this many tokens a step.
        self.max_tokens_alone = max_tokens_alone
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.forced: list[Sequence] = []  # sequences the scheduler had to end; the engine reports them

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or cancelled sequence and give its blocks back at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.table)
        if self.on_release is not None:
            self.on_release(seq)
        seq.status = Status.FINISHED

    def schedule(self) -> list[Chunk]:
        budget = self.max_num_batched_tokens
        if len(self.running) + len(self.waiting) == 1:
            budget = max(budget, self.max_tokens_alone)
        chunks: list[Chunk] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            while not self.blocks.grow(seq.table, seq.num_computed + n):
                if len(self.running) == 1:
                    # Alone and still too big for the whole pool: end it rather than loop forever.
                    seq.end("length")
                    self.finish(seq)
                    self.forced.append(seq)
                    return chunks
                self._preempt(self.running[-1])
                preempted = True
                if seq.status is not Status.RUNNING:
                    break
            if seq.status is not Status.RUNNING:
                break
            chunks.append(Chunk(seq, n))
            budget -= n
            i += 1

        # New work joins only when nothing had to be preempted: otherwise it would be preempted next.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if not seq.table.block_ids:
                seq.num_computed = self.blocks.match_prefix(seq.table, seq.token_ids, seq.block_extras,
                                                            self.resumable)
                if not seq.output_ids:
                    seq.num_cached_prompt = seq.num_computed
            n = self._chunk(seq, budget)
            if not self.blocks.grow(seq.table, seq.num_computed + n):
                self.blocks.release(seq.table)
                seq.num_computed = 0
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(Chunk(seq, n))
            budget -= n
        return chunks

    def _chunk(self, seq: Sequence, budget: int) -> int:
        n = min(seq.num_uncomputed, budget)
        if self.resumable is not None and self.blocks.enable_prefix_caching:
            boundary = self.state_boundary(seq)
            if seq.num_computed < boundary < seq.num_computed + n:
                n = boundary - seq.num_computed
        return n

    def state_boundary(self, seq: Sequence) -> int:
        """The last block boundary a request with the same prompt can resume from (one token is always left
        to compute)."""
        bs = self.blocks.block_size
        return (len(seq.prompt_ids) - 1) // bs * bs

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.table)
        if self.on_release is not None:
            self.on_release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
