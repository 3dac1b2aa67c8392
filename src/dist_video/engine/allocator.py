"""Keep freed memory in the process for reuse (Linux with glibc, CPU runs).

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold
(128 KiB, raised on the fly to at most 32 MiB) with fresh ``mmap`` pages and returns them to
the kernel on ``free``, so every large activation of every step is zero-filled and
page-faulted again (benchmarks/README.md, "Training cost", has the effect on a training step).
Raising the threshold and the trim limit keeps freed blocks in malloc's heap, which is what
tcmalloc or jemalloc (the allocators Intel recommends for PyTorch on CPUs) do too.

The setting is process-wide and only changes where memory comes from, never values. The
library never makes it on its own: the command line applies it for CPU runs (not for
``--window`` runs over long videos), and the benchmarks for theirs; set
``DIST_VIDEO_KEEP_FREED_MEMORY=0`` to leave malloc alone. It is skipped when ``LD_PRELOAD``
brings in another allocator or ``MALLOC_MMAP_THRESHOLD_`` is set already.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_LIMIT = 2**31 - 1  # mallopt takes an int: 2 GiB


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel.

    Returns whether the setting is in effect (False on other platforms and allocators, or
    when turned off with ``DIST_VIDEO_KEEP_FREED_MEMORY=0``). Calling it again sets the same
    values again."""
    if os.environ.get("DIST_VIDEO_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "jemalloc" in preload or "tcmalloc" in preload:
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(_M_MMAP_THRESHOLD, _LIMIT) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _LIMIT) == 1
    except (OSError, AttributeError):
        return False
