"""The host allocator: freed memory kept for reuse, so that training steps do not fault the same pages in again.

No torch import here: the CLI calls this before any command, ``--help`` included.
"""

from __future__ import annotations

import ctypes
import os
import platform

#: glibc's mallopt parameters (malloc.h): the size above which freed memory at the heap's top goes back to the
#: system, and how many blocks may be mapped on their own.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_HOST_MEMORY_KEPT = False


def keep_freed_host_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of returning it to the system.

    A training step allocates and frees tensors of tens of MB (a CUB batch of feature maps is 80 MB); glibc
    maps each one afresh and unmaps it when freed, so every step pays page faults that zero those pages again:
    on the CUB shape a fifth of the float32 step on 2 CPU cores (docs/performance.md). Served from the heap,
    the same memory is reused. The peak memory does not grow (what a step frees is what the next one takes),
    but the process keeps its high-water mark until it ends. Once per process; glibc only (elsewhere, and
    when ``DEDN_SYSTEM_MALLOC=1``, nothing changes). True when the setting was applied.
    """
    global _HOST_MEMORY_KEPT
    if _HOST_MEMORY_KEPT:
        return True
    if os.environ.get("DEDN_SYSTEM_MALLOC") == "1" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _HOST_MEMORY_KEPT = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _HOST_MEMORY_KEPT
