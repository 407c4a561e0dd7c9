"""Quantization drift on the public fixture: convert to float32, quantize (q8 / q4, group 32 / 64,
default and --quantize-all scopes), load each back and compare with the float model.

    python benchmarks/quant_drift.py [--model tests/fixtures/public/checkpoint] [--refs tests/fixtures/public/refs.safetensors]

Prints, per setting: quantized layers, size, LLM logit max error (absolute and relative to the max
|logit|) and top-1 agreement on the ``txt`` (text) and ``und`` (image + text) prompts, and the
agreement of image-generation bit choices (teacher-forced with the reference bits, CFG logits).
The fixture's weights are random, so its logits are nearly flat (max |logit| ~ 4 over 1024 tokens)
and top-1 is decided by small margins: the figures are an upper bound on what a trained model sees.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from vargpt_mlx.convert.convert import QuantSpec, convert_checkpoint, measure_drift, model_outputs, quantize_checkpoint  # noqa: E402
from vargpt_mlx.loading import load_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "tests/fixtures/public/checkpoint"))
    ap.add_argument("--refs", default=str(ROOT / "tests/fixtures/public/refs.safetensors"))
    args = ap.parse_args(argv)
    refs = load_file(args.refs)
    info = json.loads((Path(args.refs).parent / "refs.json").read_text())["info"]["generation"]
    schedule = [(int(t[-2]), int(t[-1])) for t in info["scale_schedule"]]
    gen = dict(cfg=float(info.get("cfg", 3.0)), tau=float(info.get("tau", 0.5)))
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32"
        convert_checkpoint(args.model, f32, dtype="float32")
        ref = model_outputs(load_model(f32, dtype=mx.float32), refs, schedule, **gen)
        head = (f"{'setting':22s} {'layers':>6s} {'size':>9s} | {'txt err (rel)':>16s} {'top1':>6s} | "
                f"{'und err (rel)':>16s} {'top1':>6s} | {'bits agree':>10s} {'bit-logit err (rel)':>20s}")
        print(head)
        print("-" * len(head))
        for scope in ("default", "all"):
            for bits in (8, 4):
                for gs in (32, 64):
                    q = Path(tmp) / f"q{bits}g{gs}{scope}"
                    t = time.perf_counter()
                    res = quantize_checkpoint(f32, q, quant=QuantSpec(bits, gs, scope))
                    d = measure_drift(ref, model_outputs(load_model(q, dtype=mx.float32), refs, schedule, **gen))
                    print(f"q{bits} g{gs} {scope:12s} {len(res.quantized):6d} {res.total_bytes / 2**20:7.2f}Mi | "
                          f"{d['txt_max_err']:7.3g} ({d['txt_rel_err']:5.1%}) {d['txt_top1']:6.3f} | "
                          f"{d['und_max_err']:7.3g} ({d['und_rel_err']:5.1%}) {d['und_top1']:6.3f} | "
                          f"{d['bits_agree']:10.4f} {d['bits_max_err']:11.3g} ({d['bits_rel_err']:5.1%})"
                          f"   [{time.perf_counter() - t:.1f}s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
