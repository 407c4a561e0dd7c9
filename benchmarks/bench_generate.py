"""Image generation speed and memory: seconds per scale and per image, batched vs one at a time,
VAE decode, peak memory; optionally whether ``mx.compile`` helps.

    python benchmarks/bench_generate.py                               # tiny fixture model, n = 1 and 4
    python benchmarks/bench_generate.py --compile-check               # + compiled vs eager steps
    python benchmarks/bench_generate.py --model /tmp/vargpt_full_q4 --n 1 --max-scales 3 --decode-check

``--max-scales K`` stops after K scales (the full-size model on a CPU takes hours per image) and
fits ``seconds = a + b * tokens`` to the measured scales to EXTRAPOLATE the rest (printed as such).
The KV-cache memory of the whole schedule is computed from the model's sizes (exact byte counts of
the caches ``generate`` keeps: LLM cond branch + Infinity cond and uncond rows).
"""

from __future__ import annotations

import argparse
import time

from common import FIXTURE, fmt_mem, machine, memory, prompt_ids

import mlx.core as mx
import numpy as np


class Stop(Exception):
    pass


def cache_bytes(config, schedule, prompt_len: int, n: int, itemsize: int) -> dict[str, float]:
    """Bytes of the KV caches of one generation of ``n`` images (mlx-lm caches grow in 256 steps)."""
    def alloc(tokens):
        return -(-tokens // 256) * 256

    L = sum(h * w for h, w in schedule)
    llm = config.llm
    inf = config.infinity
    llm_b = llm.num_hidden_layers * 2 * llm.num_key_value_heads * llm.head_dim * alloc(prompt_len + 1 + L) * itemsize * n
    # Infinity: keys in float32 whatever the model dtype (its RoPE is float32, as upstream's k cache), values
    # in the model's dtype; cond and uncond rows
    inf_b = inf.depth * inf.embed_dim * alloc(L) * (4 + itemsize) * 2 * n
    return {"llm_cache": llm_b, "infinity_cache": inf_b}


def run_once(model, ids, settings, n: int, max_scales: int | None, decode: bool):
    from vargpt_mlx.pipelines import image_generation as ig

    mx.reset_peak_memory()
    stamps = []

    def on_scale(k, total):
        stamps.append(time.perf_counter())
        if max_scales is not None and k + 1 >= max_scales:
            raise Stop

    t0 = time.perf_counter()
    cache, hidden = ig.prefill_prompt(model, ids)
    mx.eval(hidden, [c.keys for c in cache])
    t_prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    done = True
    try:
        ig.draw_images(model, cache, hidden, settings, n=n, on_scale=on_scale, decode=decode)
    except Stop:
        done = False
    t_end = time.perf_counter()
    per_scale = np.diff([t1] + stamps).tolist()
    t_decode = t_end - stamps[-1] if done else None
    return t_prefill, per_scale, t_decode, t_end - t0, done, memory()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(FIXTURE))
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4], help="images per prompt (batched)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-scales", type=int, default=None, help="stop after this many scales")
    ap.add_argument("--pn", default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sequential", action="store_true", help="also time n single-image runs for each n > 1")
    ap.add_argument("--compile-check", action="store_true", help="time mx.compile'd vs eager steps")
    ap.add_argument("--decode-check", action="store_true", help="time the VAE decode on its own")
    args = ap.parse_args()

    from vargpt_mlx import schedules
    from vargpt_mlx.loading import load_model
    from vargpt_mlx.pipelines import image_generation as ig

    print(machine())
    t = time.perf_counter()
    model = load_model(args.model, dtype=getattr(mx, args.dtype) if args.dtype else None)
    cfg = model.config
    schedule = schedules.get_schedule(args.pn or cfg.pn)
    tokens = [h * w for h, w in schedule]
    H, W = schedules.image_size(schedule)
    print(f"model {args.model}: loaded lazily in {time.perf_counter() - t:.2f} s; pn {args.pn or cfg.pn}: "
          f"{W}x{H}, {len(schedule)} scales, {sum(tokens)} tokens; {fmt_mem(memory())}")
    ids = prompt_ids(cfg, args.prompt_tokens)
    itemsize = model.model.norm.weight.dtype.size
    for n in args.n:
        for r in range(args.repeat):
            s = ig.GenerationSettings(seed=r)
            pre, per, dec, total, done, mem = run_once(model, ids, s, n, args.max_scales, decode=True)
            scales = " ".join(f"{x:.3f}" for x in per)
            line = (f"n={n} run {r}: prefill {len(ids) + 1} tok {pre:.2f} s; scales [{scales}] s")
            if done:
                line += f"; VAE decode {dec:.2f} s; total {total:.2f} s = {total / n:.2f} s/image"
            print(line + f"; {fmt_mem(mem)}")
        cb = cache_bytes(cfg, schedule, len(ids), n, itemsize)
        print(f"n={n}: KV caches of the whole schedule: LLM {cb['llm_cache'] / 2**30:.2f} GiB + Infinity "
              f"{cb['infinity_cache'] / 2**30:.2f} GiB ({model.model.norm.weight.dtype})")
        if not done and len(per) >= 2:
            k = len(per)
            b, a = np.polyfit(tokens[1:k], per[1:k], 1) if k >= 3 else (per[-1] / tokens[k - 1], 0.0)
            rest = [a + b * t for t in tokens[k:]]
            print(f"n={n}: EXTRAPOLATED from scales 1..{k - 1} (seconds = {a:.2f} + {b:.3f} * tokens): "
                  f"remaining scales [{' '.join(f'{x:.0f}' for x in rest)}] s, image without VAE "
                  f"~{sum(per) + sum(rest) + pre:.0f} s")
        if args.sequential and n > 1:
            t0 = time.perf_counter()
            for i in range(n):
                ig.draw_images(model, *ig.prefill_prompt(model, ids), ig.GenerationSettings(seed=i))
            dt = time.perf_counter() - t0
            print(f"n={n} one at a time (prefill each): {dt:.2f} s = {dt / n:.2f} s/image")

    if args.decode_check:
        z = mx.zeros((1, *schedule[-1], cfg.infinity.codebook_dim))
        mx.reset_peak_memory()
        t = time.perf_counter()
        mx.eval(model.vae_local.decode(z))
        print(f"VAE decode {W}x{H}: {time.perf_counter() - t:.2f} s; {fmt_mem(memory())}")

    if args.compile_check:
        compile_check(model, schedule, cfg)


def _time(fn, reps=3):
    mx.eval(fn())
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return (time.perf_counter() - t) / reps


def compile_check(model, schedule, cfg):
    """Eager vs ``mx.compile`` for the stateless pieces of the per-scale step (the uncond LLM pass,
    the projectors) and for the VAE decode. The cond LLM pass and Infinity carry KV caches whose
    shapes change every scale, which compile cannot take as state without retracing."""
    from vargpt_mlx.models.rope_index import plain_position_ids

    H = cfg.llm.hidden_size

    def llm(x, pos):
        return model.image_gen_projector_out(model.model(x, pos))

    cllm = mx.compile(llm)
    for h, w in schedule[-3:]:
        x = mx.random.normal((1, h * w, H)).astype(model.model.norm.weight.dtype)
        pos = mx.array(plain_position_ids(1, h * w))
        e, c = _time(lambda: llm(x, pos)), _time(lambda: cllm(x, pos))
        print(f"uncond LLM pass + projector, {h * w} tokens: eager {e * 1e3:.1f} ms, compiled {c * 1e3:.1f} ms")
    z = mx.zeros((1, *schedule[-1], cfg.infinity.codebook_dim))
    dec = model.vae_local.decode
    cdec = mx.compile(dec)
    e, c = _time(lambda: dec(z), 2), _time(lambda: cdec(z), 2)
    print(f"VAE decode: eager {e:.3f} s, compiled {c:.3f} s")


if __name__ == "__main__":
    main()
