"""The two projectors between the LLM and Infinity (upstream ``GenPatchMerger``).

* ``image_gen_projector``     Infinity width C -> LLM hidden H (next-scale inputs into the LLM)
* ``image_gen_projector_out`` LLM hidden H -> Infinity width C (LLM states into Infinity)

Each is ``Linear -> GELU (erf) -> Linear``. Upstream also stores an ``ln_q`` LayerNorm that its
forward never applies: it is dropped at load time (see ``DROPPED``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

DROPPED = ("ln_q.weight", "ln_q.bias")


class GenProjector(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        # Upstream is nn.Sequential(Linear, GELU, Linear): keys mlp.0 and mlp.2.
        self.mlp = [nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.mlp:
            x = layer(x)
        return x


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    return {k: v for k, v in weights.items() if k not in DROPPED}
