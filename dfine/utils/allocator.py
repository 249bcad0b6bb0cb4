"""Keep the memory a step frees for the next step instead of returning it to the kernel (glibc malloc, Linux).

glibc serves blocks above a threshold (128 KiB, raised on the fly up to 32 MiB) straight from mmap and returns
them on free, and trims the top of its heap whenever 128 KiB are free there. A network's activations are
exactly such blocks, freed and requested again every forward pass, so each pass faults every page of them back
in and the kernel zeroes it first: D-FINE-S's eval at 640 px took ~34 000 page faults per image in a fresh
process. With the mmap threshold fixed at glibc's 32 MiB maximum and the heap trimmed only past 2 GiB of free
space at its top, the heap keeps the pages and later passes take next to no faults (blocks over 32 MiB are still
mapped per use). The price is that resident memory stays at its peak instead of shrinking between steps. Set
DFINE_MALLOC_DEFAULTS=1 to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit systems (HEAP_MAX_SIZE / 2)
_NEVER = 2**31 - 1  # an int the C signature takes: trim only above ~2 GiB of free top-of-heap


def retain_freed_memory() -> bool:
    """Apply the settings above to the whole process (calling again changes nothing); True when they took effect
    (glibc on Linux, not opted out)."""
    if not sys.platform.startswith("linux") or os.environ.get("DFINE_MALLOC_DEFAULTS", "") not in ("", "0"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # absent from musl and other C libraries
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER) == 1
