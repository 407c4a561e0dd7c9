"""Quantized linears on the CPU: MLX's ``quantized_matmul`` against the port's dequantize + BLAS path
(``vargpt_mlx/models/quantized.py``; below its ``MIN_ROWS`` it calls ``quantized_matmul`` too), side
by side on the same weights, per row count.

    python benchmarks/bench_quantized.py

Shapes: a nano MLP (128 -> 384), the medium configuration's attention (896 -> 896) and a
Qwen2-7B-sized projection (3584 -> 4096); q4 and q8, group 32.
"""

from __future__ import annotations

import time

from common import machine

import mlx.core as mx
import mlx.nn as nn

from vargpt_mlx.models import quantized


def _time(fn, reps: int = 5) -> float:
    mx.eval(fn())
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return (time.perf_counter() - t) / reps


def main() -> None:
    print(machine())
    print(f"the port takes the BLAS path from {quantized.MIN_ROWS} rows up")
    print(f"{'in x out':>12} {'bits':>4} {'rows':>5} {'quantized_matmul':>17} {'port':>16} {'speed-up':>8}")
    for k, n in ((128, 384), (896, 896), (3584, 4096)):
        for bits in (4, 8):
            q = nn.QuantizedLinear.from_linear(nn.Linear(k, n, bias=False), group_size=32, bits=bits)
            fast = quantized.use_cpu_path(nn.QuantizedLinear.from_linear(nn.Linear(k, n, bias=False), 32, bits))
            fast.update(q.parameters())
            for rows in (1, 4, 8, 64, 1024):
                if rows == 1024 and k < 3584:
                    continue
                x = mx.random.normal((rows, k))
                mx.eval(x, q.parameters())
                t_q = _time(lambda: nn.QuantizedLinear.__call__(q, x))
                t_d = _time(lambda: fast(x))
                gf = 2 * rows * k * n / 1e9
                print(f"{k:>5}x{n:<6} {bits:>4} {rows:>5} {t_q * 1e3:>9.2f} ms {gf / t_q:>4.0f}GF "
                      f"{t_d * 1e3:>8.2f} ms {gf / t_d:>4.0f}GF {t_q / t_d:>7.2f}x")


if __name__ == "__main__":
    main()
