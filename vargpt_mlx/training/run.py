"""Assemble a training run from files: validated data -> encoded samples -> cached targets ->
task; and the resume rules (what a resumed run may and may not change).

Typical use (what ``vargpt-mlx train sft`` does)::

    from vargpt_mlx import load
    from vargpt_mlx.training import run, lora, trainer
    records = run.validate_sft(path, processor)          # before loading the model
    pipe = load(model_dir, tokenizer=tok_dir)
    task = run.sft_task(pipe, records, val_records, text_loss="upstream")
    cfg = lora.apply_lora(pipe.model, lora.LoraConfig(rank=8, targets=("llm", "infinity")))
    trainer.train(pipe.model, task, trainer.TrainArgs(iters=100), "adapters", cfg)
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

from ..image_processor import ImageProcessor
from .data import (Batchable, Encoder, PreferenceRecord, SFTRecord, TargetCache, load_preference_records,
                   load_sft_records, prepare_targets)
from .dpo import DPOTask
from .lora import LoraConfig
from .sft import SFTTask
from .trainer import CHECKPOINT_FILE, CheckpointMismatch, TrainArgs, read_checkpoint

Progress = Callable[[int, int], None]

# TrainArgs fields a resumed run must keep (they shape the data order or the objective)
FIXED_ON_RESUME = ("batch_size", "grad_accum", "seed", "text_loss", "beta", "dpo_loss", "optimizer", "bit_flip")
LORA_FIELDS = ("rank", "scale", "dropout", "num_layers", "targets", "mlp")


def validate_sft(path: str | Path, processor: ImageProcessor | None = None) -> list[SFTRecord]:
    return load_sft_records(path, processor)


def validate_preferences(path: str | Path, processor: ImageProcessor | None = None) -> list[PreferenceRecord]:
    return load_preference_records(path, processor)


def _encoder(pipe, pn: str | None, gen_aspect) -> Encoder:
    return Encoder(pipe.tokenizer, pipe.config.tokens, pipe.processor, pn or pipe.config.pn, gen_aspect)


def _dtype(pipe):
    from .data import param_dtype

    return param_dtype(pipe.model.model)


def sft_items(pipe, records: list[SFTRecord], cache: TargetCache, pn: str | None = None, gen_aspect=None,
              on_progress: Progress | None = None) -> list[Batchable]:
    enc = _encoder(pipe, pn, gen_aspect)
    samples = [enc.encode_sft(r) for r in records]
    targets = prepare_targets(pipe.model, samples, cache, on_progress)
    return [Batchable(s, t) for s, t in zip(samples, targets)]


def pair_items(pipe, records: list[PreferenceRecord], cache: TargetCache, pn: str | None = None, gen_aspect=None,
               on_progress: Progress | None = None) -> list[tuple[Batchable, Batchable]]:
    enc = _encoder(pipe, pn, gen_aspect)
    flat = [s for r in records for s in enc.encode_pair(r)]
    targets = prepare_targets(pipe.model, flat, cache, on_progress)
    items = [Batchable(s, t) for s, t in zip(flat, targets)]
    return [(items[2 * i], items[2 * i + 1]) for i in range(len(records))]


def sft_task(pipe, records, val_records=None, *, text_loss: str = "upstream", pn: str | None = None,
             gen_aspect=None, on_progress: Progress | None = None, bit_flip: float = 0.0, seed: int = 0) -> SFTTask:
    cache = TargetCache()
    train = sft_items(pipe, records, cache, pn, gen_aspect, on_progress)
    val = sft_items(pipe, val_records, cache, pn, gen_aspect) if val_records else []
    return SFTTask(pipe.processor, train, val, text_loss, _dtype(pipe), bit_flip=bit_flip, seed=seed)


def dpo_task(pipe, records, val_records=None, *, beta: float = 0.1, loss_type: str = "sigmoid",
             pn: str | None = None, gen_aspect=None, on_progress: Progress | None = None,
             split_backward: bool = False) -> DPOTask:
    cache = TargetCache()
    pairs = pair_items(pipe, records, cache, pn, gen_aspect, on_progress)
    val = pair_items(pipe, val_records, cache, pn, gen_aspect) if val_records else []
    return DPOTask(pipe.processor, pairs, val, beta, loss_type, _dtype(pipe), split_backward=split_backward)


def has_checkpoint(adapter_dir: str | Path) -> bool:
    return (Path(adapter_dir) / CHECKPOINT_FILE).is_file()


def resume_settings(adapter_dir: str | Path, kind: str, args: TrainArgs, lora: LoraConfig,
                    explicit: set[str]) -> tuple[TrainArgs, LoraConfig, int]:
    """Settings for resuming the run saved in ``adapter_dir``.

    The LoRA layout and the fields in ``FIXED_ON_RESUME`` come from the checkpoint; passing a
    different value explicitly (``explicit`` names the options the user set) is an error. The
    rest (iters, learning rate, save / eval cadence, gradient checkpointing) follow ``args``.
    Returns ``(args, lora, step)``.
    """
    state, _, _ = read_checkpoint(adapter_dir)
    if state.get("kind", kind) != kind:
        raise CheckpointMismatch(f"{adapter_dir} holds a '{state.get('kind')}' run; cannot resume it as '{kind}'")
    saved_lora = LoraConfig.from_json(state["lora"])
    saved_args = state["args"]
    for f in LORA_FIELDS:
        mine, theirs = getattr(lora, f), getattr(saved_lora, f)
        if f in explicit and (tuple(mine) if isinstance(mine, (list, tuple)) else mine) != \
                (tuple(theirs) if isinstance(theirs, (list, tuple)) else theirs):
            raise CheckpointMismatch(f"the checkpoint was trained with {f}={theirs!r}; a resumed run cannot change it")
    merged = asdict(args)
    for f in FIXED_ON_RESUME:
        if f in saved_args:
            if f in explicit and merged[f] != saved_args[f]:
                raise CheckpointMismatch(
                    f"the checkpoint was trained with {f}={saved_args[f]!r}; a resumed run cannot change it")
            merged[f] = saved_args[f]
    names = {f.name for f in fields(TrainArgs)}
    return TrainArgs(**{k: v for k, v in merged.items() if k in names}), saved_lora, int(state["step"])
