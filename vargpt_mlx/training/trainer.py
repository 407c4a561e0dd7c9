"""The LoRA training loop (SFT and DPO): batches, gradient accumulation, evaluation,
atomic resumable checkpoints, divergence guard, progress callbacks (``TrainingCallback``).

Checkpoint layout in the adapter directory:

* ``checkpoint.safetensors``: adapter weights (``adapter.*``), optimizer state (``optimizer.*``)
  and, in its metadata, the step, seed, LoRA config and training arguments. It is the one file a
  resume reads, written atomically (temp file + ``os.replace``), so a run killed at any moment
  resumes from its last save and loses at most ``save_every`` steps.
* ``adapters.safetensors`` + ``adapter_config.json``: the adapters for inference
  (``--adapter-path``), rewritten atomically after every checkpoint.

Determinism: the samples of step s are a function of (seed, s) alone (an epoch-wise permutation
seeded by (seed, epoch)), LoRA ``lora_a`` is initialised from ``seed``, and when LoRA dropout is on
MLX's generator is reseeded with (seed, step) before each step; so a resumed run computes the same
updates as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..models import activations
from .callbacks import StepInfo, TrainingCallback
from .lora import LoraConfig, save_adapters, save_safetensors_atomic, trained_weights

CHECKPOINT_FILE = "checkpoint.safetensors"


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN / inf; the last good checkpoint is kept."""


class CheckpointMismatch(ValueError):
    """A resume whose checkpoint does not fit the requested run."""


@dataclass
class TrainArgs:
    iters: int = 100  # optimizer updates
    batch_size: int = 1  # samples (SFT) or pairs (DPO) per micro-batch
    grad_accum: int = 1  # micro-batches per update
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"  # constant | cosine (linear warmup, cosine decay to 5 %)
    warmup: int = 0  # updates of linear warmup (cosine schedule)
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.01  # adamw only
    save_every: int = 100
    steps_per_eval: int = 200
    val_batches: int = -1  # -1: the whole validation set
    seed: int = 0
    grad_checkpoint: bool = False
    text_loss: str = "upstream"  # SFT: upstream | assistant
    bit_flip: float = 0.0  # SFT: bitwise self-correction strength (upstream trains with 0.3)
    beta: float = 0.1  # DPO
    dpo_loss: str = "sigmoid"  # DPO: sigmoid | ipo


class Task(Protocol):
    """What the loop trains: ``n_train`` items, a differentiable batch loss, an evaluation."""

    n_train: int
    n_val: int

    def begin_step(self, step: int) -> None: ...  # before each update (per-step randomness)

    def batch_loss(self, model, idxs: list[int]) -> tuple[mx.array, dict[str, mx.array]]: ...

    def num_tokens(self, idxs: list[int]) -> int: ...

    def evaluate(self, model, limit: int) -> dict[str, float]: ...


@runtime_checkable
class GradientTask(Task, Protocol):
    """A task that computes its own loss and gradient (DPO with ``--grad-checkpoint``: one
    response's graph in memory at a time); others get ``nn.value_and_grad`` of ``batch_loss``."""

    def loss_and_grad(self, model, idxs: list[int]) -> tuple[tuple[mx.array, dict[str, mx.array]], dict]: ...


# -------------------------------------------------------------------------- batching
def sample_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(seed: int, n: int, step: int, micro: int, batch_size: int, accum: int) -> list[int]:
    """Items of micro-batch ``micro`` of update ``step``: consecutive slots of the per-epoch
    permutations, a pure function of its arguments (resumable without RNG state)."""
    start = (step * accum + micro) * batch_size
    out = []
    for p in range(start, start + batch_size):
        epoch, i = divmod(p, n)
        out.append(int(sample_order(seed, epoch, n)[i]))
    return out


# -------------------------------------------------------------------------- checkpointing
def _split_args(obj, arrays: list):
    """Separate the float arrays of a call's arguments (checkpoint inputs) from the rest."""
    if isinstance(obj, mx.array):
        if mx.issubdtype(obj.dtype, mx.floating):
            arrays.append(obj)
            return ("a", len(arrays) - 1)
        return ("c", obj)
    if isinstance(obj, (tuple, list)):
        return ("s", type(obj), [_split_args(o, arrays) for o in obj])
    if isinstance(obj, dict):
        return ("d", {k: _split_args(v, arrays) for k, v in obj.items()})
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return ("D", type(obj), {f.name: _split_args(getattr(obj, f.name), arrays) for f in dataclasses.fields(obj)})
    return ("c", obj)


def _join_args(spec, arrays):
    kind = spec[0]
    if kind == "a":
        return arrays[spec[1]]
    if kind == "s":
        return spec[1](_join_args(s, arrays) for s in spec[2])
    if kind == "d":
        return {k: _join_args(v, arrays) for k, v in spec[1].items()}
    if kind == "D":
        return spec[1](**{k: _join_args(v, arrays) for k, v in spec[2].items()})
    return spec[1]


