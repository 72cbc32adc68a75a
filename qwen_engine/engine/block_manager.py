"""The KV block pool: allocation, per-sequence block tables, and the prefix cache.

A full block is named by a hash of its tokens chained with the previous block's hash (plus the content hash of
any image or video whose placeholders fall inside it), so equal prefixes give equal names. A hit is confirmed
by comparing token ids. Blocks are reference-counted; a block nobody uses keeps its contents and its name until
the pool needs it back, least recently used first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()


def block_hash(parent: bytes | None, token_ids: list[int] | tuple[int, ...], extra: bytes = b"") -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent or b"root")
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    digest.update(extra)
    return digest.digest()


@dataclass
class BlockTable:
    """A sequence's blocks in order, and the names of its leading full blocks."""

    block_ids: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.cached: dict[bytes, int] = {}  # block hash → block id
        self.hits = 0  # prefix-cache statistics, in tokens
        self.queries = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ----------------------------------------------------------------------------------------

    def match_prefix(self, table: BlockTable, token_ids: list[int], extra: list[bytes] | None = None,
                     resumable=None) -> int:
        """Attach the cached blocks that hold a prefix of `token_ids`; return how many tokens they cover.

        At least one token is always left to compute, since its logits are needed. `extra[i]` is mixed into
        block i's hash (the vision content it holds). `resumable(hash)`: whether computing may resume after
        the block of that name (hybrid models: a recurrent state was saved there); the match stops at the last
        such block.
        """
        assert not table.block_ids, "prefix matching is for a sequence that holds no blocks"
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        usable = (len(token_ids) - 1) // bs
        parent = None
        for i in range(usable):
            chunk = token_ids[i * bs : (i + 1) * bs]
            h = block_hash(parent, chunk, extra[i] if extra and i < len(extra) else b"")
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(chunk):
                break
            self._take(block_id)
            table.block_ids.append(block_id)
            table.hashes.append(h)
            parent = h
        if resumable is not None:
            keep = len(table.hashes)
            while keep and not resumable(table.hashes[keep - 1]):
                keep -= 1
            self._drop_tail(table, keep)
        matched = len(table.block_ids) * bs
        self.queries += len(token_ids)
        self.hits += matched
        return matched

    def register_full_blocks(
        self, table: BlockTable, token_ids: list[int], num_computed: int, extra: list[bytes] | None = None
    ) -> None:
        """Name every block that is now full of computed tokens, so later requests can reuse it."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while len(table.hashes) < num_computed // bs:
            i = len(table.hashes)
            chunk = token_ids[i * bs : (i + 1) * bs]
            parent = table.hashes[-1] if table.hashes else None
            h = block_hash(parent, chunk, extra[i] if extra and i < len(extra) else b"")
            table.hashes.append(h)
            block = self.blocks[table.block_ids[i]]
            if h not in self.cached and block.hash is None:
                block.hash, block.token_ids = h, tuple(chunk)
                self.cached[h] = block.id

    # -- allocation ------------------------------------------------------------------------------------------

    def can_grow(self, table: BlockTable, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(table.block_ids) <= len(self.free)

    def grow(self, table: BlockTable, num_tokens: int) -> bool:
        """Make `table` hold `num_tokens` tokens; False (and nothing allocated) if the pool is short."""
        missing = self.blocks_needed(num_tokens) - len(table.block_ids)
        if missing > len(self.free):
            return False
        for _ in range(missing):
            block_id = next(iter(self.free))
            self._evict(block_id)
            self._take(block_id)
            table.block_ids.append(block_id)
        return True

    def release(self, table: BlockTable) -> None:
        """Drop a sequence's references. Tail blocks go first in the LRU, so shared prefixes live longest."""
        self._drop_tail(table, 0)

    def _drop_tail(self, table: BlockTable, keep: int) -> None:
        """Drop the references of all but the first `keep` blocks of `table`."""
        for block_id in reversed(table.block_ids[keep:]):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)  # nothing worth keeping: reuse first
        del table.block_ids[keep:]
        del table.hashes[keep:]

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
