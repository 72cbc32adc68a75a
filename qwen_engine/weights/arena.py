"""Weights the loader re-encodes (weights/quantized.py), kept in one anonymous mapping that may be backed by 2 MiB
pages.

A decode step reads every weight once. Spread over 4 KiB pages, ~65,000 of them a step for the demo model's
re-encoded weights, each costs a TLB miss and stops the CPU's hardware prefetchers at its edge; in 2 MiB pages
the same bytes stream faster (the 24 Q8_0 gate+up weights on the AVX2 host: 26–27 GB/s in 4 KiB pages, 28–30
in 2 MiB pages). QWEN_ENGINE_HUGE_PAGES=1 advises the mapping for transparent huge pages (Linux, THP in
`madvise` or `always` mode). It is off by default: on a virtual machine whose memory was never touched, getting
the huge pages cost up to ~2 s at load here (the hypervisor backs each one on first touch), against the
~0.1 s of small pages, so it pays for long-running servers rather than one-off commands.
"""

from __future__ import annotations

import mmap
import os

import torch

HUGE_PAGE = 2 << 20
ALIGN = 4096  # each weight starts on its own page: a kernel's prefetch past one weight's end stays in the arena


class WeightArena:
    """Byte tensors carved one after another from a single mapping of `size` bytes (plus alignment)."""

    def __init__(self, size: int) -> None:
        self._map = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None and os.environ.get("QWEN_ENGINE_HUGE_PAGES") == "1":
            try:
                self._map.madvise(advice)
            except OSError:  # a kernel without THP: plain pages, same layout
                pass
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        # Start on a huge-page boundary, so the first weight's pages are whole huge pages too.
        self._used = -self._bytes.data_ptr() % HUGE_PAGE
        self._end = self._used + size

    def hold(self, data: torch.Tensor) -> torch.Tensor:
        """A copy of the uint8 tensor `data` (any shape) inside the arena."""
        start = self._used
        stop = start + data.numel()
        if stop > self._end:
            raise ValueError(f"weight arena full: {stop - self._end} bytes over its {self._end} bytes")
        view = self._bytes[start:stop].view(data.shape)
        view.copy_(data)
        self._used = start + self.size_for_bytes(data.numel())
        return view

    @staticmethod
    def size_for_bytes(nbytes: int) -> int:
        """The room a tensor of `nbytes` bytes takes in an arena (arena sizes are sums of these)."""
        return (nbytes + ALIGN - 1) // ALIGN * ALIGN
