"""``--allocator``: how the C allocator hands memory to a training run's tensors.

PyTorch's CPU tensors come from the C library's malloc. glibc serves a request above its
mmap threshold (128 KiB, rising to at most 32 MiB as large blocks are freed) with a fresh
mapping and unmaps it on free, so every training step maps its large activations and
gradients anew and the kernel zero-fills each page on first touch: a page fault per 4 KiB.
Where faults are expensive (virtual machines, memory-managed hosts) that is a large share
of a step; on the 2-core Xeon VM of benchmarks/NOTES.md VGG16's step spent about a third of
its time there.

``reuse`` asks glibc (``mallopt``) to serve large requests from the heap and to keep freed
memory mapped, so step 2 onwards reuses step 1's pages with no faults. The price is peak
resident memory: freed blocks stay resident and the heap fragments (VGG16, batch 8 at 224:
+0.4 GB). ``system`` (the default) leaves malloc as it is. The arithmetic never changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
from dataclasses import dataclass

ALLOCATORS = ("system", "reuse")

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2 ** 31 - 1        # mallopt takes an int
_HEAP_UP_TO = 2 ** 30         # requests below 1 GiB come from the heap (every activation)


@dataclass
class AllocatorChoice:
    name: str          # what was asked for
    applied: bool      # the process now runs with it
    line: str          # one line for the log


def use_allocator(name: str) -> AllocatorChoice:
    """Apply ``name`` to this process (call it before the nets are built). Raises ValueError
    for an unknown name; ``reuse`` off glibc, or refused by it, changes nothing and says so."""
    if name not in ALLOCATORS:
        raise ValueError(f"--allocator '{name}': known allocators are {', '.join(ALLOCATORS)}")
    if name == "system":
        return AllocatorChoice(name, True, "Allocator system: the C library's defaults")
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return AllocatorChoice(name, False, "--allocator reuse needs glibc's malloc; this is "
                               f"{libc_name or 'another C library'}: allocator unchanged")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_UP_TO) != 1 or \
            libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) != 1:
        return AllocatorChoice(name, False, "--allocator reuse: glibc refused the mallopt "
                               "settings: allocator unchanged")
    return AllocatorChoice(name, True, "Allocator reuse: tensors below 1 GiB come from the "
                           "heap and freed memory stays mapped (fewer page faults per step, "
                           "higher peak memory)")
