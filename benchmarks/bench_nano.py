"""Seconds per 128x128 image with the shipped nano model (``--model nano``), split into the LLM
prefill, the next-scale loop and the VAE decode, plus chat decode speed.

    python benchmarks/bench_nano.py [--n 10]
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (puts the repo on sys.path)

from vargpt_mlx import api
from vargpt_mlx.chat import ChatSession


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    a = ap.parse_args()
    print(common.machine())
    t0 = time.perf_counter()
    pipe = api.load("nano")
    print(f"load: {time.perf_counter() - t0:.2f} s")
    api.generate_image(pipe, "a red star on a blue background", seed=0)  # warm-up
    ts = []
    for i in range(a.n):
        t0 = time.perf_counter()
        api.generate_image(pipe, "a red star on a blue background", seed=i)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    print(f"generate 128x128 (upstream sampling): median {ts[len(ts) // 2]:.3f} s, min {ts[0]:.3f} s over {a.n}")
    t0 = time.perf_counter()
    imgs = api.generate_image(pipe, "a red star on a blue background", seed=0, n=a.n)
    print(f"generate --n {a.n} (one batch): {(time.perf_counter() - t0) / a.n:.3f} s per image")
    src = imgs[0]
    t0 = time.perf_counter()
    for i in range(a.n):
        api.edit_image(pipe, src, "Make the star green.", seed=i)
    print(f"edit 128x128: {(time.perf_counter() - t0) / a.n:.3f} s per image")
    s = ChatSession(pipe, max_tokens=24)
    t0 = time.perf_counter()
    reply = "".join(t for t in s.send("What shape is in the image?", images=[src]) if isinstance(t, str))
    print(f"chat answer {reply.strip()!r}: {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
