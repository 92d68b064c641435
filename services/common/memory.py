"""Process memory settings shared by the servers."""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3           # glibc mallopt parameters


def tune_malloc() -> None:
    """Keep glibc from handing freed MiB-sized buffers back to the kernel after every use.

    The registry allocates and frees ~1 MiB buffers per FetchAdapter chunk; the executor allocates
    and frees activations of 1-32 MiB per layer. With glibc's default dynamic thresholds each such
    free is an munmap/trim and the next allocation pays fresh page faults (~256 per MiB): elementwise
    ops ran 2-3x slower and engine throughput ~15% lower here. Fixed thresholds keep it for reuse.
    No-op off glibc, or when MALLOC_TRIM_THRESHOLD_/MALLOC_MMAP_THRESHOLD_ are set by the operator."""
    if "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)
