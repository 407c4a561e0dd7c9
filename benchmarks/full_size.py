"""Write the full-size VARGPT-v1.1 architecture with random weights as a quantized converted checkpoint.

    python benchmarks/full_size.py /tmp/vargpt_full_q4                 # q4, convert's default layers
    python benchmarks/full_size.py /tmp/vargpt_full_q4all --scope all  # q4, every eligible layer

Never holds the float model (see ``common.build_random_checkpoint``); peak ~4 GiB, ~3-4 minutes
and 6-8 GiB of disk on a 2-core CPU. The result loads with ``vargpt_mlx.loading.load_model`` and
is what ``bench_chat.py`` / ``bench_generate.py --model DIR`` measure.
"""

from __future__ import annotations

import argparse

from common import build_random_checkpoint, fmt_mem, memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--scope", choices=["default", "all"], default="default",
                    help="which layers to quantize (as vargpt-mlx convert: default, or --quantize-all)")
    args = ap.parse_args()
    build_random_checkpoint(args.out_dir, bits=args.bits, group_size=args.group_size, scope=args.scope)
    print(fmt_mem(memory("build")))


if __name__ == "__main__":
    main()
