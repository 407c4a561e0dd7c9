"""Supervised fine-tuning task: per-sample upstream losses averaged over the batch."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..image_processor import ImageProcessor
from .data import Batchable, GenTarget, flip_requant
from .losses import SampleLoss, sample_sft_loss


def item_loss(model, item: Batchable, processor: ImageProcessor, text_loss: str = "upstream",
              dtype=mx.float32) -> SampleLoss:
    """The SFT loss of one encoded sample (text CE, + 3.0 x bit CE for a generation target)."""
    s = item.sample
    pv, grid = item.arrays(processor, dtype)
    t = item.target
    return sample_sft_loss(model, mx.array(s.input_ids[None]), s.labels[None],
                           gt_bits=None if t is None else t.gt_bits,
                           x_wo_prefix=None if t is None else t.x_wo_prefix,
                           schedule=s.schedule, pixel_values=pv, image_grid_thw=grid, text_loss=text_loss)


class SFTTask:
    """Batch loss = mean of the per-sample losses (each sample is a B = 1 sequence: no padding,
    so batches of unequal lengths need no attention mask).

    ``bit_flip`` > 0 turns on upstream's bitwise self-correction for generation targets (labels
    and teacher inputs re-derived each step from the cached VAE features with random bit flips;
    upstream trains with 0.3). The flips of a sample at a step depend only on (seed, step, sample),
    so resumed runs see the same ones. Evaluation never flips.
    """

    def __init__(self, processor: ImageProcessor, train: list[Batchable], val: list[Batchable] | None = None,
                 text_loss: str = "upstream", dtype=mx.float32, bit_flip: float = 0.0, seed: int = 0):
        if text_loss not in ("upstream", "assistant"):
            raise ValueError(f"unknown text loss {text_loss!r} (upstream or assistant)")
        if not 0.0 <= bit_flip <= 1.0:
            raise ValueError("bit flip strength must be in [0, 1]")
        self.processor, self.train_items, self.val_items = processor, train, list(val or [])
        self.text_loss, self.dtype = text_loss, dtype
        self.bit_flip, self.seed, self.step = bit_flip, seed, 0
        self.n_train, self.n_val = len(train), len(self.val_items)

    def begin_step(self, step: int) -> None:
        self.step = step

    def num_tokens(self, idxs: list[int]) -> int:
        return sum(self.train_items[i].sample.num_tokens for i in idxs)

    def _train_item(self, i: int) -> Batchable:
        it = self.train_items[i]
        t = it.target
        if self.bit_flip <= 0 or t is None or t.features is None:
            return it
        rng = np.random.default_rng([self.seed, self.step, i])
        gt, x_wo = flip_requant(t.features, t.schedule or it.sample.schedule, self.bit_flip, rng)
        return Batchable(it.sample, GenTarget(gt, x_wo))

    def _losses(self, model, items: list[Batchable]) -> tuple[mx.array, dict[str, mx.array]]:
        outs = [item_loss(model, it, self.processor, self.text_loss, self.dtype) for it in items]
        loss = mx.mean(mx.stack([o.loss for o in outs]))
        metrics = {"text_ce": mx.mean(mx.stack([o.text_ce for o in outs]))}
        bits = [o.bit_ce for o in outs if o.bit_ce is not None]
        if bits:
            metrics["bit_ce"] = mx.mean(mx.stack(bits))
        return loss, metrics

    def batch_loss(self, model, idxs: list[int]):
        return self._losses(model, [self._train_item(i) for i in idxs])

    def evaluate(self, model, limit: int = -1) -> dict[str, float]:
        items = self.val_items if limit < 0 else self.val_items[:limit]
        total, n = 0.0, 0
        for it in items:
            out = item_loss(model, it, self.processor, self.text_loss, self.dtype)
            total += out.loss.item()
            n += 1
        return {"val_loss": total / max(n, 1)}
