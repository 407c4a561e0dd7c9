"""LoRA adapters on VARGPT (mlx-lm's ``LoRALinear``), saving / loading / fusing them.

Targets (``targets``), each on the last ``num_layers`` layers of its stack (-1: all):

* ``llm``: ``self_attn.{q,k,v,o}_proj`` of the Qwen2 layers (``mlp.{gate,up,down}_proj`` too
  with ``mlp=True``);
* ``infinity``: ``sa.mat_qkv``, ``sa.proj``, ``ca.mat_q``, ``ca.mat_kv``, ``ca.proj``,
  ``ffn.fc1``, ``ffn.fc2`` of the Infinity blocks;
* ``vision``: ``attn.qkv``, ``attn.proj`` of the vision blocks (``mlp.fc1`` / ``mlp.fc2`` with
  ``mlp=True``).

``LoRALinear.from_base`` wraps ``nn.Linear`` and ``nn.QuantizedLinear`` alike, so a quantized base
gives QLoRA. The adapter directory holds ``adapters.safetensors`` (only ``lora_a`` / ``lora_b``)
and ``adapter_config.json`` (mlx-lm style: ``fine_tune_type``, ``num_layers``,
``lora_parameters``; plus ``targets`` and the exact ``modules`` list). :func:`load_adapters` is
what ``chat`` / ``generate`` / ``edit`` call for ``--adapter-path``.

Full fine-tuning (``fine_tune_type="full"``, as mlx-lm has) trains every unfrozen parameter; the
same two files then hold all trained weights and ``{"fine_tune_type": "full"}``, and
``--adapter-path`` loads them over the base model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from ..errors import InputError

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"

LLM_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LLM_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
INFINITY_KEYS = ("sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv", "ca.proj", "ffn.fc1", "ffn.fc2")
VISION_ATTN = ("attn.qkv", "attn.proj")
VISION_MLP = ("mlp.fc1", "mlp.fc2")
TARGETS = ("llm", "infinity", "vision")


class AdapterError(InputError):
    """Adapters that cannot be applied (missing files, incompatible shapes or config)."""


@dataclass
class LoraConfig:
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: int = 16  # last N layers of each targeted stack; -1 = all
    targets: tuple[str, ...] = ("llm", "infinity")
    mlp: bool = False  # LLM / vision MLPs too (Infinity's FFN is always included)
    modules: list[str] = field(default_factory=list)  # filled by apply_lora
    fine_tune_type: str = "lora"  # lora | full

    @property
    def full(self) -> bool:
        return self.fine_tune_type == "full"

    def to_json(self) -> dict:
        if self.full:
            return {"fine_tune_type": "full", "format": "vargpt-mlx"}
        keys = []
        for t in self.targets:
            keys += list(_stack_keys(t, self.mlp))
        return {
            "fine_tune_type": "lora",
            "format": "vargpt-mlx",
            "num_layers": self.num_layers,
            "targets": list(self.targets),
            "mlp": self.mlp,
            "lora_parameters": {"rank": self.rank, "scale": self.scale, "dropout": self.dropout, "keys": keys},
            "modules": list(self.modules),
        }

    @classmethod
    def from_json(cls, d: dict) -> "LoraConfig":
        kind = d.get("fine_tune_type", "lora")
        if kind == "full":
            return cls(fine_tune_type="full", targets=(), num_layers=-1)
        if kind != "lora":
            raise AdapterError(f"unsupported fine_tune_type {kind!r} (lora or full)")
        p = d.get("lora_parameters") or {}
        try:
            return cls(rank=int(p["rank"]), scale=float(p["scale"]), dropout=float(p.get("dropout", 0.0)),
                       num_layers=int(d.get("num_layers", -1)), targets=tuple(d.get("targets", ())),
                       mlp=bool(d.get("mlp", False)), modules=list(d["modules"]))
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterError(f"{CONFIG_FILE} is malformed: missing or bad field {e}") from None


def _stack_keys(target: str, mlp: bool) -> tuple[str, ...]:
    if target == "llm":
        return LLM_ATTN + (LLM_MLP if mlp else ())
    if target == "infinity":
        return INFINITY_KEYS
    if target == "vision":
        return VISION_ATTN + (VISION_MLP if mlp else ())
    raise AdapterError(f"unknown LoRA target {target!r}; expected some of {', '.join(TARGETS)}")


def _stack(model, target: str) -> tuple[str, list[nn.Module]]:
    if target == "llm":
        return "model.layers", list(model.model.layers)
    if target == "infinity":
        inf = model.vargpt_gen
        per = len(inf.block_chunks[0].module)
        names = [f"vargpt_gen.block_chunks.{i // per}.module.{i % per}" for i in range(len(inf.blocks))]
        return names, inf.blocks
    if target == "vision":
        return "visual.blocks", list(model.visual.blocks)
    raise AdapterError(f"unknown LoRA target {target!r}; expected some of {', '.join(TARGETS)}")


def target_modules(model, cfg: LoraConfig) -> list[str]:
    """Full module paths that get a LoRA layer for ``cfg`` (last ``num_layers`` per stack)."""
    out = []
    for t in cfg.targets:
        prefix, layers = _stack(model, t)
        n = len(layers)
        start = 0 if cfg.num_layers < 0 else max(n - cfg.num_layers, 0)
        for i in range(start, n):
            base = prefix[i] if isinstance(prefix, list) else f"{prefix}.{i}"
            out += [f"{base}.{k}" for k in _stack_keys(t, cfg.mlp)]
    return out


def _wrap(model, paths: list[str], cfg: LoraConfig, key: mx.array | None) -> None:
    modules = dict(model.named_modules())
    keys = mx.random.split(key, max(len(paths), 2)) if key is not None else None
    new = []
    for i, p in enumerate(paths):
        m = modules.get(p)
        if m is None:
            raise AdapterError(f"model has no module {p}")
        if isinstance(m, LoRALinear):
            raise AdapterError(f"{p} already has a LoRA adapter")
        if not isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            raise AdapterError(f"{p} is a {type(m).__name__}, not a linear layer")
        lora = LoRALinear.from_base(m, r=cfg.rank, dropout=cfg.dropout, scale=cfg.scale)
        if key is not None:  # seeded init (mlx-lm draws lora_a from the global generator)
            bound = 1 / math.sqrt(lora.lora_a.shape[0])
            lora.lora_a = mx.random.uniform(-bound, bound, lora.lora_a.shape, key=keys[i])
        new.append((p, lora))
    model.update_modules(tree_unflatten(new))


def apply_lora(model, cfg: LoraConfig, seed: int = 0) -> LoraConfig:
    """Freeze ``model`` and wrap the target linears with LoRA (only ``lora_a`` / ``lora_b`` are
    trainable). ``lora_b`` starts at zero, so the model's outputs are unchanged. ``cfg.modules``
    (when non-empty) lists the exact module paths, else they follow from targets / num_layers.
    Returns ``cfg`` with ``modules`` filled in."""
    for t in cfg.targets:
        _stack_keys(t, cfg.mlp)  # validates the target names
    model.freeze()
    cfg.modules = list(cfg.modules) or target_modules(model, cfg)
    _wrap(model, cfg.modules, cfg, mx.random.key(seed))
    return cfg


def lora_layers(model) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def adapter_weights(model) -> dict[str, mx.array]:
    """The ``lora_a`` / ``lora_b`` arrays, keyed by full parameter path."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}


