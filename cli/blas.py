"""Fast float32 matmul on Linux without the user preloading anything.

MLX's CPU wheel bundles a generic BLAS (~6 GFLOP/s float32 GEMM on a 2-core x86 machine); Debian's
OpenBLAS (``libopenblas0-pthread``) is ~30x faster, but it must be in ``LD_PRELOAD`` when the
process starts, before ``mlx`` is loaded. So the command line re-executes itself once with it
preloaded when it is installed. Nothing happens on macOS (Accelerate / Metal), with MLX's CUDA
backend, when ``VARGPT_MLX_NO_OPENBLAS=1`` is set, or when a library is already preloaded. When
no OpenBLAS is installed it says once, in one line, how to get it.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

GUARD = "VARGPT_MLX_BLAS_CHECKED"


def _cuda_backend() -> bool:
    from importlib import metadata

    for name in ("mlx-cuda", "mlx_cuda"):
        try:
            metadata.version(name)
            return True
        except metadata.PackageNotFoundError:
            pass
    return False


def ensure_fast_blas() -> None:
    if sys.platform != "linux" or os.environ.get("VARGPT_MLX_NO_OPENBLAS") or os.environ.get(GUARD):
        return
    if "mlx.core" in sys.modules or os.environ.get("LD_PRELOAD") or _cuda_backend():
        return
    os.environ[GUARD] = "1"  # once per process tree, whatever happens next
    lib = ctypes.util.find_library("openblas")
    if lib is None:
        print("note: float32 matmul on this CPU is ~30x faster with OpenBLAS: apt-get install "
              "libopenblas0-pthread (VARGPT_MLX_NO_OPENBLAS=1 silences this)", file=sys.stderr)
        return
    env = dict(os.environ, LD_PRELOAD=lib)
    argv = [sys.executable] + list(getattr(sys, "orig_argv", sys.argv)[1:])
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # cannot re-execute: carry on with the bundled BLAS
        return
