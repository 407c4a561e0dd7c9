"""Shared helpers of the benchmark scripts: the full-size random checkpoint, prompts, memory figures.

``build_random_checkpoint`` writes a converted (``"format": "mlx"``) checkpoint directory of the
FULL-SIZE VARGPT-v1.1 architecture (Qwen2-VL vision 675 M + Qwen2-7B + Infinity-2B + BSQ VAE,
10.95 B parameters) with random weights, quantized exactly as ``vargpt-mlx convert -q`` quantizes
(``vargpt_mlx.convert.convert.build_outputs``), without ever holding the float model in memory: the model's
parameters are lazy random arrays, and the output tensors are evaluated one module at a time and
written in shards of ~2 GB. Loading it back goes through the normal loader
(``vargpt_mlx.loading.load_model``), which memory-maps the safetensors: parts a run never touches
(the vision tower and ``lm_head`` during text-to-image, Infinity and the VAE during chat) are never
read into memory.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import vargpt_mlx  # noqa: E402,F401  (before numpy, as in the command line: see vargpt_mlx/__init__.py)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "public" / "checkpoint"
GiB = 1024**3


def real_config_dict() -> dict:
    """The real VARGPT-v1.1 ``config.json`` (fixture config with the real sizes and token ids, from
    ``keys.json``; the same construction as ``tests/test_loading.py::real_config``)."""
    keys = json.loads((ROOT / "tests" / "fixtures" / "public" / "keys.json").read_text())
    real = keys["real"]["config"]
    cfg = json.loads((FIXTURE / "config.json").read_text())
    shift = 151643 - 1000

    def fix(d):
        for k, v in d.items():
            if k.endswith("token_id") and isinstance(v, int):
                d[k] = v + shift

    fix(cfg)
    fix(cfg["special_tokens"])
    cfg.update({k: real[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "num_key_value_heads")})
    cfg["rope_scaling"]["mrope_section"] = real["mrope_section"]
    cfg["vision_config"] = {"depth": 32, "embed_dim": 1280, "hidden_size": real["hidden_size"], "num_heads": 16}
    return cfg


def build_random_checkpoint(out_dir: str | Path, *, bits: int | None = 4, group_size: int = 64,
                            scope: str = "default", dtype=mx.bfloat16, shard_bytes: int = 2 * GiB,
                            log=print) -> Path:
    """Write a full-size random checkpoint (see the module docstring); returns ``out_dir``."""
    from mlx.utils import tree_flatten

    from vargpt_mlx.convert.convert import QuantSpec, build_outputs
    from vargpt_mlx.config import VARGPTConfig
    from vargpt_mlx.models.vargpt import VARGPT

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = real_config_dict()
    config = VARGPTConfig.from_dict(raw, None)  # Infinity-2B / VAE-128 defaults, pn 0.25M
    mx.random.seed(0)
    weights = dict(tree_flatten(VARGPT(config).parameters()))  # lazy random arrays
    quant = QuantSpec(bits=bits, group_size=group_size, scope=scope) if bits else None
    outputs, quantized = build_outputs(config, weights, dtype=dtype, quant=quant)
    del weights
    units: dict[str, list[str]] = {}
    for k in sorted(outputs):
        units.setdefault(k.rsplit(".", 1)[0], []).append(k)  # weight/scales/biases of one layer together
    shard: dict[str, mx.array] = {}
    size, names, weight_map, total = 0, [], {}, 0
    t0 = time.perf_counter()

    def flush():
        nonlocal shard, size
        name = f"model-{len(names) + 1:05d}.safetensors"
        mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx"})
        names.append(name)
        for k in shard:
            weight_map[k] = name
        log(f"  wrote {name}: {size / GiB:.2f} GiB ({time.perf_counter() - t0:.0f} s)")
        shard, size = {}, 0
        mx.clear_cache()

    for unit in units.values():
        arrays = [outputs.pop(k) for k in unit]
        mx.eval(*arrays)
        for k, v in zip(unit, arrays):
            shard[k] = v
            size += v.nbytes
            total += v.nbytes
        del arrays
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    n = len(names)
    for i, old in enumerate(names):  # mlx-lm shard names
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (out / old).rename(out / new)
        for k, v in weight_map.items():
            if v == old:
                weight_map[k] = new
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total, "format": "mlx"}, "weight_map": dict(sorted(weight_map.items()))}))
    cfg = dict(raw, format="mlx", **config.arch_dict())
    if quant is not None:
        cfg["quantization"] = quant.config_block()
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    log(f"full-size random checkpoint: {total / GiB:.2f} GiB in {n} shards, {len(quantized)} quantized layers "
        f"({time.perf_counter() - t0:.0f} s)")
    return out


def prompt_ids(config, n_text: int, seed: int = 0) -> np.ndarray:
    """A chat-template-shaped prompt: ``<|im_start|>user\\n`` + n_text random text ids +
    ``<|im_end|>\\n<|im_start|>assistant\\n`` (ids of ordinary tokens; no tokenizer needed)."""
    t = config.tokens
    rng = np.random.default_rng(seed)
    text = rng.integers(100, min(config.llm.vocab_size, 1000) - 1, n_text).tolist()
    nl, user, assistant = 198 % 1000, 872 % 1000, 77091 % 1000  # stand-ins below the special ids
    ids = [t.bos_token_id + 1, user, nl] + text + [t.eos_token_id, nl, t.bos_token_id + 1, assistant, nl]
    return np.asarray(ids, dtype=np.int64)


def memory(label: str = "") -> dict:
    """MLX peak / active memory and the process's max RSS, in GiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux: KiB
    return {"label": label, "mlx_peak_gib": mx.get_peak_memory() / GiB, "mlx_active_gib": mx.get_active_memory() / GiB,
            "max_rss_gib": rss}


def fmt_mem(m: dict) -> str:
    return (f"mlx peak {m['mlx_peak_gib']:.2f} GiB, active {m['mlx_active_gib']:.2f} GiB, "
            f"process max RSS {m['max_rss_gib']:.2f} GiB")


def median_ms(f, n: int, warm: int) -> float:
    """Median milliseconds of ``mx.eval(f())`` over ``n`` calls after the first ``warm``."""
    import time

    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        mx.eval(f())
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts[warm:]))


def machine() -> str:
    import os
    import platform

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, mlx {mx.__version__} "
            f"({mx.default_device()}), load avg {load:.1f}")
