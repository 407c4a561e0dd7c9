"""Chat speed and memory: prefill tokens/s, decode tokens/s and peak memory of the LLM text loop.

    python benchmarks/bench_chat.py                                  # the tiny fixture model
    python benchmarks/bench_chat.py --model /tmp/vargpt_full_q4 --prompt-tokens 16 --decode-tokens 4

Runs ``vargpt_mlx.text_generation.stream_generate`` (greedy) on a text prompt of
``--prompt-tokens`` random ordinary tokens laid out like the chat template; no tokenizer needed.
``--model`` takes any checkpoint directory, e.g. one written by ``benchmarks/full_size.py``.
"""

from __future__ import annotations

import argparse
import time

from common import FIXTURE, fmt_mem, machine, memory, prompt_ids

import mlx.core as mx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(FIXTURE))
    ap.add_argument("--prompt-tokens", type=int, default=128, help="random text tokens in the prompt")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="compute dtype (default: float32 on CPU, bfloat16 on Metal)")
    ap.add_argument("--repeat", type=int, default=2, help="runs (the first one warms up on small models)")
    args = ap.parse_args()

    from vargpt_mlx.loading import load_model
    from vargpt_mlx.models.rope_index import plain_position_ids
    from vargpt_mlx.text_generation import stream_generate

    print(machine())
    t = time.perf_counter()
    model = load_model(args.model, dtype=getattr(mx, args.dtype) if args.dtype else None)
    print(f"model {args.model}: loaded lazily in {time.perf_counter() - t:.2f} s; {fmt_mem(memory())}")
    ids = prompt_ids(model.config, args.prompt_tokens)
    L = len(ids)
    for run in range(args.repeat):
        mx.reset_peak_memory()
        embeds = model.model.embed(mx.array(ids[None]))
        pos = mx.array(plain_position_ids(1, L))
        t0 = time.perf_counter()
        times = []
        for _tok, logits in stream_generate(model.model, model.lm_head, embeds, pos, 0,
                                            max_tokens=args.decode_tokens, prompt_ids=ids.tolist()):
            mx.eval(logits)
            times.append(time.perf_counter())
        prefill = times[0] - t0
        decode = (times[-1] - times[0]) / max(len(times) - 1, 1)
        print(f"run {run}: prompt {L} tokens: prefill {prefill:.2f} s = {L / prefill:.1f} tok/s (incl. first token); "
              f"decode {len(times) - 1} tokens: {decode * 1e3:.0f} ms/token = {1 / decode:.2f} tok/s; "
              f"{fmt_mem(memory())}")


if __name__ == "__main__":
    main()
