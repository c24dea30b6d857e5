"""fosctrain.allocator: glibc's thresholds are raised once per process, elsewhere a no-op."""

from __future__ import annotations

import platform

import pytest

from fosctrain.allocator import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_thresholds_are_raised_once():
    assert keep_freed_memory() is True
    assert keep_freed_memory.cache_info().currsize == 1  # the second call does nothing
    keep_freed_memory()
    assert keep_freed_memory.cache_info().hits >= 1
