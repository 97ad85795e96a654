"""Keep glibc malloc from returning memory to the kernel on every large read.

uvloop hands each read to the protocol as a new bytes object of up to 256 KiB. With
glibc's defaults such a block is either mmap()ed and munmap()ed per read, or, once the
dynamic threshold has grown past it, freed at the top of the heap, where glibc trims
the heap (brk) as soon as more than twice that threshold is free. Either way every
large read pays syscalls and page faults.

Fixing both thresholds keeps such blocks in the heap, and keeps up to TRIM_THRESHOLD of
free heap instead of giving it back after every read, the way nginx keeps its buffers.
The cost: RSS does not shrink after a burst by up to that much. Measured
(benchmarks/README.md, `bench.py --src before --src after`): POST 300 KB at c50 went
from 223 to 139 µs of CPU per request, GET 1 MiB from 433 to 392. 8 MiB of kept heap
gives the same gain as 32 MiB, for less memory held after a burst.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1   # from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1024 * 1024       # reads (<= 256 KiB) always come from the heap
TRIM_THRESHOLD = 8 * 1024 * 1024    # free heap kept before giving it back


def keep_read_buffers() -> bool:
    """Set both thresholds; False where there is no glibc (musl, macOS): nothing to do."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
