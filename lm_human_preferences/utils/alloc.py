"""Process-wide setting of the C allocator for CPU runs.

glibc's malloc hands every allocation above its mmap threshold (at most 32 MB, usually far less) to a fresh mmap and
returns it to the kernel on free. Sampling and training with GPT-2's 50,257-token vocabulary allocate and free
tensors of tens of megabytes (the logits of a batch) many times a step, so each one comes back as fresh pages that
the kernel must fault in and zero: measured here on 2 cores, the demo's label collection spent more time in the
kernel than in PyTorch (12.6 s wall, 12.0 s system time for 256 comparisons; 4.3 s and 0.2 s with this setting).

`keep_freed_memory()` serves every allocation from the heap and never trims it, so freed pages are reused. The
resident size then stays at its high-water mark instead of shrinking after a peak, which is what a training
process does anyway. It changes no number, only where memory comes from. Set LMHP_MALLOC=default to leave the
allocator alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_applied = None


def keep_freed_memory() -> bool:
    """Configures glibc malloc to keep freed memory for reuse (once per process); True when it took effect.

    A no-op returning False off Linux/glibc or with LMHP_MALLOC=default in the environment."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("LMHP_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return _applied
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    return _applied
