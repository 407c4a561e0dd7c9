"""Quantized linear layers that stay fast on the CPU backend.

MLX's CPU ``quantized_matmul`` runs at ~3 GFLOP/s on this 2-core machine whatever the row count,
where a float32 BLAS matmul reaches ~170 (``benchmarks/bench_quantized.py``). From 8 rows up it is
faster to dequantize the weight and multiply with the BLAS (measured by that benchmark, q4 and q8,
group 32: 3.3-3.7x at 8 rows of a 3584x4096 weight, 22-25x at 64 rows, 69-70x at 1024), so prefill, every next-scale step and
every training batch of a quantized model take that path on the CPU; single-token decoding keeps
``quantized_matmul``, which reads 4-8x fewer bytes. Same function: ``dequantize`` gives exactly the
values ``quantized_matmul`` multiplies by, only the float summation order differs. The weight is
dequantized ``CHUNK`` values at a time, one piece after the other (measured peak over the weights:
68 MB for a chain of eight Qwen2-7B MLP matrices at 64 rows, 255 MB with 4x larger pieces, 1.2 GiB
with every piece free to run first), so the transient stays small even for a full-size lm_head
(545 M values), at the same speed.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

MIN_ROWS = 8  # below this quantized_matmul wins (measured: dequantizing every call cost 0.28x-0.6x at 2-4 rows of 3584x4096)
CHUNK = 1 << 22  # dequantized values per piece (16 MiB of float32)


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (same parameters and keys) with the CPU path above."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.ndim == 0 or x.size < MIN_ROWS * x.shape[-1] or mx.default_device() != mx.cpu:
            return super().__call__(x)
        w, s, b = self["weight"], self["scales"], self.get("biases")
        rows = max(1, CHUNK // (w.shape[-1] * 32 // self.bits))  # output features per piece
        # bfloat16 activations multiply in float32 (the CPU has no fast bf16 GEMM), rounded back after
        xf = x.astype(mx.float32)
        pieces, after = [], xf
        for i in range(0, w.shape[0], rows):
            # A dequantize depends on weights alone, so MLX would run every one of them first (measured:
            # 1.2 GiB in flight for 8 Qwen2-7B MLP matrices at 64 rows, 0.02 GiB with quantized_matmul):
            # each piece waits for the previous product (the first for x), so one is in flight at a time.
            wi = mx.depends(w[i:i + rows], after)
            # scales in float32 first: dequantize computes in its scales' dtype (bf16 ones: 0.016 off)
            si, bi = s[i:i + rows].astype(mx.float32), None if b is None else b[i:i + rows].astype(mx.float32)
            pieces.append(after := xf @ mx.dequantize(wi, si, bi, group_size=self.group_size, bits=self.bits,
                                                      mode=self.mode).T)
        y = (pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=-1)).astype(x.dtype)
        return y + self["bias"] if "bias" in self else y


def use_cpu_path(model: nn.Module) -> nn.Module:
    """Give every ``nn.QuantizedLinear`` of ``model`` the CPU path (in place; the parameters, their
    keys and ``isinstance(m, nn.QuantizedLinear)`` are unchanged)."""
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = QuantizedLinear
    return model

