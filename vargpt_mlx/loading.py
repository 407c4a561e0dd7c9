"""Load an upstream VARGPT-v1.1 checkpoint directory (or a converted MLX one) into ``VARGPT``.

* Reads ``config.json`` plus ``model.safetensors`` or sharded ``model-0000x-of-0000y.safetensors``
  with ``model.safetensors.index.json``; float32 or bfloat16 as stored.
* Refuses pickle checkpoints (``.bin`` / ``.pth``): they are never unpickled.
* Every key is either consumed, or knowingly dropped by ``models.vargpt.sanitize``; a missing,
  unexpected or mis-shaped key is a ``CheckpointError`` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ConfigError, VARGPTConfig
from .models import quantized
from .models.vargpt import VARGPT, sanitize, sos_row
from .errors import InputError

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded (missing files, keys or shapes)."""


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in shard order."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is malformed: {e}") from None
        files = sorted({path / f for f in wmap.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard listed in the index is missing: {missing[0]}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(path.glob("model-*-of-*.safetensors")) or sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle weights ({pickles[0]}); pickle files are never loaded "
            "(they can run arbitrary code). Use the safetensors release of the checkpoint."
        )
    raise CheckpointError(f"{path} has no model.safetensors or safetensors shards")


def load_raw_weights(path: str | Path) -> dict[str, mx.array]:
    """All tensors of a checkpoint directory, keys as stored (memory-mapped, lazily read)."""
    path = Path(path)
    weights: dict[str, mx.array] = {}
    for f in weight_files(path):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx raises RuntimeError/ValueError on truncated or bad files
            raise CheckpointError(f"cannot read {f.name}: {str(e).splitlines()[0]}") from None
    return weights


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Raise ``CheckpointError`` naming the first missing, unexpected or mis-shaped key."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint is missing key {missing[0]}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"checkpoint has unexpected key {unexpected[0]}{more}")
    for k, v in expected.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"key {k} has shape {tuple(weights[k].shape)}, the configuration expects {tuple(v.shape)}"
            )


def cast_floats(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    if dtype is None:
        return weights
    return {k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}


def default_dtype() -> mx.Dtype:
    """float32 on the CPU backend (bf16 matmul is slow there); bfloat16 on Metal."""
    return mx.bfloat16 if mx.default_device() == mx.gpu and mx.metal.is_available() else mx.float32


def load_config(path: str | Path) -> VARGPTConfig:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is not a directory")
    try:
        return VARGPTConfig.from_dir(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_model(path: str | Path, dtype: mx.Dtype | None = None) -> VARGPT:
    """Build ``VARGPT`` from a checkpoint directory and load its weights.

    ``dtype``: compute dtype for floating weights (default: ``default_dtype()``).
    Converted MLX directories (``"format": "mlx"`` in config.json) are already in this model's
    key layout and may be quantized (``"quantization": {"bits", "group_size"}``).
    """
    path = Path(path)
    config = load_config(path)
    raw_cfg = json.loads((path / "config.json").read_text())
    model = VARGPT(config)
    weights = load_raw_weights(path)
    if raw_cfg.get("format") == "mlx":
        if q := raw_cfg.get("quantization"):
            nn.quantize(model, group_size=q["group_size"], bits=q["bits"],
                        class_predicate=lambda p, m: f"{p}.scales" in weights)
            quantized.use_cpu_path(model)
    else:
        weights, _ = sanitize(weights)
    weights = sos_row(weights, config)
    check_weights(model, weights)
    weights = cast_floats(weights, dtype or default_dtype())
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return model
