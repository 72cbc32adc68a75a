"""Weights the loader re-encodes (weights/quantized.py), kept in one anonymous mapping that may be backed by 2 MiB
pages.

A decode step reads every weight once. Spread over 4 KiB pages, ~65,000 of them a step for the demo model's
re-encoded weights, each costs a TLB miss and stops the CPU's hardware prefetchers at its edge; in 2 MiB pages
the same bytes stream faster (the 24 Q8_0 gate+up weights on the AVX2 host: 26–27 GB/s in 4 KiB pages, 28–30
in 2 MiB pages). QWEN_ENGINE_HUGE_PAGES=1 advises the mapping for transparent huge pages (Linux, THP in
`madvise` or `always` mode), =0 never. Unset, the arena takes huge pages when the kernel has enough free 2 MiB
blocks to back all of it without compacting memory (/proc/buddyinfo): compacting cost ~12 ms a page at load on
a virtual machine whose memory was fragmented (~2 s for the demo model), while free blocks cost ~0.4 s more
than small pages (their first touch), and the decode step runs 1.06-1.2x faster in them (docs/benchmarks.md,
twentieth pass; 1.12x on the Zen 4 host of the thirty-sixth, where their first touch had grown to 0.4-0.9 s and
is now made from every core at once: fault_in).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading

import numpy as np
import torch

from .. import kernels

HUGE_PAGE = 2 << 20
ALIGN = 4096  # each weight starts on its own page: a kernel's prefetch past one weight's end stays in the arena


def free_huge_pages() -> int:
    """2 MiB pages the kernel could hand out now without compacting memory (0 where THP is off or unknown)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return 0
        with open("/proc/buddyinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    pages = 0
    for line in lines:  # "Node 0, zone   Normal  n0 n1 ... n10": free blocks of 2^order small pages
        counts = line.split()[4:]
        pages += sum(int(n) << (order - 9) for order, n in enumerate(counts) if order >= 9)
    return pages


def huge_pages_wanted(size: int) -> bool:
    """Whether an arena of `size` bytes should ask for huge pages (QWEN_ENGINE_HUGE_PAGES, else free blocks)."""
    choice = os.environ.get("QWEN_ENGINE_HUGE_PAGES")
    if choice in ("0", "1"):
        return choice == "1"
    return free_huge_pages() >= 2 * (size // HUGE_PAGE + 1)  # leave as many for everything else


def fault_in(address: int, size: int) -> None:
    """Touches each 2 MiB page of [address, address + size) once, from as many threads as there are cores. A huge
    page's first touch has the kernel zero it (and, on a virtual machine, the host back it): 0.4-0.9 s of the demo
    model's load when the copies into the arena met the pages one by one, 0.05-0.2 s for 420 MiB from two threads
    (docs/benchmarks.md, thirty-sixth pass)."""
    pages = list(range(address - address % HUGE_PAGE, address + size, HUGE_PAGE))
    workers = max(1, min(kernels.available_cores(), len(pages)))

    def run(share: list[int]) -> None:
        for page in share:
            ctypes.memset(max(page, address), 0, 1)  # a foreign call: no GIL held while the page faults in

    threads = [threading.Thread(target=run, args=(pages[i::workers],), daemon=True) for i in range(1, workers)]
    for t in threads:
        t.start()
    run(pages[::workers])
    for t in threads:
        t.join()


class WeightArena:
    """Byte tensors carved one after another from a single mapping of `size` bytes (plus alignment)."""

    def __init__(self, size: int, huge_pages: bool | None = None) -> None:
        """huge_pages: None decides by huge_pages_wanted(size)."""
        self._map = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        self.huge_pages = huge_pages_wanted(size) if huge_pages is None else huge_pages
        if advice is not None and self.huge_pages:
            try:
                self._map.madvise(advice)
            except OSError:  # a kernel without THP: plain pages, same layout
                self.huge_pages = False
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        # Start on a huge-page boundary, so the first weight's pages are whole huge pages too.
        self._used = -self._bytes.data_ptr() % HUGE_PAGE
        self._end = self._used + size
        if self.huge_pages:
            fault_in(self._bytes.data_ptr() + self._used, size)

    def hold(self, data: torch.Tensor) -> torch.Tensor:
        """A copy of the uint8 tensor `data` (any shape) inside the arena."""
        view = self.take(tuple(data.shape))
        view.copy_(data)
        return view

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The next uint8 tensor of `shape` in the arena, for the caller to fill."""
        nbytes = int(np.prod(shape))
        start = self._used
        stop = start + nbytes
        if stop > self._end:
            raise ValueError(f"weight arena full: {stop - self._end} bytes over its {self._end} bytes")
        self._used = start + self.size_for_bytes(nbytes)
        return self._bytes[start:stop].view(shape)

    @staticmethod
    def size_for_bytes(nbytes: int) -> int:
        """The room a tensor of `nbytes` bytes takes in an arena (arena sizes are sums of these)."""
        return (nbytes + ALIGN - 1) // ALIGN * ALIGN
