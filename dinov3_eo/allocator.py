"""Process-wide CPU allocator setting: freed memory stays mapped for the next training step or model call.

glibc's malloc gives every block above its mmap threshold (128 KiB, rising to at most 32 MiB) a mapping of its own
and unmaps it on free, and returns the free top of its heap to the kernel above its trim threshold. A training step
frees and re-allocates the same large tensors every step (a [tokens, 65,536] float32 head tensor is 70-260 MB, the
backbone's activations tens of MB), so each one is page-faulted in again, 4 KiB at a time, every step. Keeping freed
memory in the heap turns those page faults into reuse: after the first two steps a ViT-S SSL step faults no page at
all. The price is that the process keeps its peak memory mapped instead of returning it between steps.

Measured on the 2-core CPU machine (ViT-S/16, 2x224 + 8x96 crops, 65,536 prototypes; ``README``, "Measured"),
against PyTorch's transparent huge pages (the previous setting): one SSL step at batch 16 14.26 -> 12.10 s and its
backbone-only work 11.33 -> 10.45 s, at batch 4 3.57 -> 3.16 s; peak RSS 7,776 -> 7,658 MiB. Both together were
slower than this alone, and used more memory. Inference too (``scripts/bench_inference.py``): a small convolutional
model over 10k x 10k px in 512-px windows 41.5 -> 10.3 s, ``predict_raster`` over the same raster 42.3 -> 14.3 s,
with peak RSS 1,058 -> 1,143 MB.

A process-level decision, so nothing in the package makes it on import: the ``dinov3-eo`` command does (unless
``DINOV3_EO_RETAIN_FREED_MEMORY=0``), and Python users call :func:`retain_freed_memory` once, early.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

__all__ = ["retain_freed_memory", "trim_heap"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_MAX_INT = 2**31 - 1  # mallopt takes a C int
DEFAULT_MMAP_THRESHOLD = 1 << 30  # blocks from 1 GiB up still get their own mapping
DEFAULT_TRIM_THRESHOLD = _MAX_INT  # keep up to 2 GiB of free heap top mapped
ENV_SWITCH = "DINOV3_EO_RETAIN_FREED_MEMORY"  # "0" turns the setting off for the dinov3-eo command


def retain_freed_memory(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
                        trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> bool:
    """Make glibc's malloc keep freed memory mapped for reuse (process-wide; call once, early).

    Args:
        mmap_threshold: bytes from which a block gets its own mapping (returned to the kernel on free).
        trim_threshold: bytes of free memory at a heap's top kept mapped instead of returned.

    Returns:
        True if set; False where the C library is not glibc (macOS, musl, Windows): nothing changes there.

    Raises:
        ValueError: if a threshold is not in [0, 2**31 - 1] (``mallopt`` takes a C ``int``).
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not 0 <= value <= _MAX_INT:
            raise ValueError(f"retain_freed_memory: {name} must be in [0, 2**31 - 1] bytes, got {value}.")
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    ok = ok and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not ok:
        log.warning("retain_freed_memory: glibc refused the malloc thresholds; the allocator is unchanged.")
    return ok


def retain_freed_memory_unless_disabled() -> bool:
    """:func:`retain_freed_memory` unless the environment sets ``DINOV3_EO_RETAIN_FREED_MEMORY=0`` (the CLI's switch)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    return retain_freed_memory()


def trim_heap() -> bool:
    """Return the freed pages of every malloc arena to the kernel now (glibc ``malloc_trim``).

    For long streaming loops whose threads allocate and free buffers in different arenas: RSS then stays near the
    live data. Every page handed back is faulted in again by the next buffer that needs it, so call it rarely
    (``predict_raster``: once per row of windows).

    Returns:
        True if memory was returned; False if there was none to return or the C library is not glibc.
    """
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


@functools.cache  # find_library runs ldconfig: once per process
def _glibc():  # noqa: ANN202 - a ctypes library or None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # mallopt's option numbers and malloc_trim are glibc's
    if not all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc
