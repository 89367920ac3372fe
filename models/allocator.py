"""glibc malloc settings for CPU inference: keep freed memory for the next forward pass.

A GN+WS R-50 forward pass at 1333x800 allocates and frees several GB of activations, many of them
larger than glibc's mmap threshold (32 MB at most), so each is a fresh ``mmap`` whose pages fault
in again on every pass, and in threads other than the main one (the service's inference thread)
even smaller blocks come from per-thread arenas that are trimmed back to the kernel. Measured on
the development machine (2 cores, full scale): about 650k-740k minor page faults and 1.2-1.5 s of
kernel time per 3 s forward pass; with the settings below, none, and the pass takes about 2.1 s.

This is the same remedy as the jemalloc/tcmalloc ``LD_PRELOAD`` that PyTorch and TorchServe CPU
tuning guides recommend, done with glibc's own ``mallopt`` so that it needs no extra library:

- ``M_MMAP_MAX = 0``: large blocks come from the heap, where freed memory is reused;
- ``M_TRIM_THRESHOLD`` 2 GiB: freed heap memory is kept rather than returned to the kernel;
- ``M_ARENA_MAX = 1``: every thread allocates from the main heap (per-thread arenas are
  ``mmap``-ed heaps of at most 64 MB that cannot hold these blocks).

The price is memory: the process keeps its peak heap (about +10% RSS measured: 1.62 GB vs 1.49 GB
for one R-50 model at full scale) instead of returning it between requests. ``GNWS_MALLOC_TUNING=0``
turns this off. Call :func:`tune_malloc` once, early in an entry point, before threads start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest value mallopt takes (an int)

_SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES), (M_ARENA_MAX, 1))
_applied: bool | None = None


def tune_malloc() -> bool:
    """Apply the settings above once per process; ``True`` if they are in effect.

    Does nothing (``False``) off Linux/glibc (musl, macOS, Windows) or with ``GNWS_MALLOC_TUNING=0``.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("GNWS_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        logger.debug("malloc tuning off (GNWS_MALLOC_TUNING)")
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
    logger.debug("glibc %s malloc tuned for inference: %s", version, _applied)
    return _applied
