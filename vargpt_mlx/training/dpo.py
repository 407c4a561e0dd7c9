"""Direct preference optimisation on VARGPT: text answers and generated images.

A response's log-probability is the teacher-forced sum of the log-probs of its labelled text
tokens and, for an image response, of every ground-truth bit of the image under the Infinity
head (``losses.sample_logprob``). The reference model is the same base with the adapters
switched off (``lora.adapters_disabled``: every LoRA scale set to 0, no second copy in memory);
its log-probs are computed **once up front** and cached, since the reference never changes.

Losses (beta = ``beta``), with ``logits = (pi_c - ref_c) - (pi_r - ref_r)``:

* ``sigmoid`` (DPO): ``-log sigmoid(beta * logits)`` on summed log-probs;
* ``ipo``: ``(logits - 1 / (2 beta))^2`` on length-averaged log-probs (as LLaMA-Factory / TRL).

Reported: loss, rewards (``beta * (pi - ref)``) of chosen and rejected, their margin, and the
preference accuracy (chosen reward > rejected reward).
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from ..image_processor import ImageProcessor
from .data import Batchable
from .lora import adapters_disabled
from .losses import sample_logprob

LOSSES = ("sigmoid", "ipo")


def item_logprob(model, item: Batchable, processor: ImageProcessor, dtype=mx.float32,
                 positions: str = "plain") -> tuple[mx.array, int]:
    s = item.sample
    pv, grid = item.arrays(processor, dtype)
    t = item.target
    return sample_logprob(model, mx.array(s.input_ids[None]), s.labels[None],
                          gt_bits=None if t is None else t.gt_bits,
                          x_wo_prefix=None if t is None else t.x_wo_prefix,
                          schedule=s.schedule, pixel_values=pv, image_grid_thw=grid, positions=positions)


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float, loss_type: str = "sigmoid"):
    """``(loss, reward_chosen, reward_rejected)`` from (already length-normalised for IPO) log-probs."""
    logits = (pi_c - ref_c) - (pi_r - ref_r)
    if loss_type == "sigmoid":
        loss = mx.logaddexp(mx.array(0.0), -beta * logits)  # -log sigmoid(beta * logits)
    elif loss_type == "ipo":
        loss = (logits - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {', '.join(LOSSES)}")
    return loss, beta * (pi_c - ref_c), beta * (pi_r - ref_r)


class DPOTask:
    def __init__(self, processor: ImageProcessor, pairs: list[tuple[Batchable, Batchable]],
                 val_pairs: list[tuple[Batchable, Batchable]] | None = None, beta: float = 0.1,
                 loss_type: str = "sigmoid", dtype=mx.float32, split_backward: bool = False,
                 positions: str = "plain"):
        if loss_type not in LOSSES:
            raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {', '.join(LOSSES)}")
        if not beta > 0:
            raise ValueError("beta must be > 0")
        self.processor, self.pairs, self.val_pairs = processor, pairs, list(val_pairs or [])
        self.beta, self.loss_type, self.dtype = beta, loss_type, dtype
        self.split_backward = split_backward  # loss_and_grad back-propagates one response at a time
        self.positions = positions  # training positions (losses.training_positions)
        self.n_train, self.n_val = len(pairs), len(self.val_pairs)
        self.ref: list[tuple[float, int, float, int]] | None = None
        self.val_ref: list[tuple[float, int, float, int]] | None = None

    def begin_step(self, step: int) -> None:
        pass  # DPO draws nothing per step

    def num_tokens(self, idxs: list[int]) -> int:
        return sum(self.pairs[i][0].sample.num_tokens + self.pairs[i][1].sample.num_tokens for i in idxs)

    def prepare_reference(self, model, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Reference log-probs of every pair with the adapters disabled (computed once)."""
        total = 2 * (self.n_train + self.n_val)
        done = 0

        def run(pairs):
            out = []
            nonlocal done
            for c, r in pairs:
                row = []
                for it in (c, r):
                    lp, n = item_logprob(model, it, self.processor, self.dtype, self.positions)
                    row += [lp.item(), n]
                    done += 1
                    if on_progress:
                        on_progress(done, total)
                out.append(tuple(row))
            return out

        model.eval()
        with adapters_disabled(model):
            self.ref = run(self.pairs)
            self.val_ref = run(self.val_pairs)

    def _terms(self, model, pair, ref):
        (pc, nc), (pr, nr) = (item_logprob(model, it, self.processor, self.dtype, self.positions) for it in pair)
        rc, rnc, rr, rnr = ref
        rc, rr = mx.array(rc), mx.array(rr)
        if self.loss_type == "ipo":
            pc, rc, pr, rr = pc / nc, rc / rnc, pr / nr, rr / rnr
        return dpo_loss(pc, pr, rc, rr, self.beta, self.loss_type)

    def _batch(self, model, pairs, refs):
        if refs is None:
            raise RuntimeError("call prepare_reference() before training")
        terms = [self._terms(model, p, r) for p, r in zip(pairs, refs)]
        loss = mx.mean(mx.stack([t[0] for t in terms]))
        ch = mx.stack([t[1] for t in terms])
        rj = mx.stack([t[2] for t in terms])
        metrics = {"reward_chosen": mx.mean(ch), "reward_rejected": mx.mean(rj),
                   "margin": mx.mean(ch - rj), "accuracy": mx.mean((ch > rj).astype(mx.float32))}
        return loss, {k: mx.stop_gradient(v) for k, v in metrics.items()}

    def batch_loss(self, model, idxs: list[int]):
        return self._batch(model, [self.pairs[i] for i in idxs], [self.ref[i] for i in idxs] if self.ref else None)

    def loss_and_grad(self, model, idxs: list[int]):
        """``nn.value_and_grad(model, batch_loss)``; with ``split_backward`` the same value and
        gradient with one response's graph in memory at a time: a forward pass gives every
        response's log-prob, the loss's derivative with respect to each log-prob is a scalar, and
        the gradient is the sum of those scalars times each response's log-prob gradient (one
        extra forward per response)."""
        import mlx.nn as nn
        from mlx.utils import tree_map

        if not self.split_backward:
            return nn.value_and_grad(model, self.batch_loss)(model, idxs)
        if self.ref is None:
            raise RuntimeError("call prepare_reference() before training")
        lp = [[item_logprob(model, it, self.processor, self.dtype, self.positions) for it in self.pairs[i]] for i in idxs]
        vals = [(mx.stop_gradient(c[0]), c[1], mx.stop_gradient(r[0]), r[1]) for c, r in lp]
        mx.eval([v[0] for v in vals], [v[2] for v in vals])

        def total(pcs, prs):
            out = []
            for (pc, pr), (_, nc, _, nr), ref in zip(zip(pcs, prs), vals, [self.ref[i] for i in idxs]):
                rc, rnc, rr, rnr = ref
                rc, rr = mx.array(rc), mx.array(rr)
                if self.loss_type == "ipo":
                    pc, rc, pr, rr = pc / nc, rc / rnc, pr / nr, rr / rnr
                out.append(dpo_loss(pc, pr, rc, rr, self.beta, self.loss_type))
            return mx.mean(mx.stack([o[0] for o in out])), out

        pcs, prs = [v[0] for v in vals], [v[2] for v in vals]
        (loss, terms), (dpc, dpr) = mx.value_and_grad(lambda a, b: total(a, b), argnums=(0, 1))(pcs, prs)
        grads = None
        for i, w_c, w_r in zip(idxs, dpc, dpr):
            for it, w in zip(self.pairs[i], (w_c, w_r)):
                _, g = nn.value_and_grad(model, lambda m: item_logprob(m, it, self.processor, self.dtype, self.positions)[0])(model)
                g = tree_map(lambda x: x * w, g)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                mx.eval(grads)
        ch = mx.stack([t[1] for t in terms])
        rj = mx.stack([t[2] for t in terms])
        metrics = {"reward_chosen": mx.mean(ch), "reward_rejected": mx.mean(rj),
                   "margin": mx.mean(ch - rj), "accuracy": mx.mean((ch > rj).astype(mx.float32))}
        return (loss, metrics), grads

    def evaluate(self, model, limit: int = -1, split: str = "val") -> dict[str, float]:
        pairs, refs = (self.val_pairs, self.val_ref) if split == "val" else (self.pairs, self.ref)
        if limit >= 0:
            pairs, refs = pairs[:limit], refs[:limit]
        sums: dict[str, float] = {}
        for p, r in zip(pairs, refs):
            loss, m = self._batch(model, [p], [r])
            for k, v in {"loss": loss, **m}.items():
                sums[k] = sums.get(k, 0.0) + v.item()
        n = max(len(pairs), 1)
        prefix = "val_" if split == "val" else ""
        return {prefix + k: v / n for k, v in sums.items()}
