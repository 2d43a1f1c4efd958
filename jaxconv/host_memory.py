"""Keep the host memory XLA:CPU allocates afresh for every call mapped, step after step.

XLA:CPU allocates one temporary buffer per execution of a compiled function (1.29 GB for a
ResNeXt-50 train step at batch 8) and frees it when the call ends. glibc serves an allocation
that large with a fresh mmap, so every step touches 1.29 GB of new pages: 316k page faults and
the kernel zeroing each page, about a third of the step's time on 2 cores (BENCHMARKS.md, "Host
memory"). PyTorch allocates per tensor, below glibc's mmap threshold, and reuses its heap.

`configure()`, run by ``import jaxconv``, asks glibc to serve every allocation from the main
heap and never hand its top back (mallopt: M_ARENA_MAX 1, M_MMAP_MAX 0, M_TRIM_THRESHOLD
unlimited), so later calls reuse the pages of the first. The process keeps its peak host memory
(as PyTorch's caching allocator keeps GPU memory). It reaches the threads that have not yet
allocated from an arena of their own, i.e. import jaxconv before the first JAX computation; the
environment variables MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large> set
before the process starts do the same for every thread. JAXCONV_TUNE_MALLOC=0 leaves glibc's
defaults; elsewhere than Linux with glibc, nothing is changed.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8   # glibc's <malloc.h>

configured = False   # whether configure() changed glibc's settings in this process


def configure() -> bool:
    """Apply the settings above once (unless JAXCONV_TUNE_MALLOC=0); True if they are in force."""
    global configured
    if configured or os.environ.get("JAXCONV_TUNE_MALLOC", "1") == "0":
        return configured
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # M_ARENA_MAX first: a thread that allocates meanwhile must not get an arena of its own;
    # -1 is SIZE_MAX to glibc's size_t setting: never trim
    configured = all(mallopt(opt, value) == 1 for opt, value in
                     ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
    return configured
