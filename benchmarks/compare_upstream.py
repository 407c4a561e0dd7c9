"""The port against the original PyTorch code on the same machine, same checkpoint, same inputs.

    python benchmarks/compare_upstream.py                    # small: LLM 128x3, Infinity 256x4, VAE base 32, 512x512
    python benchmarks/compare_upstream.py --config medium    # LLM 896x8, Infinity 1024x8, VAE base 64, 512x512
    python benchmarks/compare_upstream.py --quick            # tiny sizes, 256x256: a smoke run (~30 s)

One random checkpoint is built with the original classes (``vargpt-mlx reference random``'s builder,
through the reference interpreter) or taken with ``--checkpoint DIR``. Then each implementation
runs in its own process with the same thread count (``--threads``, default all cores: the
``*_NUM_THREADS`` variables and ``torch.set_num_threads``), float32, the same prompt ids and the same
latent codes:

* the original (``vargpt_mlx/reference``'s upstream loader, the ``[reference]`` interpreter:
  ``--reference-python`` or ``$VARGPT_REFERENCE_PYTHON``, else ``.venv-reference/bin/python``);
* the port, twice: with Debian's OpenBLAS preloaded (what the ``vargpt-mlx`` command does by
  itself on Linux) and with MLX's bundled BLAS (``--blas openblas|default|both``).

Measured in each process, one run each after a short warm-up: prefill tokens/s and decode
tokens/s of greedy text generation (image-start and end-of-text tokens banned, so that every run
decodes the same number of tokens); one image with upstream's sampling settings (cfg 3, tau 0.5,
top-k 900, top-p 0.97, seed 0), split into the prompt prefill, the LLM passes (cond + uncond),
Infinity (projector, blocks, head), sampling, the VAE decode and the rest; the VAE decode alone
on fixed random codes; the process's peak RSS. The port's lazy graph is evaluated at each split
point (``mx.eval``), as its own per-scale loop does anyway.

The machine's limits are measured in the same run: float32 GEMM GFLOP/s (2048^3) with MLX (per
BLAS) and with torch, and memory bandwidth (numpy copy of 512 MiB, read + write). Each phase's
arithmetic is counted from the model's sizes (matmul FLOPs of the LLM and Infinity linears per
token, the VAE's convolutions per pixel; attention and elementwise work not counted), and the
table gives the fraction of its implementation's own GEMM peak each phase reaches (decode: the
fraction of the memory bandwidth that streaming the LLM weights once per token needs).

The table's ratio is port speed / original speed (> 1: the port is faster); for memory,
original / port (> 1: the port is leaner). ``--json PATH`` writes every figure.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF_DIR = ROOT / "vargpt_mlx" / "reference"

CONFIGS = {
    # name: (reference sizes spec, prompt tokens for prefill, decoded tokens, prompt tokens of the image prompt)
    "quick": ("tiny,llm_layers=2", 32, 8, 12),
    "small": ("025m", 256, 64, 24),
    "medium": ("025m,llm_dim=896,llm_ffn=4864,llm_layers=8,llm_heads=14,llm_kv_heads=2,mrope=8:12:12,"
               "inf_dim=1024,inf_depth=8,inf_heads=16,inf_chunks=2,vae_ch=64", 256, 64, 24),
}
GiB = 1024**3


# ============================================================================ shared helpers
def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        env[k] = str(threads)
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def bandwidth_gbs(mib: int) -> float:
    import numpy as np

    a = np.ones(mib * 1024 * 1024 // 4, dtype=np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def gemm_size(quick: bool) -> int:
    return 512 if quick else 2048


# ============================================================================ the original
def upstream_side(a) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(REF_DIR))
    import record  # noqa: E402  (vargpt_mlx/reference, run as top-level modules as the recorder does)
    import upstream_env  # noqa: E402
    from transformers import LogitsProcessor, LogitsProcessorList

    inp = json.loads(Path(a.inputs).read_text())
    out: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    n = gemm_size(a.quick)
    x, y = torch.randn(n, n), torch.randn(n, n)
    x @ y
    t = time.perf_counter()
    for _ in range(3):
        x @ y
    out["gemm_gflops"] = 2 * n**3 * 3 / (time.perf_counter() - t) / 1e9
    del x, y

    upstream_env.prepare(a.upstream)
    modeling = upstream_env.modeling()
    t = time.perf_counter()
    m, cfg, _arch, _s, _ = record.load_upstream(modeling, Path(a.checkpoint), "float32", "cpu")
    out["load_s"] = time.perf_counter() - t
    out["rss_after_load_gib"] = rss_gib()
    ids = record.token_ids(cfg)
    ban = [ids["image_gen_start_token_id"], ids["eos_token_id"]]
    start_id = ids["image_gen_start_token_id"]

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, ban] = -float("inf")
            return scores

    def text(prompt, n_new):
        with torch.no_grad():
            t0 = time.perf_counter()
            m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                       min_new_tokens=n_new, do_sample=False, logits_processor=LogitsProcessorList([Ban()]),
                       pad_token_id=ids["pad_token_id"], eos_token_id=ids["eos_token_id"])
            return time.perf_counter() - t0

    prompt = torch.tensor([inp["text_ids"]], dtype=torch.long)
    text(prompt[:, :8], 3)  # warm-up
    out["prefill_tokens"] = prompt.shape[1]
    out["prefill_s"] = min(text(prompt, 1) for _ in range(2))
    out["decode_tokens"] = a.decode_tokens
    out["decode_s"] = text(prompt, a.decode_tokens + 1) - out["prefill_s"]

    # ---- one image, upstream's own loop, with timers around its parts
    acc = {"llm_s": 0.0, "infinity_s": 0.0, "sampling_s": 0.0, "vae_s": 0.0}
    st = {"on": False, "llm_t0": 0.0, "last_llm_end": None, "t_start": 0.0, "t_infer_end": 0.0,
          "t_infer_start": 0.0, "scales": 0}

    def llm_pre(mod, args, kwargs):
        if st["on"]:
            st["llm_t0"] = time.perf_counter()

    def llm_post(mod, args, kwargs, res):
        if st["on"]:
            now = time.perf_counter()
            acc["llm_s"] += now - st["llm_t0"]
            st["last_llm_end"] = now

    h1 = m.model.register_forward_pre_hook(llm_pre, with_kwargs=True)
    h2 = m.model.register_forward_hook(llm_post, with_kwargs=True)
    orig_sampler = modeling.sample_with_top_k_top_p_also_inplace_modifying_logits_
    orig_decode, orig_infer = m.vae_local.decode, m.autoregressive_infer_cfg

    def sampler(*args, **kwargs):
        t0 = time.perf_counter()
        if st["last_llm_end"] is not None:
            acc["infinity_s"] += t0 - st["last_llm_end"]
            st["last_llm_end"] = None
        r = orig_sampler(*args, **kwargs)
        acc["sampling_s"] += time.perf_counter() - t0
        st["scales"] += 1
        return r

    def decode(z):
        t0 = time.perf_counter()
        r = orig_decode(z)
        acc["vae_s"] += time.perf_counter() - t0
        return r

    def infer(*args, **kwargs):
        kwargs["g_seed"] = 0
        st["on"], st["t_infer_start"] = True, time.perf_counter()
        try:
            return orig_infer(*args, **kwargs)
        finally:
            st["on"], st["t_infer_end"] = False, time.perf_counter()

    class ForceStart(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == gen_prompt.shape[1]:
                scores = torch.full_like(scores, -float("inf"))
                scores[:, start_id] = 0.0
            return scores

    modeling.sample_with_top_k_top_p_also_inplace_modifying_logits_ = sampler
    m.vae_local.decode, m.autoregressive_infer_cfg = decode, infer
    gen_prompt = torch.tensor([inp["gen_ids"]], dtype=torch.long)
    fd, png = tempfile.mkstemp(suffix=".png")
    os.close(fd)
    m._IMAGE_GEN_PATH = png
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            m.generate(input_ids=gen_prompt, attention_mask=torch.ones_like(gen_prompt), max_new_tokens=2,
                       do_sample=False, logits_processor=LogitsProcessorList([ForceStart()]),
                       pad_token_id=ids["pad_token_id"], eos_token_id=ids["eos_token_id"])
    finally:
        h1.remove()
        h2.remove()
        modeling.sample_with_top_k_top_p_also_inplace_modifying_logits_ = orig_sampler
        del m.vae_local.decode, m.autoregressive_infer_cfg
        Path(png).unlink(missing_ok=True)
    img = dict(acc)
    img["total_s"] = st["t_infer_end"] - t0
    img["prefill_s"] = st["t_infer_start"] - t0
    img["other_s"] = img["total_s"] - img["prefill_s"] - sum(acc.values())
    img["scales"] = st["scales"]
    out["image"] = img

    z = torch.from_numpy(np.load(a.codes).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        t0 = time.perf_counter()
        m.vae_local.decode(z)
        out["vae_alone_s"] = time.perf_counter() - t0
    out["rss_peak_gib"] = rss_gib()
    return out


# ============================================================================ the port
def port_side(a) -> dict:
    import vargpt_mlx  # noqa: F401  (first, as in the command line: its numpy import settings)
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from vargpt_mlx.loading import load_model
    from vargpt_mlx.models import infinity as inf_mod
    from vargpt_mlx.models import vae as vae_mod
    from vargpt_mlx.models.rope_index import plain_position_ids
    from vargpt_mlx.pipelines import image_generation as ig
    from vargpt_mlx.text_generation import stream_generate

    inp = json.loads(Path(a.inputs).read_text())
    out: dict = {"mlx": mx.__version__, "ld_preload": os.environ.get("LD_PRELOAD", "")}
    n = gemm_size(a.quick)
    x, y = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(x @ y)
    t = time.perf_counter()
    for _ in range(3):
        mx.eval(x @ y)
    out["gemm_gflops"] = 2 * n**3 * 3 / (time.perf_counter() - t) / 1e9
    del x, y

    t = time.perf_counter()
    model = load_model(a.checkpoint, dtype=mx.float32)
    mx.eval(model.parameters())
    out["load_s"] = time.perf_counter() - t
    out["rss_after_load_gib"] = rss_gib()
    cfg = model.config
    tok = cfg.tokens
    ban = mx.array([tok.image_gen_start_token_id, tok.eos_token_id])

    def banned(history, logits):
        logits[..., ban] = -mx.inf
        return logits

    def text(ids, n_new):
        t0 = time.perf_counter()
        embeds = model.model.embed(mx.array([ids]))
        pos = mx.array(plain_position_ids(1, len(ids)))
        stamps = []
        for _tok, logits in stream_generate(model.model, model.lm_head, embeds, pos, 0, max_tokens=n_new,
                                            logits_processors=[banned], prompt_ids=list(ids)):
            stamps.append(time.perf_counter())
        return stamps[0] - t0, stamps[-1] - stamps[0], len(stamps)

    text(inp["text_ids"][:8], 3)  # warm-up
    out["prefill_tokens"] = len(inp["text_ids"])
    out["prefill_s"] = min(text(inp["text_ids"], 1)[0] for _ in range(2))
    _, dec, got = text(inp["text_ids"], a.decode_tokens + 1)
    out["decode_tokens"], out["decode_s"] = got - 1, dec

    # ---- one image, the port's pipeline, evaluated at each split point
    acc = {"llm_s": 0.0, "infinity_s": 0.0, "sampling_s": 0.0, "vae_s": 0.0}
    orig_fs, orig_draw, orig_dec = inf_mod.Infinity.forward_scale, ig._draw_bits, vae_mod.BSQVAE.decode
    orig_sl = ig._scale_logits

    # LLM passes = a scale's whole step (both CFG branches through the LLM, the projector, Infinity)
    # minus Infinity's part: the port's CPU attention evaluates inside the LLM call itself, so the
    # LLM work is not all pending when Infinity starts
    def scale_logits(*args, **kwargs):
        t0 = time.perf_counter()
        r = orig_sl(*args, **kwargs)
        mx.eval(r[0])
        acc["llm_s"] += time.perf_counter() - t0
        return r

    def forward_scale(self, x, *args, **kwargs):
        mx.eval(x)  # the rest of the LLM passes and the projector
        t1 = time.perf_counter()
        r = orig_fs(self, x, *args, **kwargs)
        mx.eval(r)
        dt = time.perf_counter() - t1
        acc["infinity_s"] += dt
        acc["llm_s"] -= dt
        return r

    def draw_bits(logits, *args, **kwargs):
        t0 = time.perf_counter()
        r = orig_draw(logits, *args, **kwargs)
        mx.eval(r)
        acc["sampling_s"] += time.perf_counter() - t0
        return r

    def decode(self, z):
        t0 = time.perf_counter()
        r = orig_dec(self, z)
        mx.eval(r)
        acc["vae_s"] += time.perf_counter() - t0
        return r

    inf_mod.Infinity.forward_scale, ig._draw_bits, vae_mod.BSQVAE.decode = forward_scale, draw_bits, decode
    ig._scale_logits = scale_logits
    try:
        t0 = time.perf_counter()
        cache, hidden = ig.prefill_prompt(model, np.asarray(inp["gen_ids"]))
        mx.eval(hidden, [c.keys for c in cache])
        t_pre = time.perf_counter() - t0
        res = ig.draw_images(model, cache, hidden, ig.GenerationSettings(seed=0))
        total = time.perf_counter() - t0
    finally:
        inf_mod.Infinity.forward_scale, ig._draw_bits, vae_mod.BSQVAE.decode = orig_fs, orig_draw, orig_dec
        ig._scale_logits = orig_sl
    img = dict(acc, total_s=total, prefill_s=t_pre, scales=len(res[0].schedule))
    img["other_s"] = total - t_pre - sum(acc.values())
    out["image"] = img
    schedule = res[0].schedule

    z = mx.array(np.load(a.codes))
    t0 = time.perf_counter()
    mx.eval(model.vae_local.decode(z))
    out["vae_alone_s"] = time.perf_counter() - t0
    out["rss_peak_gib"] = rss_gib()

    # ---- arithmetic of each phase, from the sizes (matmul FLOPs only)
    def params(module, skip=()):
        return sum(v.size for k, v in tree_flatten(module.parameters()) if v.ndim >= 2
                   and not any(s in k for s in skip))

    llm_p = params(model.model, skip=("embed_tokens",))
    inf_p = params(model.vargpt_gen, skip=("cfg_uncond", "sos", "lvl_embed", "pos_start"))
    proj_p = params(model.image_gen_projector) + params(model.image_gen_projector_out)
    vocab_p = model.lm_head.weight.size
    T = sum(h * w for h, w in schedule)
    conv_flops = [0]
    orig_conv = vae_mod.Conv.__call__

    def counting(self, xx):
        r = orig_conv(self, xx)
        w = self.conv.weight
        conv_flops[0] += 2 * r.shape[0] * r.shape[1] * r.shape[2] * w.size
        return r

    vae_mod.Conv.__call__ = counting
    try:
        model.vae_local.decode(z)  # lazily: only the shapes are used
    finally:
        vae_mod.Conv.__call__ = orig_conv
    out["work"] = {
        "llm_params": llm_p, "infinity_params": inf_p, "lm_head_params": vocab_p, "image_tokens": T,
        "prefill_flops": 2 * llm_p * out["prefill_tokens"] + 2 * vocab_p,
        "decode_bytes_per_token": 4 * (llm_p + vocab_p),
        "image_llm_flops": 2 * (llm_p + proj_p) * 2 * T,  # cond + uncond branches
        "image_infinity_flops": 2 * inf_p * 2 * T,
        "vae_flops": conv_flops[0],
    }
    return out


# ============================================================================ the driver
def run_side(cmd: list[str], env: dict, label: str, timeout: float) -> dict:
    print(f"[compare] {label} ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"error: the {label} run failed (exit {r.returncode})")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    res = json.loads(lines[-1])
    print(f"[compare] {label}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return res


def find_reference_python(explicit: str | None) -> str:
    for c in (explicit, os.environ.get("VARGPT_REFERENCE_PYTHON"), str(ROOT / ".venv-reference" / "bin" / "python")):
        if c and Path(c).is_file():
            return c
    raise SystemExit("error: no reference interpreter (--reference-python, $VARGPT_REFERENCE_PYTHON or "
                     ".venv-reference/bin/python with the [reference] extra)")


def build_checkpoint(a, spec: str, ref_py: str) -> Path:
    if a.checkpoint:
        return Path(a.checkpoint)
    work = Path(a.work or Path(tempfile.gettempdir()) / f"vargpt_compare_{a.config}")
    ckpt = work / "checkpoint"
    stamp = work / "spec.txt"
    if (ckpt / "config.json").is_file() and stamp.is_file() and stamp.read_text() == spec:
        return ckpt
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from vargpt_mlx.reference import run_worker

    print(f"[compare] building the random checkpoint ({spec}) with the original classes ...", file=sys.stderr)
    run_worker(["random", "--upstream", str(a.upstream), "--sizes", spec, "--seed", "0", "--out", str(ckpt)],
               python=ref_py)
    stamp.write_text(spec)
    return ckpt


def make_inputs(ckpt: Path, n_text: int, n_gen: int, work: Path) -> tuple[Path, Path, dict]:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import prompt_ids

    from vargpt_mlx import schedules
    from vargpt_mlx.loading import load_config

    cfg = load_config(ckpt)
    text_ids = prompt_ids(cfg, n_text - 8, seed=0).tolist()
    gen_ids = prompt_ids(cfg, n_gen - 8, seed=1).tolist()
    schedule = schedules.get_schedule(cfg.pn)
    h, w = schedule[-1]
    codes = (np.random.default_rng(0).standard_normal((1, h, w, cfg.vae.codebook_dim)) * 0.18).astype(np.float32)
    work.mkdir(parents=True, exist_ok=True)
    (work / "inputs.json").write_text(json.dumps({"text_ids": text_ids, "gen_ids": gen_ids}))
    np.save(work / "codes.npy", codes)
    H, W = schedules.image_size(schedule)
    return work / "inputs.json", work / "codes.npy", {"pn": cfg.pn, "image": f"{W}x{H}", "scales": len(schedule)}


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def table(res: dict, meta: dict) -> str:
    cols = [k for k in ("port_openblas", "port_default") if k in res]
    names = {"port_openblas": "port, OpenBLAS", "port_default": "port, bundled BLAS"}
    up = res.get("original")
    head = "| measure | original (torch) |" + "".join(f" {names[c]} | ratio |" for c in cols)
    lines = [head, "|" + "---|" * (2 + 2 * len(cols))]

    def row(label, get, kind):
        vals = {}
        for k in ["original"] + cols:
            try:
                vals[k] = get(res[k]) if k in res else None
            except (KeyError, TypeError, ZeroDivisionError):
                vals[k] = None
        fmt = {"rate": "{:.1f}", "s": "{:.3f} s", "gib": "{:.2f} GiB", "gflops": "{:.1f}"}[kind]
        line = f"| {label} | {fmt.format(vals['original']) if vals['original'] is not None else '-'} |"
        for c in cols:
            v, o = vals[c], vals["original"]
            ratio = None
            if v is not None and o is not None and v > 0 and o > 0:
                ratio = v / o if kind in ("rate", "gflops") else o / v
            line += f" {fmt.format(v) if v is not None else '-'} | {fmt_ratio(ratio)} |"
        lines.append(line)

    row("prefill tokens/s", lambda r: r["prefill_tokens"] / r["prefill_s"], "rate")
    row("decode tokens/s", lambda r: r["decode_tokens"] / r["decode_s"], "rate")
    row(f"s per image ({meta['image']})", lambda r: r["image"]["total_s"], "s")
    for key, label in (("prefill_s", "  prompt prefill"), ("llm_s", "  LLM passes (cond + uncond)"),
                       ("infinity_s", "  Infinity"), ("sampling_s", "  sampling"), ("vae_s", "  VAE decode"),
                       ("other_s", "  rest")):
        row(label, lambda r, key=key: r["image"][key], "s")
    row("VAE decode alone", lambda r: r["vae_alone_s"], "s")
    row("peak RSS", lambda r: r["rss_peak_gib"], "gib")
    row("GEMM GFLOP/s (float32 2048^3)", lambda r: r["gemm_gflops"], "gflops")
    return "\n".join(lines)


def fractions(res: dict, bw: float) -> str:
    work = next((res[k]["work"] for k in ("port_openblas", "port_default") if k in res), None)
    if work is None:
        return ""
    cols = [k for k in ("original", "port_openblas", "port_default") if k in res]
    lines = ["| phase | work | " + " | ".join(cols) + " |", "|" + "---|" * (2 + len(cols))]

    def frac(r, flops, secs):
        return f"{flops / secs / 1e9:.1f} GFLOP/s = {100 * flops / secs / 1e9 / r['gemm_gflops']:.0f} %"

    specs = [
        ("prefill", f"{work['prefill_flops'] / 1e9:.2f} GFLOP", lambda r: frac(r, work["prefill_flops"], r["prefill_s"])),
        ("decode", f"{work['decode_bytes_per_token'] / 1e6:.1f} MB/token",
         lambda r: f"{work['decode_bytes_per_token'] * r['decode_tokens'] / r['decode_s'] / 1e9:.2f} GB/s = "
                   f"{100 * work['decode_bytes_per_token'] * r['decode_tokens'] / r['decode_s'] / 1e9 / bw:.1f} % of bandwidth"),
        ("image LLM passes", f"{work['image_llm_flops'] / 1e9:.2f} GFLOP",
         lambda r: frac(r, work["image_llm_flops"], r["image"]["llm_s"])),
        ("image Infinity", f"{work['image_infinity_flops'] / 1e9:.2f} GFLOP",
         lambda r: frac(r, work["image_infinity_flops"], r["image"]["infinity_s"])),
        ("VAE decode", f"{work['vae_flops'] / 1e9:.2f} GFLOP", lambda r: frac(r, work["vae_flops"], r["vae_alone_s"])),
    ]
    for name, w, f in specs:
        cells = []
        for c in cols:
            try:
                cells.append(f(res[c]))
            except (KeyError, ZeroDivisionError):
                cells.append("-")
        lines.append(f"| {name} | {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (256x256): a smoke run")
    ap.add_argument("--checkpoint", help="an upstream-format checkpoint (default: build one)")
    ap.add_argument("--work", help="where the checkpoint and inputs go (default: $TMPDIR/vargpt_compare_CONFIG)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--blas", choices=["both", "openblas", "default"], default="both",
                    help="the port with OpenBLAS preloaded, with MLX's bundled BLAS, or both")
    ap.add_argument("--upstream", default=os.environ.get("VARGPT_UPSTREAM") or str(ROOT.parent / "shared" / "upstream"))
    ap.add_argument("--reference-python")
    ap.add_argument("--decode-tokens", type=int)
    ap.add_argument("--skip-original", action="store_true", help="only the port (no ratios)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    ap.add_argument("--side", choices=["original", "port"], help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--codes", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.config = "quick"
    a.quick = a.config == "quick"
    spec, n_text, n_dec, n_gen = CONFIGS[a.config]
    a.decode_tokens = a.decode_tokens or n_dec

    if a.side:  # inside one of the measuring processes
        sys.path.insert(0, str(ROOT))
        res = upstream_side(a) if a.side == "original" else port_side(a)
        print(json.dumps(res))
        return 0

    ref_py = None if a.skip_original and a.checkpoint else find_reference_python(a.reference_python)
    ckpt = build_checkpoint(a, spec, ref_py)
    work = Path(a.work or Path(tempfile.gettempdir()) / f"vargpt_compare_{a.config}")
    inputs, codes, meta = make_inputs(ckpt, n_text, n_gen, work)
    base = ["--config", a.config, "--checkpoint", str(ckpt), "--threads", str(a.threads), "--inputs", str(inputs),
            "--codes", str(codes), "--decode-tokens", str(a.decode_tokens), "--upstream", str(a.upstream)]
    me = str(Path(__file__).resolve())
    env = thread_env(a.threads)
    env.pop("LD_PRELOAD", None)
    res: dict = {}
    if not a.skip_original:
        res["original"] = run_side([ref_py, me, "--side", "original", *base], env, "original (torch)", a.timeout)
    lib = ctypes.util.find_library("openblas")
    if a.blas in ("both", "openblas"):
        if lib is None:
            print("[compare] no OpenBLAS installed (apt-get install libopenblas0-pthread): skipping that column",
                  file=sys.stderr)
        else:
            res["port_openblas"] = run_side([sys.executable, me, "--side", "port", *base], dict(env, LD_PRELOAD=lib),
                                            "port, OpenBLAS preloaded", a.timeout)
    if a.blas in ("both", "default"):
        res["port_default"] = run_side([sys.executable, me, "--side", "port", *base],
                                       dict(env, VARGPT_MLX_NO_OPENBLAS="1"), "port, bundled BLAS", a.timeout)
    bw = bandwidth_gbs(128 if a.quick else 512)
    import platform

    print(f"\n{a.config}: {spec} -> {meta['image']}, pn {meta['pn']} ({meta['scales']} scales); float32; "
          f"{a.threads} threads; {platform.machine()} {os.cpu_count()} CPUs; load avg {os.getloadavg()[0]:.1f}")
    print(f"prompt {n_text} tokens for prefill, {a.decode_tokens} decoded tokens, image prompt {n_gen} tokens; "
          "ratio = port speed / original speed (memory: original / port)\n")
    print(table(res, meta))
    print(f"\nmachine: memory bandwidth {bw:.1f} GB/s (numpy copy); GEMM GFLOP/s in the table's last row\n")
    print(fractions(res, bw))
    if a.json:
        Path(a.json).write_text(json.dumps({"config": a.config, "spec": spec, "meta": meta, "threads": a.threads,
                                            "bandwidth_gbs": bw, "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