def _chunked(q: mx.array, k: mx.array, v: mx.array, scale: float, mask, chunk: int) -> mx.array:
    """Attention over query chunks, each recomputed in the backward pass (``mx.checkpoint``): the
    (heads x L x L) score / probability tensors of a long sequence never exist at once.

    ``mask``: ``"causal"`` (chunk rows attend to keys up to their own position) or an additive /
    boolean array broadcastable to (B, heads, L, L) (sliced per chunk)."""
    L = q.shape[2]

    def attend(qc, kc, vc, *m):
        return activations.sdpa(qc, kc, vc, scale=scale, mask=m[0] if m else "causal")

    attend = mx.checkpoint(attend)
    outs = []
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        if isinstance(mask, str):  # causal: keys 0..e-1, bottom-right aligned
            outs.append(attend(q[:, :, s:e], k[:, :, :e], v[:, :, :e]))
        else:
            outs.append(attend(q[:, :, s:e], k, v, mask[..., s:e, :]))
    return mx.concatenate(outs, axis=2)


def chunked_sdpa(base: Callable, chunk: int) -> Callable:
    """An attention module's ``sdpa`` step that computes long uncached (training) attention in
    recomputed query chunks (``_chunked``); cached and short calls take ``base``."""

    def sdpa(q, k, v, *, scale: float, mask=None, cache=None):
        if cache is not None or q.shape[2] <= chunk or mask is None:
            return base(q, k, v, cache=cache, scale=scale, mask=mask)
        return _chunked(q, k, v, scale, mask, chunk)

    return sdpa


def _bind(fn, base, chunk: int):
    def call(self, *args, **kwargs):
        return fn(self, *args, _base=base, _chunk=chunk, **kwargs)
    return call


def _swap_call(instances, fn, chunk: int) -> None:
    made: dict[type, type] = {}
    for obj in instances:
        cls = type(obj)
        if getattr(cls, "_chunked_call", False):
            continue
        if cls not in made:
            made[cls] = type(f"Chunked{cls.__name__}", (cls,),
                             {"__call__": _bind(fn, cls.__call__, chunk), "_chunked_call": True})
        obj.__class__ = made[cls]


def _token_chunked_call(self, x, *, _base, _chunk):
    """A token-wise module (MLP / FFN) over sequence chunks, each recomputed in the backward."""
    L = x.shape[1]
    if L <= _chunk:
        return _base(self, x)

    def inner(params, xc):
        self.update(params)
        return _base(self, xc)

    f = mx.checkpoint(inner)
    params = self.trainable_parameters()
    return mx.concatenate([f(params, x[:, s:s + _chunk]) for s in range(0, L, _chunk)], axis=1)


def enable_chunked_attention(model, chunk: int = 512) -> None:
    """Query-chunked, recomputed self-attention for the LLM layers and Infinity blocks (their
    ``sdpa`` seam), and token-chunked, recomputed MLPs / FFNs (training forwards only: cached
    inference calls take the original path). Same results up to float rounding; a long sequence's
    attention memory falls from O(L^2) to O(chunk x L) per head and the MLP's from O(L x 4H) to
    O(chunk x 4H)."""
    for attn in [layer.self_attn for layer in model.model.layers] + [b.sa for b in model.vargpt_gen.blocks]:
        attn.sdpa = chunked_sdpa(type(attn).sdpa, chunk)
    _swap_call([layer.mlp for layer in model.model.layers] + [b.ffn for b in model.vargpt_gen.blocks],
               _token_chunked_call, chunk)


