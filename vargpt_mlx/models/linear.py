"""Linear layers whose one-row products in text decoding run as a BLAS matrix-vector product on the CPU.

MLX's CPU backend sends every matmul to the BLAS ``sgemm``, which packs its operands into panels
first: with one row of input (a decoding step) that is an extra copy of the whole weight per product.
Measured with OpenBLAS on the 2-core Linux machine (``benchmarks/bench_decode.py``): one row times
Qwen2-7B's 272 MB MLP weight 11.0 ms (24.6 GB/s), 5.4 ms with numpy's ``sgemv`` on the same buffer;
the medium comparison's decoding 37 -> 56 tokens/s (``benchmarks/compare_upstream.py``).

Text decoding (``text_generation.generate_step``) runs each step inside :func:`decoding`; there a
float32 :class:`Linear` with one row of input and a weight of at least ``MIN_BYTES`` evaluates its
input and multiplies with numpy on zero-copy views of the MLX buffers: the same products in another
float summation order. Nowhere else: numpy is invisible to autodiff, ``mx.compile`` and ``mx.vmap``,
and no function transformation runs inside a decoding step.
"""

from __future__ import annotations

import contextlib
import contextvars

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# below this the evaluation the numpy call forces costs more than the packing it saves: the medium
# comparison's 896 x 896 weights (3.2 MB) gain 2.5x (bench_decode.py); the small one's 128-wide layers
# (64-128 kB) with the path forced on decode at 735-777 tokens/s instead of 997-1022
MIN_BYTES = 1 << 20

_decoding = contextvars.ContextVar("vargpt_mlx_decoding", default=False)


@contextlib.contextmanager
def decoding():
    """One-row products of :class:`Linear` layers inside this block take the matrix-vector path."""
    token = _decoding.set(True)
    try:
        yield
    finally:
        _decoding.reset(token)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, keys, quantization and LoRA wrapping) with the path above."""

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight
        if (_decoding.get() and x.ndim > 0 and x.size == x.shape[-1] and x.dtype == mx.float32
                and w.dtype == mx.float32 and w.nbytes >= MIN_BYTES and mx.default_device() == mx.cpu):
            y = mx.array(np.asarray(x).reshape(1, -1) @ np.asarray(w).T).reshape(*x.shape[:-1], w.shape[0])
            return y + self.bias if "bias" in self else y
        return super().__call__(x)
