"""Keep freed memory for reuse instead of handing it back to the kernel at once.

glibc's malloc serves every block above its mmap threshold (adapted up to at most 32 MB) with
a fresh mmap and unmaps it on free, so a forward pass whose activations exceed that (a batch of
500 MNIST digits through mnist-cnn: ~50 MB) page-faults its memory in anew every time. On this
2-core machine that doubled the time of an evaluation: APGD-CE on 500 digits took 48 s (15 s
of it in the kernel) and 24 s with the threshold raised (benchmarks/allocator.py measures it
side by side). Raising the mmap and trim thresholds keeps the blocks in the heap; the process
then holds on to its peak memory, which it reaches anyway. A no-op where libc is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; whether it took effect."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
