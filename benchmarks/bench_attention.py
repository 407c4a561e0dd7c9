"""Causal attention on the CPU backend at the medium comparison's LLM shapes (14 query heads on 2
key heads of 64): the port's ``activations.sdpa`` with ``mask="causal"`` (each query chunk stops at
its last visible key), the same with the equivalent boolean mask (every key scored, then masked: the
port's causal path before), and MLX's fused kernel, side by side.

    python benchmarks/bench_attention.py
"""

from __future__ import annotations


import common  # puts the repo on sys.path; the timing helper
import mlx.core as mx

from vargpt_mlx.models import activations

# (queries, keys): an image pass without a cache (the unconditional branch, or a prefill), and the
# last scales of the conditional branch after the prompt and the earlier scales
SHAPES = [(256, 256), (1024, 1024), (576, 1560), (1024, 2560)]


def ms(f, n: int = 9, warm: int = 2) -> float:
    return common.median_ms(f, n, warm)


def main():
    print(common.machine())
    print("| queries x keys | causal, chunks stop at the last visible key | every key scored, then masked | MLX fused |")
    print("|---|---|---|---|")
    for L, S in SHAPES:
        q = mx.random.normal((1, 14, L, 64))
        k, v = mx.random.normal((1, 2, S, 64)), mx.random.normal((1, 2, S, 64))
        full = mx.arange(S)[None] <= mx.arange(S - L, S)[:, None]  # the same mask as an array
        mx.eval(q, k, v, full)
        a = ms(lambda: activations.sdpa(q, k, v, scale=0.125, mask="causal"))
        b = ms(lambda: activations.sdpa(q, k, v, scale=0.125, mask=full))
        c = ms(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal"))
        print(f"| {L} x {S} | {a:.1f} ms | {b:.1f} ms ({b / a:.2f}x) | {c:.1f} ms ({c / a:.2f}x) |")


if __name__ == "__main__":
    main()