def trained_weights(model, cfg: LoraConfig) -> dict[str, mx.array]:
    """What a run trains and saves: the LoRA arrays, or (full) every trainable parameter."""
    return dict(tree_flatten(model.trainable_parameters())) if cfg.full else adapter_weights(model)


@contextmanager
def adapters_disabled(model):
    """Temporarily zero every LoRA layer's scale: the base model, without a second copy."""
    layers = [m for _, m in lora_layers(model)]
    saved = [m.scale for m in layers]
    try:
        for m in layers:
            m.scale = 0.0
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.scale = s


# ---------------------------------------------------------------------------- files
def atomic_write_bytes(path: Path, write) -> None:
    """``write(tmp_path)`` then ``os.replace`` onto ``path`` (readers never see a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    atomic_write_bytes(path, w)


def save_safetensors_atomic(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None):
    # mx.save_safetensors appends ".safetensors" unless the name ends with it
    def w(tmp):
        tmp_st = tmp + ".safetensors"
        try:
            mx.save_safetensors(tmp_st, arrays, metadata=metadata or {})
            os.replace(tmp_st, tmp)
        finally:
            if os.path.exists(tmp_st):
                os.unlink(tmp_st)
    atomic_write_bytes(path, w)


def save_adapters(model, adapter_path: str | Path, cfg: LoraConfig, extra: dict | None = None) -> None:
    """Write ``adapters.safetensors`` and ``adapter_config.json`` atomically."""
    adapter_path = Path(adapter_path)
    save_safetensors_atomic(adapter_path / ADAPTER_FILE, trained_weights(model, cfg), {"format": "mlx"})
    cfg_json = cfg.to_json()
    if extra:
        cfg_json.update(extra)
    atomic_write_text(adapter_path / CONFIG_FILE, json.dumps(cfg_json, indent=2))


def read_adapter_config(adapter_path: str | Path) -> LoraConfig:
    adapter_path = Path(adapter_path)
    if not adapter_path.is_dir():
        raise AdapterError(f"adapter path {adapter_path} does not exist")
    cfg_file = adapter_path / CONFIG_FILE
    if not cfg_file.is_file():
        raise AdapterError(f"{adapter_path} has no {CONFIG_FILE}")
    try:
        return LoraConfig.from_json(json.loads(cfg_file.read_text()))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file} is not valid JSON: {e}") from None


def load_adapters(model, adapter_path: str | Path):
    """Apply the LoRA layers listed in ``adapter_config.json`` and load ``adapters.safetensors``.

    Every adapter tensor must match a LoRA parameter of the model (name and shape) and every LoRA
    parameter must be present; otherwise :class:`AdapterError` names the first mismatch.
    Returns ``model`` (modified in place; the base weights are untouched).
    """
    adapter_path = Path(adapter_path)
    cfg = read_adapter_config(adapter_path)
    wfile = adapter_path / ADAPTER_FILE
    if not wfile.is_file():
        raise AdapterError(f"{adapter_path} has no {ADAPTER_FILE}")
    try:
        weights = mx.load(str(wfile))
    except Exception as e:
        raise AdapterError(f"cannot read {wfile}: {str(e).splitlines()[0]}") from None
    if cfg.full:
        expected = dict(tree_flatten(model.parameters()))
        for k, v in weights.items():
            if k not in expected or tuple(v.shape) != tuple(expected[k].shape):
                raise AdapterError(f"{ADAPTER_FILE} has {k} {tuple(v.shape)}, which is not a parameter of this model")
        model.load_weights(list(weights.items()), strict=False)
        mx.eval(model.parameters())
        return model
    _wrap(model, cfg.modules, cfg, None)
    expected = adapter_weights(model)
    for k, v in weights.items():
        if k not in expected:
            raise AdapterError(f"{ADAPTER_FILE} has {k}, which is not a LoRA parameter of this model")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise AdapterError(f"adapter {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise AdapterError(f"{ADAPTER_FILE} lacks {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(list(adapter_weights(model).values()))
    return model


def fuse_lora(model, dequantize: bool = False):
    """Merge every LoRA layer into its base linear (mlx-lm ``LoRALinear.fuse``); a quantized
    base is re-quantized with its own bits / group size unless ``dequantize``."""
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in lora_layers(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model
