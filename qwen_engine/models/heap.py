"""Large activations reused, not faulted in afresh, layer after layer (glibc; elsewhere nothing changes).

glibc serves an allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it when it is
freed, so every large activation of a tower (70-90 MB at 1024x1024) has its pages faulted in and zeroed by the
kernel again, in every block: ~20 % of an int8 product's time there ([4096, 1024] x [1024, 4096]: 54 ms with
the pages reused, 69 ms without). Inside `heap_for_large_tensors()`, allocations of any size come from the heap,
whose freed blocks the next ones reuse; on the way out the heap's free pages go back to the system
(malloc_trim), so the process does not keep the pass's peak.

Text models take those settled thresholds when their engine starts (`settle_thresholds`). Until then glibc maps
blocks above a threshold that starts at 128 KiB, raises it only as large blocks are freed, and hands the top of
its heap back beyond twice it: a 523-token prefill of the demo model faulted its 2-20 MB activations in afresh
layer after layer (85-117 k minor faults a prefill, against 3 k with the settled thresholds; 5-10 % of its time,
docs/benchmarks.md, forty-third pass).

mallopt turns off glibc's dynamic threshold for good, so on the way out the thresholds are set to where that
rule settles once large blocks have been freed (mmap above 32 MiB, trim above 64 MiB), not back to the
start-up values (128 KiB), which would send every mid-sized tensor to mmap from then on.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_MMAP_MAX_DEFAULT = 65536
_THRESHOLD_SETTLED = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit hosts
_NEVER = 2**31 - 1

_lock = threading.Lock()
_depth = 0


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    # musl and others lack malloc_trim (and musl's mallopt does nothing)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


@contextmanager
def heap_for_large_tensors() -> Iterator[None]:
    """Large allocations from the heap while inside (nested or from several threads: the outermost exit
    restores)."""
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _LIBC.mallopt(_M_MMAP_MAX, 0)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _NEVER)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
                _settle(_LIBC)
                _LIBC.malloc_trim(0)


def settle_thresholds() -> None:
    """glibc's mmap and trim thresholds set where its dynamic rule settles (mmap above 32 MiB, trim above 64 MiB),
    so that activations below 32 MiB come from the heap and reuse its freed blocks (a no-op inside
    heap_for_large_tensors, which settles them on its way out)."""
    if _LIBC is None:
        return
    with _lock:
        if _depth == 0:
            _settle(_LIBC)


def _settle(libc: ctypes.CDLL) -> None:
    libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_SETTLED)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * _THRESHOLD_SETTLED)
