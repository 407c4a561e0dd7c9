"""Classifier-free guidance on bit logits and per-bit sampling (Infinity's bitwise head).

Mirrors VARGPT's ``autoregressive_infer_cfg`` (``cfg_insertion_layer=[0]``: CFG on logits) and
Infinity's ``sample_with_top_k_top_p_also_inplace_modifying_logits_`` applied to logits
reshaped ``(B, L*bits, 2)``: every bit is a two-way choice between its logit for 0 (column 2j)
and for 1 (column 2j+1).
"""

from __future__ import annotations

import mlx.core as mx


def cfg_logits(raw: mx.array, cfg: float, tau: float) -> mx.array:
    """Guided logits ``(B, L, 2*bits)`` from raw logits ``(2B, L, 2*bits)`` (cond rows first).

    Upstream op order: ``logits = raw * (1/tau)``, then ``cfg * logits[:B] + (1-cfg) * logits[B:]``.
    """
    if raw.shape[0] % 2:
        raise ValueError(f"raw logits need cond and uncond rows, got batch {raw.shape[0]}")
    b = raw.shape[0] // 2
    logits = raw * (1.0 / tau)
    return cfg * logits[:b] + (1.0 - cfg) * logits[b:]


def _bit_pairs(logits: mx.array) -> mx.array:
    """``(B, L, 2*bits)`` -> ``(B, L, bits, 2)``: per bit, (logit of 0, logit of 1)."""
    if logits.shape[-1] % 2:
        raise ValueError(f"bit logits need an even last dimension, got {logits.shape[-1]}")
    return logits.reshape(*logits.shape[:-1], -1, 2)


def _filter_top_k_top_p(pairs: mx.array, top_k: int, top_p: float) -> mx.array:
    """Upstream top-k / top-p masking (to -inf) on two-way choices.

    * top-k: ``top_k >= 2`` keeps both choices (a no-op); ``top_k == 1`` keeps the larger logit
      (both on an exact tie, as upstream's ``< kth-largest`` test does).
    * top-p: upstream sorts ascending and removes entries whose cumulative probability is
      ``<= 1 - top_p``, never the largest; with two choices that is the minority choice when its
      probability is ``<= 1 - top_p`` (compared in float32). On an exact tie (p = 0.5 each) the
      choice for 0 is the one removed.
    """
    neg_inf = mx.array(-float("inf"), dtype=pairs.dtype)
    if top_k == 1:
        pairs = mx.where(pairs < mx.max(pairs, axis=-1, keepdims=True), neg_inf, pairs)
    if top_p > 0.0:
        probs = mx.softmax(pairs, axis=-1)
        minority = mx.min(probs, axis=-1, keepdims=True)
        is_minority = mx.stack([pairs[..., 0] <= pairs[..., 1], pairs[..., 1] < pairs[..., 0]], axis=-1)
        threshold = mx.array(1.0 - top_p, dtype=mx.float32)
        pairs = mx.where(is_minority & (minority <= threshold), neg_inf, pairs)
    return pairs


def choose_bits(logits: mx.array, *, top_k: int = 0, top_p: float = 0.0, key: mx.array | None = None,
                argmax: bool = False) -> mx.array:
    """Pick one bit per (token, bit) from guided logits ``(B, L, 2*bits)`` -> ``(B, L, bits)`` uint8.

    ``argmax=True``: bit 1 iff logit(1) > logit(0) (the fixtures' deterministic override).
    Otherwise: upstream top-k / top-p filtering, then a categorical draw using ``key``
    (``mx.random.key(seed)`` for reproducible output; ``None`` uses MLX's global generator).
    Upstream's hard-coded setting is ``top_k=900`` (a no-op on two choices), ``top_p=0.97``.
    """
    pairs = _bit_pairs(logits)
    if argmax:
        return (pairs[..., 1] > pairs[..., 0]).astype(mx.uint8)
    if top_k < 0 or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"invalid top_k={top_k} / top_p={top_p}")
    pairs = _filter_top_k_top_p(pairs.astype(mx.float32), top_k, top_p)
    return mx.random.categorical(pairs, axis=-1, key=key).astype(mx.uint8)
