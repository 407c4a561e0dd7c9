"""Resident memory per task of a (quantized) checkpoint: weights a task reads + its KV caches.

    python benchmarks/bench_memory.py --model /tmp/vargpt_full_q4all             # bf16, as on Metal
    python benchmarks/bench_memory.py --model /tmp/vargpt_full_q4 --dtype float32  # as on the CPU
    python benchmarks/bench_memory.py --model /tmp/vargpt_full_q4all --dtype float32 --vae-decode

Weights are memory-mapped and read lazily, so a task only ever holds the parts it uses. For each
task this loads the model afresh, evaluates exactly those parameters (no compute) and reports MLX's
active memory; then it adds the KV caches of a 512x512 generation (exact byte counts: LLM cond
branch over prompt + 2521 scale tokens, Infinity cond + uncond rows over 2521 tokens).
"""

from __future__ import annotations

import argparse
import gc

from common import GiB, machine

import mlx.core as mx

TASKS = {
    "chat, text only": ("model", "lm_head"),
    "chat with images": ("model", "lm_head", "visual"),
    "generate (text-to-image)": ("model", "vargpt_gen", "image_gen_projector", "image_gen_projector_out",
                                 "vae_local.decoder", "sos_embedding"),
    "edit": ("model", "visual", "vargpt_gen", "image_gen_projector", "image_gen_projector_out",
             "vae_local.decoder", "sos_embedding"),
    "everything": ("",),
}


def subtree(model, path: str):
    m = model
    for part in filter(None, path.split(".")):
        m = m[part] if isinstance(m, dict) else getattr(m, part)
    return m.parameters() if hasattr(m, "parameters") else m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="dtype of the float weights and activations (bfloat16: Metal's default)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="context length for the cache figures")
    ap.add_argument("--vae-decode", action="store_true",
                    help="also decode one 512x512 image (random codes) and report the decoder's transient memory")
    args = ap.parse_args()

    from vargpt_mlx import schedules
    from vargpt_mlx.loading import load_model

    print(machine())
    dtype = getattr(mx, args.dtype)
    itemsize = dtype.size
    for task, parts in TASKS.items():
        model = load_model(args.model, dtype=dtype)
        mx.reset_peak_memory()
        mx.eval([subtree(model, p) for p in parts])
        weights = mx.get_active_memory()
        line = f"{task:26s} weights {weights / GiB:5.2f} GiB"
        if "generate" in task or "edit" in task:
            cfg = model.config
            sched = schedules.get_schedule("0.25M")
            L = schedules.total_tokens(sched)
            llm, inf = cfg.llm, cfg.infinity

            def alloc(t):
                return -(-t // 256) * 256

            llm_c = llm.num_hidden_layers * 2 * llm.num_key_value_heads * llm.head_dim * alloc(args.prompt_tokens + 1 + L) * itemsize
            # Infinity: float32 keys (after its float32 RoPE, as upstream caches them) + values in the dtype
            inf_c = inf.depth * inf.embed_dim * alloc(L) * (4 + itemsize) * 2
            line += (f" + KV caches of one 512x512 image {(llm_c + inf_c) / GiB:.2f} GiB "
                     f"(LLM {llm_c / GiB:.2f}, Infinity {inf_c / GiB:.2f}) = {(weights + llm_c + inf_c) / GiB:.2f} GiB")
        print(line)
        del model
        gc.collect()
        mx.clear_cache()
    if args.vae_decode:
        vae_decode(args.model, dtype)


def vae_decode(path: str, dtype) -> None:
    """Time and memory of ``vae_local.decode`` on one 512x512 image's codes (the last 0.25M scale,
    32x32): MLX peak memory above the decoder's own weights, in one evaluation."""
    import time

    from vargpt_mlx.loading import load_model

    model = load_model(path, dtype=dtype)
    vae, d = model.vae_local, model.config.vae.codebook_dim
    mx.eval(vae.decoder.parameters())
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    z = 0.2 * mx.random.normal((1, 32, 32, d), key=mx.random.key(0))
    t0 = time.perf_counter()
    mx.eval(vae.decode(z.astype(dtype)))
    print(f"VAE decode 512x512: {time.perf_counter() - t0:.1f} s, decoder weights {base / GiB:.2f} GiB, "
          f"transient {(mx.get_peak_memory() - base) / GiB:.2f} GiB above them")


if __name__ == "__main__":
    main()
