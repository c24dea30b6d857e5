"""Keep freed memory for reuse instead of handing it back to the kernel at once.

glibc's malloc serves every block above its mmap threshold (adapted up to at most 32 MB) with
a fresh mmap and unmaps it on free, so a forward pass whose activations exceed that (a batch of
500 MNIST digits through mnist-cnn: ~50 MB) page-faults its memory in anew every time.
benchmarks/allocator.py measures it side by side (1.9x). evaluate() calls this, and so do
training's validation and final test report (their attack batches are 500 digits: APGD-CE-10
validation of the main job's model took 3.4-3.5 s of CPU instead of 4.5-5.8 s); training's own
batches are small, below the threshold either way. The mmap
threshold of 128 MB keeps such blocks in the heap; larger ones (FAB's per-class Jacobians)
are still mapped and returned, and the trim threshold of 256 MB returns a freed heap top
beyond that. A no-op where libc is not glibc.
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
