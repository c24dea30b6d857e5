"""Keep freed memory for reuse instead of handing it back to the kernel at once.

glibc's malloc serves every block above its mmap threshold (adapted up to at most 32 MB) with
a fresh mmap and unmaps it on free, so a forward pass whose activations exceed that (a batch of
500 MNIST digits through mnist-cnn: ~50 MB) page-faults its memory in anew every time. On this
2-core machine that doubled the time of an evaluation: APGD-CE on 500 digits took 48 s (15 s
of it in the kernel) and 24 s with the threshold raised (benchmarks/allocator.py measures it
side by side). Raising the mmap threshold to 128 MB keeps such blocks in the heap; larger ones
(FAB's per-class Jacobians: 10 copies of the batch) are still mapped and returned, and the
trim threshold of 256 MB returns a freed heap top beyond that, so a process does not keep a
passing peak of gigabytes. A no-op where libc is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD, TRIM_THRESHOLD = 128 << 20, 256 << 20


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; whether it took effect."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mapped = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return bool(mapped) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