def enable_grad_checkpoint(model, attn_chunk: int = 512) -> int:
    """Recompute each LLM layer / Infinity block / vision block in the backward pass instead of
    keeping its activations (``mx.checkpoint``); with ``attn_chunk`` > 0 the long self-attentions
    are also computed in recomputed query chunks (``enable_chunked_attention``). Only these
    instances change (their class is swapped for a subclass); returns how many layers."""
    if attn_chunk > 0:
        enable_chunked_attention(model, attn_chunk)
    layers = list(model.model.layers) + list(model.vargpt_gen.blocks) + list(model.visual.blocks)
    made: dict[type, type] = {}
    for layer in layers:
        cls = type(layer)
        if getattr(cls, "_grad_checkpointed", False):
            continue
        if cls not in made:
            base_call = cls.__call__

            def call(self, *args, _base=base_call, **kwargs):
                arrays: list = []
                spec = _split_args((args, kwargs), arrays)

                def inner(params, *arrs):
                    self.update(params)
                    a, kw = _join_args(spec, arrs)
                    return _base(self, *a, **kw)

                return mx.checkpoint(inner)(self.trainable_parameters(), *arrays)

            made[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": call, "_grad_checkpointed": True})
        layer.__class__ = made[cls]
    return len(layers)


# -------------------------------------------------------------------------- state files
def save_checkpoint(adapter_dir: Path, model, optimizer, step: int, meta: dict, lora_cfg: LoraConfig) -> None:
    arrays = {f"adapter.{k}": v for k, v in trained_weights(model, lora_cfg).items()}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    save_safetensors_atomic(Path(adapter_dir) / CHECKPOINT_FILE, arrays,
                            {"vargpt_mlx_state": json.dumps({**meta, "step": step})})


def read_checkpoint(adapter_dir: str | Path) -> tuple[dict, dict[str, mx.array], dict[str, mx.array]]:
    """``(state metadata, adapter arrays, optimizer arrays)`` of a training checkpoint."""
    f = Path(adapter_dir) / CHECKPOINT_FILE
    if not f.is_file():
        raise CheckpointMismatch(f"no training checkpoint to resume in {adapter_dir} (no {CHECKPOINT_FILE})")
    try:
        arrays, meta = mx.load(str(f), return_metadata=True)
        state = json.loads(meta["vargpt_mlx_state"])
    except Exception as e:
        raise CheckpointMismatch(f"cannot read {f}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    adapters = {k[len("adapter."):]: v for k, v in arrays.items() if k.startswith("adapter.")}
    opt = {k[len("optimizer."):]: v for k, v in arrays.items() if k.startswith("optimizer.")}
    return state, adapters, opt


def learning_rate(args: TrainArgs):
    if args.lr_schedule == "constant":
        return args.learning_rate
    if args.lr_schedule == "cosine":
        decay = optim.cosine_decay(args.learning_rate, max(1, args.iters - args.warmup), 0.05 * args.learning_rate)
        if args.warmup <= 0:
            return decay
        warm = optim.linear_schedule(args.learning_rate / args.warmup, args.learning_rate, args.warmup)
        return optim.join_schedules([warm, decay], [args.warmup])
    raise ValueError(f"unknown learning-rate schedule {args.lr_schedule!r} (constant or cosine)")


def make_optimizer(args: TrainArgs):
    lr = learning_rate(args)
    if args.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    if args.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=args.weight_decay)
    raise ValueError(f"unknown optimizer {args.optimizer!r} (adam or adamw)")


def _restore_optimizer(optimizer, model, flat: dict[str, mx.array]) -> None:
    optimizer.init(model.trainable_parameters())
    want = {k for k, _ in tree_flatten(optimizer.state)}
    if want != set(flat):
        missing = sorted(want - set(flat)) or sorted(set(flat) - want)
        raise CheckpointMismatch(f"checkpoint optimizer state does not fit the model (first mismatch: {missing[0]})")
    optimizer.state = tree_map_with_path(lambda path, _: flat[path], optimizer.state)


def _all_finite(tree) -> bool:
    leaves = [v for _, v in tree_flatten(tree)]
    if not leaves:
        return True
    ok = mx.array(True)
    for v in leaves:
        ok = ok & mx.all(mx.isfinite(v))
    return bool(ok.item())


# -------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    steps: int
    last_loss: float
    losses: list[float]
    val: list[tuple[int, dict[str, float]]]


def _resume(model, optimizer, args: TrainArgs, adapter_dir: Path, lora_cfg: LoraConfig) -> int:
    """Load a run's checkpoint into ``model`` and ``optimizer``; returns the step it reached."""
    state, adapters, opt_flat = read_checkpoint(adapter_dir)
    expected = trained_weights(model, lora_cfg)
    if set(adapters) != set(expected) or any(adapters[k].shape != expected[k].shape for k in expected):
        raise CheckpointMismatch("checkpoint weights do not fit the trained layers of this run")
    model.load_weights(list(adapters.items()), strict=False)
    _restore_optimizer(optimizer, model, opt_flat)
    if args.lr_schedule == "constant":  # a schedule continues from the restored step count
        optimizer.learning_rate = args.learning_rate
    start = int(state["step"])
    if start >= args.iters:
        raise CheckpointMismatch(f"the checkpoint is at step {start}, nothing to do for --iters {args.iters}")
    return start


def _accumulate(model, task: Task, args: TrainArgs, step: int, loss_and_grad):
    """Loss, metric and gradient sums over the micro-batches of one update (gradients averaged)."""
    grads_acc = None
    loss_sum = mx.array(0.0)
    metric_sums: dict[str, mx.array] = {}
    ntok = 0
    for micro in range(args.grad_accum):
        idxs = batch_indices(args.seed, task.n_train, step, micro, args.batch_size, args.grad_accum)
        (loss, metrics), grads = loss_and_grad(model, idxs)
        ntok += task.num_tokens(idxs)
        grads_acc = grads if grads_acc is None else tree_map(mx.add, grads_acc, grads)
        loss_sum = loss_sum + loss
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v
        mx.eval(loss_sum, grads_acc, metric_sums)
    if args.grad_accum > 1:
        grads_acc = tree_map(lambda g: g / args.grad_accum, grads_acc)
    return loss_sum, metric_sums, grads_acc, ntok


def _check_finite(loss_val: float, grads, step: int, last_saved: int, adapter_dir: Path) -> None:
    if math.isfinite(loss_val) and _all_finite(grads):
        return
    what = f"loss is {loss_val}" if not math.isfinite(loss_val) else "a gradient is not finite"
    raise TrainingDiverged(
        f"{what} at step {step + 1}; training stopped. The last good checkpoint "
        f"(step {last_saved}) is kept in {adapter_dir}" if last_saved else
        f"{what} at step {step + 1}; training stopped before any checkpoint was written")


def train(model, task: Task, args: TrainArgs, adapter_dir: str | Path, lora_cfg: LoraConfig, *,
          resume: bool = False, meta: dict | None = None,
          callback: TrainingCallback | None = None) -> TrainResult:
    """Train the LoRA parameters of ``model`` (already wrapped by ``apply_lora``) on ``task``, or
    with ``lora_cfg.full`` every trainable (unfrozen) parameter.

    Saves a checkpoint every ``args.save_every`` updates and at the end; ``callback`` hears of every
    update, save and evaluation. Raises :class:`TrainingDiverged` on a non-finite loss or gradient
    (nothing is saved for that step).
    """
    adapter_dir = Path(adapter_dir)
    callback = callback or TrainingCallback()
    meta = dict(meta or {})
    meta.update({"args": asdict(args), "lora": lora_cfg.to_json()})
    if args.iters < 1 or args.batch_size < 1 or args.grad_accum < 1 or args.save_every < 1:
        raise ValueError("iters, batch size, grad accumulation and save-every must be >= 1")
    if task.n_train < 1:
        raise ValueError("no training samples")
    if args.grad_checkpoint:
        enable_grad_checkpoint(model)
    optimizer = make_optimizer(args)
    start = _resume(model, optimizer, args, adapter_dir, lora_cfg) if resume else 0
    if not resume:
        optimizer.init(model.trainable_parameters())
    # only the adapters: base weights stay memory-mapped until a forward touches them
    mx.eval(model.trainable_parameters(), optimizer.state)

    loss_and_grad = task.loss_and_grad if isinstance(task, GradientTask) else nn.value_and_grad(model, task.batch_loss)
    losses: list[float] = []
    vals: list[tuple[int, dict[str, float]]] = []
    mx.reset_peak_memory()
    t_start = time.perf_counter()
    loss_val = float("nan")
    last_saved = start
    for step in range(start, args.iters):
        t0 = time.perf_counter()
        model.train()
        task.begin_step(step)
        if lora_cfg.dropout > 0:
            mx.random.seed(args.seed * 1_000_003 + step)
        loss_sum, metric_sums, grads_acc, ntok = _accumulate(model, task, args, step, loss_and_grad)
        loss_val = loss_sum.item() / args.grad_accum
        _check_finite(loss_val, grads_acc, step, last_saved, adapter_dir)
        optimizer.update(model, grads_acc)
        mx.eval(model.trainable_parameters(), optimizer.state)
        losses.append(loss_val)
        dt = time.perf_counter() - t0
        elapsed = time.perf_counter() - t_start
        done = step + 1 - start
        callback.on_step(StepInfo(
            step=step + 1, iters=args.iters, loss=loss_val,
            metrics={k: v.item() / args.grad_accum for k, v in metric_sums.items()},
            tokens_per_sec=ntok / dt if dt > 0 else 0.0, peak_memory_gb=mx.get_peak_memory() / 1e9,
            elapsed=elapsed, eta=elapsed / done * (args.iters - step - 1),
            learning_rate=float(np.asarray(optimizer.learning_rate)),
        ))
        if (step + 1) % args.save_every == 0 or step + 1 == args.iters:
            save_checkpoint(adapter_dir, model, optimizer, step + 1, meta, lora_cfg)
            save_adapters(model, adapter_dir, lora_cfg, {"training": {**meta.get("info", {}), "step": step + 1}})
            last_saved = step + 1
            callback.on_save(step + 1)
        if task.n_val and args.steps_per_eval > 0 and ((step + 1) % args.steps_per_eval == 0 or step + 1 == args.iters):
            model.eval()
            v = task.evaluate(model, args.val_batches * args.batch_size if args.val_batches > 0 else -1)
            vals.append((step + 1, v))
            callback.on_eval(step + 1, v)
    model.eval()
    return TrainResult(steps=args.iters, last_loss=loss_val, losses=losses, val=vals)
