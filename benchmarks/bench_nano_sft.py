"""Where the nano SFT stage spends its time: a drawing sample's loss (forward, forward + backward)
with the shipped nano model, the LLM's layers one sample at a time against a batch of 8, and one
LLM layer split into attention, MLP and the softmax's ``exp``.

    python benchmarks/bench_nano_sft.py
"""

from __future__ import annotations

import tempfile

import common  # puts the repo on sys.path; the timing helper
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vargpt_mlx import api
from vargpt_mlx.models import activations
from vargpt_mlx.nano import recipe, world
from vargpt_mlx.training import run
from vargpt_mlx.training.data import TargetCache, load_sft_records

T = 190  # tokens of a drawing sample: prompt + 121 image slots + the chat template around them


def ms(f, n: int = 20, warm: int = 4) -> float:
    return common.median_ms(f, n, warm)


def main():
    print(common.machine())
    pipe = api.load("nano")
    model = pipe.model
    llm = model.model
    H = llm.norm.weight.shape[0]

    # a drawing sample of the world, through the trainer's encoder and the recipe's SFT loss
    with tempfile.TemporaryDirectory() as tmp:
        paths = world.write_dataset(tmp, seed=0, split="train", n_und=0, n_t2i=1, n_edit=0, n_dpo_img=0, n_dpo_txt=0)
        item = run.sft_items(pipe, load_sft_records(paths["t2i"], pipe.processor), TargetCache())[0]
    task = recipe.NanoTask(pipe.processor, [item], None, p_uncond=0.0, seed=0, reweight=recipe.SFTArgs.reweight)
    g = nn.value_and_grad(model, lambda m: task.item_loss(m, item)[0])
    print(f"drawing sample ({item.sample.num_tokens} tokens): forward {ms(lambda: task.item_loss(model, item)[0]):.1f} ms, "
          f"forward + backward {ms(lambda: g(model)):.1f} ms")

    # the LLM alone: one sample against a batch of 8 (per sample)
    for B in (1, 8):
        x = mx.random.normal((B, T, H))
        pos = mx.array(np.tile(np.arange(T)[None, None], (3, B, 1)))
        gl = nn.value_and_grad(llm, lambda m, x: m(x, pos).sum())
        f, fb = ms(lambda: llm(x, pos)) / B, ms(lambda: gl(llm, x)) / B
        print(f"LLM {len(llm.layers)} layers, batch {B}: forward {f:.2f} ms, forward + backward {fb:.2f} ms per sample")

    # one layer's parts
    x = mx.random.normal((1, T, H))
    pos = mx.array(np.tile(np.arange(T)[None, None], (3, 1, 1)))
    cos, sin = llm.rotary_emb(pos, mx.float32)
    layer = llm.layers[0]
    att = layer.self_attn
    hd = H // att.n_heads
    q = mx.random.normal((1, att.n_heads, T, hd))
    k = mx.random.normal((1, att.n_heads, T, hd))
    print(f"one layer {ms(lambda: layer(x, cos, sin, 'causal')):.2f} ms: attention "
          f"{ms(lambda: att(x, cos, sin, 'causal')):.2f} (its sdpa "
          f"{ms(lambda: activations.sdpa(q, k, k, scale=hd**-0.5, mask='causal')):.2f}, MLX's fused sdpa "
          f"{ms(lambda: mx.fast.scaled_dot_product_attention(q, k, k, scale=hd**-0.5, mask='causal')):.2f}), "
          f"MLP {ms(lambda: layer.mlp(x)):.2f}")
    s = q @ k.transpose(0, 1, 3, 2)
    print(f"scores {tuple(s.shape)}: matmul {ms(lambda: q @ k.transpose(0, 1, 3, 2)):.2f} ms, MLX exp "
          f"{ms(lambda: mx.exp(s)):.2f} ms, MLX softmax {ms(lambda: mx.softmax(s, axis=-1)):.2f} ms")


if __name__ == "__main__":
    main()
