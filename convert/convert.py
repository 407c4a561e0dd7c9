"""Convert an upstream VARGPT-v1.1 checkpoint into an MLX model directory, optionally quantized.

The output follows mlx-lm's conventions:

* ``config.json``: upstream's config plus ``"format": "mlx"``, the architecture sizes upstream
  hard-codes (``infinity``, ``vae``, ``pn``; see ``VARGPTConfig.arch_dict``) and, when quantized,
  ``"quantization": {"group_size", "bits", "mode"}`` (copied to ``quantization_config`` as
  mlx-lm does). Which layers are quantized is recorded by the tensors themselves: a layer is
  quantized iff ``<layer>.scales`` is stored (mlx-lm's loading predicate).
* ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards of bounded size, always
  with ``model.safetensors.index.json``. Keys are this port's parameter names (after
  ``models.vargpt.sanitize``: conv weights in MLX layout, dead weights dropped).
* the tokenizer / processor / chat-template / generation-config files
  (``vargpt_mlx.tokenizer.TOKENIZER_FILES``), from the source or from a separate directory.

Conversion streams: ``mx.load`` reads tensors lazily, every output tensor is a lazy expression of
its source tensor (sanitize, cast, quantize), and the writer evaluates one layer at a time, writes
one output shard at a time and frees it. Peak memory is about one output shard (``shard_bytes``,
5 GiB by default) plus one tensor. Everything is validated before anything is written (config,
weight files, every key name and shape against the model built from the config, the tokenizer's
special-token ids), and the directory appears atomically: it is written under a hidden temporary
name beside ``out_dir`` and renamed at the end, so an interrupted run leaves nothing loadable;
leftovers of a killed run are removed by the next run into the same ``out_dir``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vargpt_mlx.config import VARGPTConfig
from vargpt_mlx.hub import resolve_model_path
from vargpt_mlx.loading import CheckpointError, check_weights, load_config, load_raw_weights, weight_files
from vargpt_mlx.models.vargpt import VARGPT, sanitize, sos_row
from vargpt_mlx.tokenizer import TOKENIZER_FILES, TokenizerError, check_token_ids, load_tokenizer
from vargpt_mlx.files import check_output_dir as check_output_dir_writable

from .options import (DEFAULT_SHARD_BYTES, DTYPE_NAMES, Q_BITS, Q_GROUP_SIZES, ConvertError, check_dtype,  # noqa: F401
                      check_quant, parse_size)


DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32,
          "fp16": mx.float16, "bf16": mx.bfloat16, "fp32": mx.float32}
assert set(DTYPES) == set(DTYPE_NAMES)
MODEL_SIDE_FILES = ("preprocessor_config.json", "generation_config.json")  # of TOKENIZER_FILES

# Layers quantized by default: the matmuls of the LLM decoder, the vision tower and the Infinity
# blocks (9.35 B of the real model's 9.97 B linear weights). Kept in float by default, from the
# drift measured on the fixture (README): lm_head and embed_tokens (545 M weights each), because
# 4-bit on either one alone moves the top-1 tokens about as much as 4-bit on all decoder layers;
# the two LLM <-> Infinity projectors and Infinity's shared_ada_lin / head_nm / head /
# text_proj_for_sos / word_embed (78 M weights), because each of these groups alone moves the bit
# choices about as much as all Infinity blocks. ``scope="all"`` (``--quantize-all``) quantizes
# them too (every Linear whose input width the group size divides, plus embed_tokens).
DEFAULT_QUANT_PREFIXES = ("model.layers.", "visual.blocks.", "visual.merger.", "vargpt_gen.block_chunks.")
# Embeddings read row-wise through ``.weight[...]`` (not via ``__call__``): never quantized.
NEVER_QUANTIZE = ("sos_embedding", "vargpt_gen.lvl_embed")


# ---------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class QuantSpec:
    """MLX affine quantization settings (mlx-lm conventions)."""

    bits: int = 4
    group_size: int = 64
    scope: str = "default"  # "default": see DEFAULT_QUANT_PREFIXES; "all": every eligible layer

    def __post_init__(self):
        check_quant(self.bits, self.group_size, self.scope)

    def config_block(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}


def parse_dtype(name: str | None) -> mx.Dtype | None:
    if name is None:
        return None
    check_dtype(name)
    return DTYPES[name.lower()]


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def should_quantize(path: str, module: nn.Module, spec: QuantSpec) -> bool:
    """Whether the layer at ``path`` is quantized under ``spec`` (Linear / Embedding only, input
    width divisible by the group size)."""
    if not isinstance(module, (nn.Linear, nn.Embedding)) or path in NEVER_QUANTIZE:
        return False
    if module.weight.ndim != 2 or module.weight.shape[-1] % spec.group_size:
        return False
    if isinstance(module, nn.Embedding):
        return spec.scope == "all" and path == "model.embed_tokens"
    return spec.scope == "all" or path.startswith(DEFAULT_QUANT_PREFIXES)


# ---------------------------------------------------------------------------------- planning
@dataclass
class ConversionPlan:
    """A validated conversion: lazy output tensors grouped into shards, nothing evaluated yet."""

    source: Path
    source_format: str  # "upstream" or "mlx"
    config: VARGPTConfig
    out_config: dict
    outputs: dict[str, mx.array]  # lazy
    shards: list[list[list[str]]]  # shard -> units (a layer's weight/scales/biases stay together)
    quantized: list[str]  # layer paths
    dropped: list[str]  # upstream keys knowingly discarded
    copy_files: dict[str, Path]  # output file name -> source file
    dtype: mx.Dtype | None
    quant: QuantSpec | None
    source_bytes: int
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(v.nbytes for v in self.outputs.values())

    @property
    def n_tensors(self) -> int:
        return len(self.outputs)

    def shard_names(self) -> list[str]:
        n = len(self.shards)
        return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _units(keys: list[str], quantized: set[str]) -> list[list[str]]:
    """Output keys in source order, each quantized layer's weight/scales/biases as one unit."""
    units = []
    for k in keys:
        layer, _, leaf = k.rpartition(".")
        if layer in quantized:
            if leaf == "weight":
                units.append([k, f"{layer}.scales", f"{layer}.biases"])
            elif leaf not in ("scales", "biases"):
                units.append([k])
        else:
            units.append([k])
    return units


