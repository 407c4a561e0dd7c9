"""One row times a weight on the CPU backend, the product of every text-decoding step: MLX's matmul
(the BLAS ``sgemm``) against the port's ``models.linear.Linear`` inside ``decoding()`` (numpy's
``sgemv`` on the same buffer), as read bandwidth of the weight, side by side.

    python benchmarks/bench_decode.py
"""

from __future__ import annotations


import common  # puts the repo on sys.path; the timing helper
import mlx.core as mx
import mlx.nn as nn

from vargpt_mlx.models import linear

SHAPES = [  # (in, out): the medium comparison's LLM (896 wide), Qwen2-7B's attention and MLP
    (896, 896), (896, 4864), (4864, 896), (3584, 3584), (3584, 18944), (18944, 3584)]


def ms(f, n: int = 30, warm: int = 5) -> float:
    return common.median_ms(f, n, warm)


def main():
    print(common.machine())
    print("| weight (in x out) | MB | MLX matmul | port, decoding() | speed-up |")
    print("|---|---|---|---|---|")
    for k, n in SHAPES:
        lin = linear.Linear(k, n, bias=False)
        ref = nn.Linear(k, n, bias=False)
        ref.update(lin.parameters())
        x = mx.random.normal((1, 1, k))
        mx.eval(lin.parameters(), ref.parameters(), x)
        mb = lin.weight.nbytes / 1e6
        a = ms(lambda: ref(x))

        def port():
            with linear.decoding():
                return lin(x)

        b = ms(port)
        print(f"| {k} x {n} | {mb:.0f} | {a:.3f} ms ({mb / a:.1f} GB/s) | {b:.3f} ms ({mb / b:.1f} GB/s) | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
