"""vargpt-mlx: VARGPT-v1.1 (understanding, generation, editing) on Apple Silicon with MLX.

    from vargpt_mlx import load, chat, generate_image, edit_image

(``vargpt_mlx.chat`` is the function; the module with ``ChatSession`` is imported as
``from vargpt_mlx.chat import ChatSession``.)

The four names are imported on first use, so that ``vargpt_mlx.cli`` (the command line, which
lives in this namespace) starts without loading MLX / mlx-lm for ``--help`` or a rejected option.
"""

import importlib
import os
import sys
import types

if sys.platform == "linux" and "numpy" not in sys.modules and "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
    # numpy's own OpenBLAS (the matrix-vector products of text decoding, models/linear.py) keeps its
    # threads spinning for about a second after each call, taking both cores from MLX's next matmuls
    # (measured: a 256-token prefill right after decoding 569-574 tokens/s instead of 701-709). Its
    # threads read this variable once, when numpy loads: set for that import only, so MLX's BLAS and
    # child processes keep their own settings.
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
    try:
        import numpy  # noqa: F401
    finally:
        del os.environ["OPENBLAS_THREAD_TIMEOUT"]

__version__ = "0.1.0"

_LAZY = {"load": "api", "generate_image": "api", "edit_image": "api", "chat": "chat"}
__all__ = ["load", "chat", "generate_image", "edit_image"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # importing the submodule ``vargpt_mlx.chat`` must not replace the function ``chat``
        if name == "chat" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
