"""Keep freed buffers in the process on Linux, so that MLX's CPU backend does not page-fault them
back in on every operation.

MLX's CPU allocator caches at most 32 MiB of freed buffers (``mx.set_cache_limit``'s default
there) and hands the rest to glibc ``malloc``, which serves every block above its mmap threshold
(128 KiB to 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``. Each activation of a few MB
or more then costs a page fault per 4 KiB page on first touch: measured on the 2-core test
machine, the float32 ``exp`` of 4 M values 37-50 ms, 10-13 ms once buffers are reused; a 512x512
GroupNorm + SiLU 245 -> 77 ms. Raising MLX's own cache limit gives back part of that (its cache
matches buffers by size, so it holds more: 2.7 GiB RSS against 1.7 for the same VAE decode).
Telling glibc never to ``mmap`` (``M_MMAP_MAX`` 0) and never to trim (``M_TRIM_THRESHOLD``)
lets it reuse freed memory for any later size. The cost: the process keeps its peak RSS after a
job instead of returning it to the system.

Applied once, when ``vargpt_mlx.models`` is first imported, only on Linux with glibc and MLX's CPU
backend as the default device; ``VARGPT_MLX_NO_MALLOC_TUNING=1`` turns it off. macOS (its own
allocator; Metal buffers are not ``malloc``'d) and GPU backends are untouched.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT = "VARGPT_MLX_NO_MALLOC_TUNING"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>
_done = False


def tune() -> bool:
    """Apply the settings above once per process; returns whether they are in effect."""
    global _done
    if _done:
        return True
    if sys.platform != "linux" or os.environ.get(OPT_OUT):
        return False
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl's mallopt ignores these)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