def _make_shards(units: list[list[str]], outputs: dict[str, mx.array], limit: int) -> list[list[list[str]]]:
    """mlx-lm ``make_shards`` over units: start a new shard when the next unit would overflow."""
    shards: list[list[list[str]]] = []
    size = 0
    for u in units:
        n = sum(outputs[k].nbytes for k in u)
        if not shards or (size + n > limit and size > 0):
            shards.append([])
            size = 0
        shards[-1].append(u)
        size += n
    return shards


def build_outputs(config: VARGPTConfig, weights: dict[str, mx.array], *, dtype: mx.Dtype | None = None,
                  quant: QuantSpec | None = None) -> tuple[dict[str, mx.array], list[str]]:
    """Lazy output tensors from weights in this port's names (already sanitized).

    Runs the strict key check (names and shapes against ``VARGPT(config)``, built lazily), casts
    floating tensors to ``dtype`` and quantizes the chosen layers; checks that the result loads
    into the correspondingly quantized model. Returns ``(outputs, quantized_layer_paths)``.
    """
    model = VARGPT(config)  # parameters stay unevaluated: no memory is used for them
    check_weights(model, weights)
    out = {k: (v.astype(dtype) if dtype is not None and mx.issubdtype(v.dtype, mx.floating) else v)
           for k, v in weights.items()}
    quantized: list[str] = []
    if quant is not None:
        for path, module in model.named_modules():
            if should_quantize(path, module, quant):
                w = out[f"{path}.weight"]
                wq, scales, biases = mx.quantize(w, group_size=quant.group_size, bits=quant.bits)
                out[f"{path}.weight"], out[f"{path}.scales"], out[f"{path}.biases"] = wq, scales, biases
                quantized.append(path)
        qset = set(quantized)
        nn.quantize(model, group_size=quant.group_size, bits=quant.bits, class_predicate=lambda p, m: p in qset)
        check_weights(model, out)  # the quantized layout loads back (loading.py's predicate)
    return out, sorted(quantized)


