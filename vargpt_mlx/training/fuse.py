"""Merge LoRA adapters into the base weights and write a standalone MLX model directory.

The output is what ``vargpt-mlx convert`` writes: ``config.json`` (the source config plus
``"format": "mlx"``, the Infinity / VAE sizes from ``VARGPTConfig.arch_dict()`` and, for a
quantized model, its ``quantization`` block), safetensors with this package's parameter names
(``model.safetensors`` or shards + ``model.safetensors.index.json``) and the tokenizer /
processor files. It is written into a temporary directory beside the target and renamed into
place at the end, so an interrupted fuse never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import InputError
from ..files import check_output_dir, dir_mode
from ..loading import load_config, load_model, load_raw_weights
from ..tokenizer import TOKENIZER_FILES
from .lora import fuse_lora, load_adapters


def _source_dtype(path: Path) -> mx.Dtype:
    for k, v in load_raw_weights(path).items():  # lazy: nothing is read
        if mx.issubdtype(v.dtype, mx.floating) and not k.endswith((".scales", ".biases")):
            return v.dtype
    return mx.float32


def fuse_to_dir(model_path: str | Path, adapter_path: str | Path, out_dir: str | Path, *,
                de_quantize: bool = False, tokenizer_dir: str | Path | None = None, force: bool = False,
                dtype: mx.Dtype | None = None) -> Path:
    """Fuse ``adapter_path`` into the model at ``model_path`` and save it to ``out_dir``.

    ``dtype``: storage dtype of the float weights (default: the source's). A quantized source
    stays quantized (fused layers are re-quantized with their own bits / group size) unless
    ``de_quantize``, which writes every layer in float.
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    if out_dir.exists() and not force:
        raise InputError(f"{out_dir} already exists (pass --force to replace it)")
    if out_dir.resolve() in (model_path.resolve(), Path(adapter_path).resolve()):
        raise InputError("the output directory must differ from the model and adapter directories")
    check_output_dir(out_dir)  # its parent must exist (never created) and be writable
    config = load_config(model_path)
    raw_cfg = json.loads((model_path / "config.json").read_text())
    model = load_model(model_path, dtype=dtype or _source_dtype(model_path))
    load_adapters(model, adapter_path)
    fuse_lora(model, dequantize=de_quantize)
    if de_quantize:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
    quantized = any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters()))

    out_cfg = {k: v for k, v in raw_cfg.items() if k not in ("quantization", "quantization_config")}
    out_cfg.update(config.arch_dict())
    out_cfg["format"] = "mlx"
    if quantized:
        if "quantization" not in raw_cfg:
            raise ValueError("the fused model has quantized layers but the source config has no quantization block")
        out_cfg["quantization"] = raw_cfg["quantization"]
    out_cfg["fused_adapters"] = str(adapter_path)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp makes 0700; the model directory gets mkdir's mode
        from mlx_lm.utils import save_model

        save_model(tmp, model)
        (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2))
        tok_src = Path(tokenizer_dir) if tokenizer_dir else model_path
        for name in TOKENIZER_FILES:
            for src in (tok_src / name, model_path / name):
                if src.is_file():
                    shutil.copy2(src, tmp / name)
                    break
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename and str(e.filename).startswith(str(tmp)):  # name the user's directory, not the temporary one
            raise OSError(e.errno, e.strerror or str(e), str(out_dir)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
