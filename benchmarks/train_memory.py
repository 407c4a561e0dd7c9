"""Peak memory and speed of LoRA training steps on the FULL-SIZE VARGPT-v1.1 architecture.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python benchmarks/train_memory.py
    python benchmarks/train_memory.py --quick        # one depth configuration, SFT generation step only

What is MEASURED and what is EXTRAPOLATED (printed as such):

* q4 weights of the full model (exact): the full-size model is built lazily (no weight data is
  ever materialised), quantized like ``vargpt-mlx convert -q`` (4 bits, group 64, bf16 for the
  rest) and the bytes of every output tensor are summed from their shapes.
* One optimizer step (forward + backward + Adam on LoRA rank 8, targets llm + infinity on every
  layer) at FULL width and FULL sequence length (a 512x512 generation sample: 2,560 image-pad
  tokens + prompt; a chat sample: a 448x448 image = 256 image tokens + text; a DPO step on a
  pair of 512x512 image responses, with checkpointing back-propagated one response at a time as
  ``train dpo --grad-checkpoint`` does), on reduced-depth models: (LLM layers, Infinity blocks) =
  (1, 2), (2, 2), (1, 4). Memory = MLX peak minus the memory resident before the step (weights,
  cached targets), so it is the step's own activations / gradients / optimizer state.
* Full depth (28 LLM layers, 32 Infinity blocks) with gradient checkpointing (+ chunked attention
  and MLPs, what ``--grad-checkpoint`` turns on) is ESTIMATED as: the largest step memory measured
  at any of the reduced depths (one layer's recomputation, which does not grow with depth) + each
  further layer's saved input (T x H float32 per LLM layer, N x C per Infinity block) + the q4
  weights the step reads (the vision tower is not read by a generation sample; Infinity, the VAE,
  the projectors and sos_embedding are not read by a chat sample).

The reduced-depth runs use float32 weights and activations: on a CPU only float32 matmul is fast
(bf16 / quantized matmul run at 2-5 GFLOP/s there). On Apple silicon the compute dtype is
bfloat16, which halves the activation part; that halving is an estimate, not a measurement.
Speeds are this machine's CPU (see the header line), not a Mac's.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time

from common import GiB, machine, real_config_dict

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from vargpt_mlx import schedules
from vargpt_mlx.config import VARGPTConfig
from vargpt_mlx.models.vargpt import VARGPT
from vargpt_mlx.training import lora
from vargpt_mlx.training.dpo import dpo_loss
from vargpt_mlx.training.losses import sample_logprob, sample_sft_loss
from vargpt_mlx.training.trainer import enable_grad_checkpoint

FULL_LLM, FULL_INF = 28, 32  # full depth; the measured models have 1-2 LLM layers, 2-4 blocks


def full_config() -> VARGPTConfig:
    return VARGPTConfig.from_dict(real_config_dict(), None)


def q4_weight_bytes(config: VARGPTConfig) -> tuple[int, int]:
    """(bytes of the q4 model as convert writes it, bytes of the bf16 model) from shapes alone."""
    weights = dict(tree_flatten(VARGPT(config).parameters()))  # lazy: nothing is allocated
    bf16 = sum(v.size * (2 if mx.issubdtype(v.dtype, mx.floating) else v.itemsize) for v in weights.values())
    try:
        from vargpt_mlx.convert.convert import QuantSpec, build_outputs

        outputs, _ = build_outputs(config, weights, dtype=mx.bfloat16, quant=QuantSpec(bits=4, group_size=64))
        return sum(v.nbytes for v in outputs.values()), bf16
    except ImportError:  # fallback: every Linear / Embedding whose width divides by 64, VAE excluded
        model = VARGPT(config)
        nn.quantize(model, 64, 4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                    and not p.startswith("vae_local") and m.weight.shape[-1] % 64 == 0)
        return sum(v.size * 2 if mx.issubdtype(v.dtype, mx.floating) and v.dtype != mx.uint32 else v.nbytes
                   for _, v in tree_flatten(model.parameters())), bf16


def _part_bytes(config: VARGPTConfig, prefixes: tuple[str, ...]) -> int:
    weights = dict(tree_flatten(VARGPT(config).parameters()))
    try:
        from vargpt_mlx.convert.convert import QuantSpec, build_outputs

        out, _ = build_outputs(config, weights, dtype=mx.bfloat16, quant=QuantSpec(bits=4, group_size=64))
    except ImportError:
        out = weights
    return sum(v.nbytes for k, v in out.items() if k.startswith(prefixes))


def vision_bytes(config: VARGPTConfig) -> int:
    return _part_bytes(config, ("visual.",))


def gen_only_bytes(config: VARGPTConfig) -> int:
    """Parts a chat sample never reads: Infinity, the VAE, the projectors and sos_embedding."""
    return _part_bytes(config, ("vargpt_gen.", "vae_local.", "image_gen_projector", "sos_embedding"))


def reduced_model(n_llm: int, n_inf: int) -> VARGPT:
    raw = real_config_dict()
    raw["num_hidden_layers"] = n_llm
    raw["vision_config"]["depth"] = 1
    cfg = VARGPTConfig.from_dict(raw, {"infinity": {"depth": n_inf, "block_chunks": 2}})
    model = VARGPT(cfg)
    # lookups only: quantize the two big embedding tables so the float model fits in RAM
    nn.quantize(model, 64, 4, class_predicate=lambda p, m: p in ("model.embed_tokens", "sos_embedding"))
    mx.eval(model.parameters())
    model.eval()
    return model


def gen_sample(config: VARGPTConfig, rng: np.random.Generator, n_prompt: int = 24):
    t = config.tokens
    sched = schedules.get_schedule("0.25M", 1.0)  # 512x512, 10 scales
    n = schedules.padded_tokens(sched)
    L = schedules.total_tokens(sched)
    prompt = [t.bos_token_id + 1] + rng.integers(100, 1000, n_prompt).tolist() + [t.eos_token_id, t.bos_token_id + 1]
    answer = [t.image_gen_start_token_id] + [t.image_gen_pad_token_id] * n + [t.image_gen_end_token_id, t.eos_token_id]
    ids = np.asarray([prompt + answer], np.int32)
    labels = np.asarray([[-100] * len(prompt) + answer], np.int32)
    gt = mx.array(rng.integers(0, 2, (1, L, 32)).astype(np.uint8))
    x_wo = mx.array(rng.normal(0, 0.1, (1, L - 1, 32)).astype(np.float32))
    return dict(input_ids=mx.array(ids), labels=labels, gt_bits=gt, x_wo_prefix=x_wo, schedule=sched)


def chat_sample(config: VARGPTConfig, rng: np.random.Generator, side: int = 448, n_text: int = 24, n_answer: int = 48):
    t = config.tokens
    gh = gw = side // 14
    n_img = gh * gw // 4
    prompt = ([t.bos_token_id + 1] + rng.integers(100, 1000, n_text).tolist() + [t.vision_start_token_id]
              + [t.image_token_id] * n_img + [t.vision_end_token_id, t.eos_token_id, t.bos_token_id + 1])
    answer = rng.integers(100, 1000, n_answer).tolist() + [t.eos_token_id]
    pv = mx.array(rng.normal(0, 1, (gh * gw, 3 * 2 * 14 * 14)).astype(np.float32))
    return dict(input_ids=mx.array([prompt + answer]), labels=np.asarray([[-100] * len(prompt) + answer]),
                pixel_values=pv, image_grid_thw=np.array([[1, gh, gw]]))


def step(model, loss_fn, n_tokens: int, grad_fn=None) -> dict:
    opt = optim.Adam(learning_rate=1e-5)
    opt.init(model.trainable_parameters())
    mx.eval(opt.state)
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    loss, grads = grad_fn(model) if grad_fn else nn.value_and_grad(model, loss_fn)(model)
    opt.update(model, grads)
    mx.eval(loss, model.trainable_parameters(), opt.state)
    dt = time.perf_counter() - t0
    peak = mx.get_peak_memory()
    assert math.isfinite(loss.item())
    return {"seconds": dt, "tokens": n_tokens, "tokens_per_s": n_tokens / dt, "resident_gib": base / GiB,
            "step_gib": (peak - base) / GiB}


def run_config(n_llm: int, n_inf: int, plan: list[tuple[bool, list[str]]], log) -> dict:
    out = {}
    for ckpt, kinds in plan:
        model = reduced_model(n_llm, n_inf)
        lora.apply_lora(model, lora.LoraConfig(rank=8, scale=20.0, num_layers=-1, targets=("llm", "infinity")))
        if ckpt:
            enable_grad_checkpoint(model)
        cfg = model.config
        rng = np.random.default_rng(0)
        for kind in kinds:
            if kind == "sft_gen":
                s = gen_sample(cfg, rng)
                r = step(model, lambda m: sample_sft_loss(m, **s).loss, s["input_ids"].shape[1])
            elif kind == "sft_chat":
                s = chat_sample(cfg, rng)
                r = step(model, lambda m: sample_sft_loss(m, **s).loss, s["input_ids"].shape[1])
            elif kind == "dpo_gen":
                c, rj = gen_sample(cfg, rng), gen_sample(cfg, rng)
                rj["input_ids"] = c["input_ids"]
                rj["labels"] = c["labels"]

                def f(m):
                    pc, _ = sample_logprob(m, **c)
                    pr, _ = sample_logprob(m, **rj)
                    return dpo_loss(pc, pr, mx.stop_gradient(pc), mx.stop_gradient(pr), 0.1)[0]

                def split(m):  # DPOTask.loss_and_grad: one response's graph at a time
                    from mlx.utils import tree_map

                    pc, pr = (mx.stop_gradient(sample_logprob(m, **x)[0]) for x in (c, rj))
                    ref_c, ref_r = pc - 1.0, pr + 1.0
                    loss, (wc, wr) = mx.value_and_grad(
                        lambda a, b: dpo_loss(a, b, ref_c, ref_r, 0.1)[0], argnums=(0, 1))(pc, pr)
                    grads = None
                    for x, w in ((c, wc), (rj, wr)):
                        _, g = nn.value_and_grad(m, lambda mm: sample_logprob(mm, **x)[0])(m)
                        g = tree_map(lambda t: t * w, g)
                        grads = g if grads is None else tree_map(mx.add, grads, g)
                        mx.eval(grads)
                    return loss, grads

                r = step(model, f, 2 * c["input_ids"].shape[1], grad_fn=split if ckpt else None)
            else:
                raise ValueError(kind)
            key = f"{kind}{'+ckpt' if ckpt else ''}"
            out[key] = r
            log(f"  LLM {n_llm} / Infinity {n_inf} {key:16s} {r['seconds']:7.1f} s  {r['tokens_per_s']:7.1f} tok/s  "
                f"step memory {r['step_gib']:6.2f} GiB  (resident {r['resident_gib']:.2f} GiB)")
        del model
        gc.collect()
        mx.clear_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only (1, 2) and the SFT generation step with checkpointing")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--kinds", default="sft_gen,sft_chat,dpo_gen",
                    help="step kinds to measure (sft_gen, sft_chat, dpo_gen); the estimate covers those")
    args = ap.parse_args()
    print(machine())
    cfg = full_config()
    q4, bf16 = q4_weight_bytes(cfg)
    print(f"full model weights: q4 {q4 / GiB:.2f} GiB (measured from shapes), bf16 {bf16 / GiB:.2f} GiB")
    # gradient checkpointing (+ chunked attention / MLP) for every step kind; without it only SFT gen
    kinds = args.kinds.split(",")
    plan = [(True, ["sft_gen"])] if args.quick else [(True, kinds)] + ([(False, ["sft_gen"])] if "sft_gen" in kinds else [])
    configs = [(1, 2)] if args.quick else [(1, 2), (2, 2), (1, 4)]
    res = {}
    for n_llm, n_inf in configs:
        res[(n_llm, n_inf)] = run_config(n_llm, n_inf, plan, print)
    report = {"machine": machine(), "q4_weights_gib": q4 / GiB, "bf16_weights_gib": bf16 / GiB,
              "measured": {f"{a}x{b}": v for (a, b), v in res.items()}, "extrapolated": {}}
    # With checkpointing, what grows with depth is each layer's saved input: (T x H) per LLM layer and
    # (N x C) per Infinity block, float32 here. The rest is one layer's recomputation (a transient that
    # does not grow with depth): taken as the largest step memory measured at any depth.
    resident = {"sft_gen": q4 - vision_bytes(cfg), "dpo_gen": q4 - vision_bytes(cfg),
                "sft_chat": q4 - gen_only_bytes(cfg)}
    print("\nESTIMATED for 28 LLM layers + 32 Infinity blocks, gradient checkpointing (float32 activations;")
    print("resident = the q4 weights the step reads, the vision tower is not read by generation samples):")
    for key in res[configs[0]]:
        if not key.endswith("+ckpt"):
            continue
        kind = key.split("+")[0]
        n_seq = 2 if kind == "dpo_gen" else 1
        T = res[configs[0]][key]["tokens"] // n_seq
        n_seq = 1  # with checkpointing a DPO step holds one response's graph at a time
        N = 2560 if "gen" in kind else 0
        transient = max(res[c][key]["step_gib"] for c in configs)
        saved = n_seq * ((FULL_LLM - 1) * T * cfg.llm.hidden_size + (FULL_INF - 2) * N * cfg.infinity.embed_dim) * 4 / GiB
        step_fp32 = transient + saved
        peak = resident[kind] / GiB + step_fp32
        peak_bf16 = resident[kind] / GiB + step_fp32 / 2
        seconds = None
        if len(configs) == 3:  # linear in depth: per-LLM-layer and per-Infinity-block slopes
            a, b, c = (res[cf][key]["seconds"] for cf in configs)
            seconds = a + (FULL_LLM - 1) * (b - a) + (FULL_INF - 2) * (c - a) / 2
        report["extrapolated"][key] = {"transient_gib": transient, "saved_inputs_gib": saved,
                                       "resident_weights_gib": resident[kind] / GiB, "peak_gib_fp32_acts": peak,
                                       "peak_gib_bf16_acts_estimate": peak_bf16, "cpu_seconds_per_step": seconds}
        print(f"  {key:16s} transient {transient:.2f} + saved layer inputs {saved:.2f} GiB; with "
              f"{resident[kind] / GiB:.2f} GiB of q4 weights: peak {peak:.2f} GiB "
              f"(bf16 activations, estimate: {peak_bf16:.2f} GiB)"
              + (f"; ~{seconds / 60:.0f} min/step on this CPU (float32, extrapolated)" if seconds else ""))
    if len(configs) > 1 and "sft_gen" in res[configs[0]]:
        a, b = res[configs[0]], res[configs[1]]
        print(f"  without checkpointing one more LLM layer adds {b['sft_gen']['step_gib'] - a['sft_gen']['step_gib']:.2f}"
              f" GiB (x 27 more layers: does not fit)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