def _source_format(raw_cfg: dict) -> str:
    return "mlx" if raw_cfg.get("format") == "mlx" else "upstream"


def _read_config(path: Path) -> tuple[VARGPTConfig, dict]:
    config = load_config(path)  # "not a VARGPT checkpoint" etc. as CheckpointError
    return config, json.loads((path / "config.json").read_text())


class _FastTokenizerIds:
    """``convert_tokens_to_ids`` over a bare ``tokenizers.Tokenizer`` (enough for ``check_token_ids``;
    avoids building a transformers tokenizer, which also reads the model's config.json)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def convert_tokens_to_ids(self, token: str):
        return self._tok.token_to_id(token)


def _check_tokenizer(files: dict[str, Path], config: VARGPTConfig) -> None:
    """The tokenizer that will be copied must give the special tokens the config's ids."""
    where = (files.get("tokenizer.json") or files["vocab.json"]).parent
    try:
        if "tokenizer.json" in files:
            tok = _FastTokenizerIds(files["tokenizer.json"])
        else:
            tok = load_tokenizer(where)
        check_token_ids(tok, config)
    except TokenizerError as e:
        raise ConvertError(f"{where}: {e}") from None
    except Exception as e:  # a malformed tokenizer file: one line, not a traceback
        raise ConvertError(f"cannot load the tokenizer from {where}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _tokenizer_files(source: Path, tokenizer: Path | None, config: VARGPTConfig,
                     warnings: list[str]) -> dict[str, Path]:
    files = {f: source / f for f in TOKENIZER_FILES if (source / f).is_file()}
    if tokenizer is not None:
        tokenizer = Path(tokenizer).expanduser()
        if not tokenizer.is_dir():
            raise ConvertError(f"tokenizer directory {tokenizer} does not exist")
        extra = {f: tokenizer / f for f in TOKENIZER_FILES if (tokenizer / f).is_file()}
        if "tokenizer.json" not in extra and "vocab.json" not in extra:
            raise ConvertError(f"{tokenizer} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
        # the tokenizer proper comes wholly from there; the source's processor / generation
        # configs stay unless that directory has its own
        files = {f: p for f, p in files.items() if f in MODEL_SIDE_FILES}
        files.update(extra)
    if "tokenizer.json" in files or "vocab.json" in files:
        _check_tokenizer(files, config)
    else:
        warnings.append(f"{source} has no tokenizer files: the converted directory will need a separate "
                        "tokenizer (--tokenizer here, or load(..., tokenizer=DIR))")
    return files


def plan_conversion(source: str | Path, *, dtype: mx.Dtype | str | None = None, quant: QuantSpec | None = None,
                    tokenizer: str | Path | None = None, shard_bytes: int | str = DEFAULT_SHARD_BYTES,
                    expect: str = "upstream") -> ConversionPlan:
    """Validate ``source`` and prepare (lazily) everything ``write_conversion`` writes.

    ``expect``: ``"upstream"`` (``convert``: an upstream checkpoint directory or repo id) or
    ``"mlx"`` (``quantize``: a float directory written by ``convert``).
    """
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    shard_bytes = parse_size(shard_bytes)
    path = resolve_model_path(source)
    config, raw_cfg = _read_config(path)
    fmt = _source_format(raw_cfg)
    if expect == "upstream" and fmt == "mlx":
        raise ConvertError(f"{path} is already a converted MLX directory; load it directly, or use "
                           "`vargpt-mlx quantize` to quantize it")
    if expect == "mlx" and fmt != "mlx":
        raise ConvertError(f"{path} is an upstream checkpoint, not a converted MLX directory; use "
                           "`vargpt-mlx convert -q` to convert and quantize it in one step")
    if fmt == "mlx" and raw_cfg.get("quantization"):
        q = raw_cfg["quantization"]
        raise ConvertError(f"{path} is already quantized ({q.get('bits')}-bit, group {q.get('group_size')}); "
                           "quantize from the float conversion instead")
    if expect == "mlx" and quant is None:
        raise ConvertError("quantize needs quantization settings (--q-bits / --q-group-size)")

    files = weight_files(path)  # refuses pickle-only directories
    raw = load_raw_weights(path)  # lazy
    if fmt == "upstream":
        weights, dropped = sanitize(raw)
    else:
        weights, dropped = raw, []
    weights = sos_row(weights, config)
    del raw
    outputs, quantized = build_outputs(config, weights, dtype=dtype, quant=quant)
    del weights

    warnings: list[str] = []
    copy_files = _tokenizer_files(path, Path(tokenizer) if tokenizer else None, config, warnings)

    out_cfg = {k: v for k, v in raw_cfg.items() if k not in ("quantization", "quantization_config")}
    out_cfg.update(config.arch_dict())
    out_cfg["format"] = "mlx"
    floats = {v.dtype for v in outputs.values() if mx.issubdtype(v.dtype, mx.floating)}
    stored = dtype if dtype is not None else (floats.pop() if len(floats) == 1 else None)
    if stored is not None:
        out_cfg["torch_dtype"] = dtype_name(stored)
    if quant is not None:
        out_cfg["quantization"] = quant.config_block()
        out_cfg["quantization_config"] = quant.config_block()

    units = _units(list(outputs), set(quantized))
    return ConversionPlan(
        source=path, source_format=fmt, config=config, out_config=out_cfg, outputs=outputs,
        shards=_make_shards(units, outputs, shard_bytes), quantized=quantized, dropped=dropped,
        copy_files=copy_files, dtype=dtype, quant=quant,
        source_bytes=sum(f.stat().st_size for f in files), warnings=warnings,
    )


# ---------------------------------------------------------------------------------- writing
@dataclass
class ConversionResult:
    out_dir: Path
    n_tensors: int
    total_bytes: int
    shards: list[str]
    quantized: list[str]
    copied: list[str]
    warnings: list[str]


_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)-[^/]*$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove the hidden staging directories a killed conversion into ``out_dir`` left behind
    (``.NAME.partial-PID-*`` / ``.NAME.old-PID-*`` whose process is gone)."""
    removed = []
    parent = out_dir.parent
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _STAGING.match(p.name)
        if m and m.group("name") == out_dir.name and p.is_dir() and not _pid_alive(int(m.group("pid"))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _replaceable(out_dir: Path) -> bool:
    """Only an empty directory or an earlier conversion may be replaced (``--force``)."""
    if not out_dir.is_dir():
        return False
    if not any(out_dir.iterdir()):
        return True
    try:
        return json.loads((out_dir / "config.json").read_text()).get("format") == "mlx"
    except (OSError, ValueError):
        return False


def local_source(source: str | Path) -> Path | None:
    """``source`` as a path when it is an existing local directory (not a repo id)."""
    p = Path(source).expanduser()
    return p if p.exists() else None


def check_output_dir(out_dir: str | Path, force: bool = False, source: Path | None = None) -> Path:
    """Refuse an output directory that exists (unless ``force`` and it is replaceable) or that
    would overwrite the source. Returns the absolute path."""
    out = Path(out_dir).expanduser().absolute()
    if source is not None:
        src = Path(source).expanduser().resolve()
        o = out.resolve()
        if o == src or o in src.parents:
            raise ConvertError(f"output directory {out} would overwrite the source {source}")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConvertError(f"{out} exists and is not a directory")
        if not force:
            raise ConvertError(f"{out} already exists; pass --force to replace it")
        if not _replaceable(out):
            raise ConvertError(f"{out} exists and is not a converted VARGPT directory; refusing to "
                               "replace it (choose another output directory)")
    check_output_dir_writable(out_dir, "output directory")  # the parent must exist: it is never created
    return out


def _hidden_dir(out: Path, kind: str) -> Path:
    """A new hidden directory ``.NAME.KIND-PID-RANDOM`` beside ``out`` (permissions from the umask,
    unlike ``tempfile.mkdtemp``'s 0700, since it becomes the output directory)."""
    while True:
        p = out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            p.mkdir()
            return p
        except FileExistsError:  # pragma: no cover
            continue


@contextmanager
def _staging(out: Path, force: bool) -> Iterator[Path]:
    """A hidden temporary directory beside ``out``, renamed to ``out`` on success, removed on error."""
    try:
        tmp = _hidden_dir(out, "partial")
    except OSError as e:  # name the user's directory, not the hidden one
        raise OSError(e.errno, e.strerror or str(e), str(out)) from None
    try:
        yield tmp
        check_output_dir(out, force)
        if out.exists():
            old = _hidden_dir(out, "old")
            os.rename(out, old / "d")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename and str(e.filename).startswith(str(tmp)):  # name the user's directory
            raise OSError(e.errno, e.strerror or str(e), str(out)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_conversion(plan: ConversionPlan, out_dir: str | Path, *, force: bool = False,
                     on_tensor: Callable[[str, int], None] | None = None) -> ConversionResult:
    """Evaluate and write ``plan`` into ``out_dir`` (atomically; see the module docstring).

    ``on_tensor(name, nbytes)`` is called after each output tensor is computed (progress).
    The plan's lazy tensors are consumed: a plan is written once.
    """
    out = check_output_dir(out_dir, force, plan.source)
    clean_stale(out)
    outputs = plan.outputs
    names = plan.shard_names()
    check_f16 = plan.dtype is not None and plan.dtype == mx.float16
    weight_map: dict[str, str] = {}
    total = 0
    with _staging(out, force) as tmp:
        for i, (shard_units, name) in enumerate(zip(plan.shards, names)):
            shard: dict[str, mx.array] = {}
            for unit in shard_units:
                arrays = [outputs.pop(k) for k in unit]
                try:
                    mx.eval(*arrays)
                except (RuntimeError, OSError, ValueError) as e:  # e.g. a source file changed meanwhile
                    raise CheckpointError(f"cannot read or convert tensor {unit[0]} from {plan.source}: "
                                          f"{str(e).splitlines()[0]}") from None
                if check_f16 and any(mx.isinf(a).any().item() for a in arrays if a.dtype == mx.float16):
                    raise ConvertError(f"{unit[0]} has values beyond the float16 range; use --dtype bfloat16")
                for k, v in zip(unit, arrays):
                    shard[k] = v
                    weight_map[k] = name
                    total += v.nbytes
                    if on_tensor is not None:
                        on_tensor(k, v.nbytes)
                del arrays
            mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
            plan.shards[i] = []
            del shard
            mx.clear_cache()
        _write_json(tmp / "model.safetensors.index.json",
                    {"metadata": {"total_size": total, "format": "mlx"},
                     "weight_map": dict(sorted(weight_map.items()))})
        for fname, src in plan.copy_files.items():
            shutil.copyfile(src, tmp / fname)
        _write_json(tmp / "config.json", plan.out_config)
    return ConversionResult(out_dir=out, n_tensors=len(weight_map), total_bytes=total, shards=names,
                            quantized=plan.quantized, copied=sorted(plan.copy_files), warnings=plan.warnings)


# ---------------------------------------------------------------------------------- one call
def convert_checkpoint(source: str | Path, out_dir: str | Path, *, dtype: mx.Dtype | str | None = None,
                       quant: QuantSpec | None = None, tokenizer: str | Path | None = None,
                       shard_bytes: int | str = DEFAULT_SHARD_BYTES, force: bool = False,
                       on_tensor: Callable[[str, int], None] | None = None) -> ConversionResult:
    """Convert an upstream checkpoint (local directory or Hugging Face repo id) to an MLX directory.

    ``dtype``: stored float dtype (default: as stored in the source, bfloat16 for the release).
    ``quant``: quantize (``QuantSpec(bits, group_size, scope)``); ``None`` keeps floats.
    ``tokenizer``: a directory to take the tokenizer files from (default: the source's).
    ``force``: replace ``out_dir`` if it holds an earlier conversion (otherwise an existing
    ``out_dir`` is an error).
    """
    check_output_dir(out_dir, force, local_source(source))  # before any download
    plan = plan_conversion(source, dtype=dtype, quant=quant, tokenizer=tokenizer, shard_bytes=shard_bytes)
    return write_conversion(plan, out_dir, force=force, on_tensor=on_tensor)


def quantize_checkpoint(source: str | Path, out_dir: str | Path, *, quant: QuantSpec,
                        dtype: mx.Dtype | str | None = None, tokenizer: str | Path | None = None,
                        shard_bytes: int | str = DEFAULT_SHARD_BYTES, force: bool = False,
                        on_tensor: Callable[[str, int], None] | None = None) -> ConversionResult:
    """Quantize a float MLX directory written by ``convert_checkpoint`` into ``out_dir``."""
    check_output_dir(out_dir, force, local_source(source))
    plan = plan_conversion(source, dtype=dtype, quant=quant, tokenizer=tokenizer, shard_bytes=shard_bytes,
                           expect="mlx")
    return write_conversion(plan, out_dir, force=force, on_tensor=on_tensor)


# ---------------------------------------------------------------------------------- drift
def _bit_choice(bit_logits: np.ndarray) -> np.ndarray:
    """Bit j = 1 where its logit for 1 (column 2j+1) beats the logit for 0 (column 2j)."""
    return bit_logits[..., 1::2] > bit_logits[..., 0::2]


def model_outputs(model: VARGPT, refs: dict[str, np.ndarray], schedule: list[tuple[int, int]],
                  cfg: float = 3.0, tau: float = 0.5) -> dict[str, np.ndarray]:
    """The outputs quantization drift is measured on, for the inputs of a refs bundle:
    ``txt`` logits (text prompt, plain positions), ``und`` logits (image + text, M-RoPE) and the
    CFG bit logits of image generation teacher-forced with the reference bits (all scales)."""
    from vargpt_mlx.models.rope_index import plain_position_ids
    from vargpt_mlx.models.vargpt import embed_multimodal
    from vargpt_mlx.pipelines.image_generation import GenerationSettings, draw_images, prefill_prompt

    out = {}
    ids = refs["txt.input_ids"]
    emb = model.model.embed_tokens(mx.array(ids))
    out["txt"] = model.lm_head(model.model(emb, mx.array(plain_position_ids(1, ids.shape[1]))))[0]
    ids, grid = refs["und.input_ids"], refs["und.image_grid_thw"]
    dt = model.model.norm.weight.dtype
    emb = embed_multimodal(model, mx.array(ids), mx.array(refs["und.pixel_values"]).astype(dt), grid)
    pos, _ = model.rope_index(ids, grid)
    out["und"] = model.lm_head(model.model(emb, mx.array(pos)))[0]
    teacher = [mx.array(refs[f"gen.s{k}.bits"]) for k in range(len(schedule))]
    (res,) = draw_images(model, *prefill_prompt(model, refs["gen.prompt_ids"]),
                         GenerationSettings(cfg=cfg, tau=tau, argmax=True), teacher_bits=teacher,
                         schedule=schedule, trace=True)
    out["bits"] = mx.concatenate([r.bit_logits_cfg.reshape(-1, r.bit_logits_cfg.shape[-1]) for r in res.trace.scales])
    return {k: np.array(v.astype(mx.float32)) for k, v in out.items()}


def measure_drift(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """Drift of ``outputs`` from ``reference`` (both from ``model_outputs``):

    * ``{txt,und}_max_err``: max |logit difference|; ``_rel_err``: that over max |reference logit|;
    * ``{txt,und}_top1``: fraction of positions whose argmax token agrees;
    * ``bits_agree``: fraction of generated bits (all scales) whose choice (argmax of the CFG bit
      logits) agrees; ``bits_max_err`` / ``bits_rel_err``: CFG bit-logit error.
    """
    d = {}
    for k in ("txt", "und"):
        a, b = reference[k], outputs[k]
        err = float(np.abs(a - b).max())
        d[f"{k}_max_err"] = err
        d[f"{k}_rel_err"] = err / float(np.abs(a).max())
        d[f"{k}_top1"] = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    a, b = reference["bits"], outputs["bits"]
    d["bits_agree"] = float(np.mean(_bit_choice(a) == _bit_choice(b)))
    d["bits_max_err"] = float(np.abs(a - b).max())
    d["bits_rel_err"] = d["bits_max_err"] / float(np.abs(a).max())
    return d
