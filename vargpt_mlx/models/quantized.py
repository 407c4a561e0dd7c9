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

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

MIN_ROWS = 8  # below this quantized_matmul wins (measured: dequantizing every call cost 0.28x-0.6x at 2-4 rows of 3584x4096)
CHUNK = 1 << 22  # dequantized values per piece (16 MiB of float32)


def _cpu_path(x: mx.array) -> bool:
    return x.ndim > 0 and x.size >= MIN_ROWS * x.shape[-1] and mx.default_device() == mx.cpu


def _dequantize(q: nn.QuantizedLinear, after: mx.array, rows: slice = slice(None),
                cols: slice = slice(None)) -> mx.array:
    """float32 ``q.weight[rows, cols]`` (``cols`` in whole groups), computed after ``after``.

    A dequantize depends on weights alone, so MLX would run every one of them first (measured:
    1.2 GiB in flight for 8 Qwen2-7B MLP matrices at 64 rows, 0.02 GiB with quantized_matmul):
    each piece waits for the previous product, so one is in flight at a time. Scales go to float32
    first: dequantize computes in its scales' dtype (bf16 ones: 0.016 off)."""
    w, s, b = q["weight"], q["scales"], q.get("biases")
    k = w.shape[-1] * 32 // q.bits  # input features
    pack, group = k // w.shape[-1], q.group_size
    c0, c1, _ = cols.indices(k)
    wc = slice(c0 // pack, c1 // pack)
    sc = slice(c0 // group, c1 // group)
    return mx.dequantize(mx.depends(w[rows, wc], after), s[rows, sc].astype(mx.float32),
                         None if b is None else b[rows, sc].astype(mx.float32),
                         group_size=group, bits=q.bits, mode=q.mode)


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (same parameters and keys) with the CPU path above."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _cpu_path(x):
            on_cpu_low_precision = mx.default_device() == mx.cpu and x.dtype != mx.float32
            return self._few_rows_float32(x) if on_cpu_low_precision else super().__call__(x)
        w = self["weight"]
        rows = max(1, CHUNK // (w.shape[-1] * 32 // self.bits))  # output features per piece
        # bfloat16 activations multiply in float32 (the CPU has no fast bf16 GEMM), rounded back after
        xf = x.astype(mx.float32)
        pieces, after = [], xf
        for i in range(0, w.shape[0], rows):
            pieces.append(after := xf @ _dequantize(self, after, rows=slice(i, i + rows)).T)
        y = (pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=-1)).astype(x.dtype)
        return y + self["bias"] if "bias" in self else y

    def _few_rows_float32(self, x: mx.array) -> mx.array:
        """``quantized_matmul`` in float32 for bfloat16 / float16 activations: MLX's CPU kernel is ~9x
        slower in bf16 (measured, 3584x4096 q4: 86 vs 10 ms for 1 row, 344 vs 39 ms for 4, scales cast
        per call included) and accumulates with less precision; rounded back once."""
        s, b = self["scales"].astype(mx.float32), self.get("biases")
        y = mx.quantized_matmul(x.astype(mx.float32), self["weight"], s, None if b is None else b.astype(mx.float32),
                                transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode)
        y = y.astype(x.dtype)
        return y + self["bias"] if "bias" in self else y


def mlp(x: mx.array, firsts: list[nn.Module], act: Callable[..., mx.array], down: nn.Module) -> mx.array | None:
    """``down(act(*(f(x) for f in firsts)))`` (a Qwen2 MLP, an Infinity FFN) for quantized layers on
    the CPU, one piece of the hidden features at a time; ``None`` where the plain path applies.

    The hidden features are independent until ``down`` sums them, so each piece's first-layer outputs
    and activation are computed exactly as the plain path computes those features (the same float32
    dot products, rounded to ``x``'s dtype, the bias added, ``act`` in that dtype) and ``down``
    accumulates its partial products in float32, rounded once at the end: the same function, only the
    float32 summation order of ``down`` differs. What it saves: the plain path holds the whole hidden
    activation several times over (float32 pieces, their concatenation, its rounding, the activation's
    temporaries: measured 0.75 GiB for one Qwen2-7B MLP at 1024 bf16 rows, 0.55 GiB for an Infinity-2B
    FFN at 2048), here one piece of it."""
    layers = [*firsts, down]
    if not (_cpu_path(x) and all(isinstance(m, QuantizedLinear) for m in layers)):
        return None
    hidden, dim = down.weight.shape[-1] * 32 // down.bits, x.shape[-1]
    step = max(down.group_size, (CHUNK // max(dim, down.weight.shape[0])) // down.group_size * down.group_size)
    if x.size // dim * hidden <= CHUNK or hidden % down.group_size:
        return None  # small enough as it is
    xf = x.astype(mx.float32)
    acc, after = None, xf
    for i in range(0, hidden, step):
        part = slice(i, i + step)
        hs = []
        for f in firsts:
            h = (xf @ _dequantize(f, after, rows=part).T).astype(x.dtype)
            hs.append(h + f["bias"][part] if "bias" in f else h)
        a = act(*hs).astype(mx.float32)
        wd = _dequantize(down, a, cols=part).T
        acc = a @ wd if acc is None else mx.addmm(acc, a, wd)
        after = acc
    y = acc.astype(x.dtype)
    return y + down["bias"] if "bias" in down else y


def use_cpu_path(model: nn.Module) -> nn.Module:
    """Give every ``nn.QuantizedLinear`` of ``model`` the CPU path (in place; the parameters, their
    keys and ``isinstance(m, nn.QuantizedLinear)`` are unchanged)."""
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = QuantizedLinear
    return model

