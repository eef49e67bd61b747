"""Host-process tuning for training on the CPU.

A CPU training step frees and re-allocates the same few hundred MB of activations and gradients every step. With
glibc's default malloc settings much of that memory goes back to the kernel and is faulted in again on the next step
(about 300k minor page faults per ViT-B step, 4-7 % of the step time on a 2-vCPU machine; BENCHMARKS.md). Keeping
freed memory in the process removes them without raising the peak RSS (the peak is the same working set).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["keep_freed_host_memory"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_done = False


def keep_freed_host_memory(*, threshold_bytes: int = 1 << 30, top_pad_bytes: int = 64 << 20) -> bool:
    """Make glibc malloc serve allocations up to ``threshold_bytes`` from its heap and keep up to that much freed
    memory instead of returning it to the kernel (``mallopt`` M_MMAP_THRESHOLD / M_TRIM_THRESHOLD / M_TOP_PAD).

    Process-wide and idempotent; call it once at the start of a CPU training process, before the model is built.
    Returns whether the settings were applied (False off Linux/glibc).
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, threshold_bytes), (_M_TRIM_THRESHOLD, threshold_bytes), (_M_TOP_PAD, top_pad_bytes)))
    if not ok:
        logger.info("mallopt rejected the host allocator settings; freed memory may be returned to the kernel")
    _done = ok
    return ok
