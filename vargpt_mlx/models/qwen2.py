"""Qwen2 decoder with M-RoPE: the language model of VARGPT-v1.1 (upstream ``model.*``).

Mirrors ``Qwen2VLModel`` of transformers 4.46.1 (``modeling_qwen2_vl.py``) as upstream runs it, with
SDPA attention:

* pre-RMSNorm attention (q/k/v with bias, o without, GQA) and SwiGLU MLP, each with a residual;
  a final RMSNorm;
* multimodal rotary embedding: three position axes (t, h, w), the head channels split by
  ``mrope_section`` (twice), rotate_half;
* causal attention; an explicit additive mask for padding (``make_attention_mask``).

``lm_head`` is not part of this module (upstream keeps it at the top level, untied).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from ..config import LLMConfig
from . import activations, quantized
from .linear import Linear

# Upstream ``model.*`` keys (prefix stripped) this port knowingly drops: none.
DROPPED: tuple[str, ...] = ()


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Upstream ``model.*`` weights (prefix stripped) to ``Qwen2Model`` parameter names.

    The names and layouts already agree (Linear weights are (out, in) in both frameworks), so this
    is the identity; unknown keys are kept so that a strict load reports them.
    """
    return dict(weights)


class MRoPE(nn.Module):
    """Multimodal rotary embedding: ``Qwen2VLRotaryEmbedding`` + the section merge of
    ``apply_multimodal_rotary_pos_emb``.

    Upstream computes ``emb = cat(freqs, freqs)`` for each of the 3 axes and takes channel chunk i
    of ``mrope_section * 2`` from axis ``i % 3``. Since both halves of ``emb`` repeat the same
    frequencies, that equals picking, per frequency, the position of its section's axis first.
    """

    def __init__(self, head_dim: int, base: float, mrope_section: tuple[int, int, int]):
        super().__init__()
        if sum(mrope_section) * 2 != head_dim:
            raise ValueError(f"mrope_section {mrope_section} does not cover head_dim {head_dim}")
        exponents = np.arange(0, head_dim, 2, dtype=np.float32).astype(np.float64) / head_dim
        self._inv_freq = mx.array((1.0 / base**exponents).astype(np.float32))
        self._axis_of_freq = mx.array(np.repeat(np.arange(3), mrope_section).astype(np.int32))

    def __call__(self, position_ids: mx.array, dtype: mx.Dtype = mx.float32) -> tuple[mx.array, mx.array]:
        """(3, B, L) integer positions -> ``(cos, sin)``, each (B, 1, L, head_dim), cast to ``dtype``."""
        pos = mx.take(mx.moveaxis(position_ids, 0, -1), self._axis_of_freq, axis=-1)
        freqs = pos.astype(mx.float32) * self._inv_freq
        emb = mx.concatenate([freqs, freqs], axis=-1)[:, None]
        return mx.cos(emb).astype(dtype), mx.sin(emb).astype(dtype)


def rotate_half(x: mx.array) -> mx.array:
    """Upstream ``rotate_half``: (x1, x2) -> (-x2, x1) over the last axis halves."""
    x1, x2 = mx.split(x, 2, axis=-1)
    return mx.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """``x * cos + rotate_half(x) * sin`` (the q/k update of ``apply_multimodal_rotary_pos_emb``)."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """``Qwen2VLSdpaAttention``: GQA self-attention with M-RoPE, scale 1/sqrt(head_dim)."""

    # the q, k, v -> out step: training swaps it per instance (``trainer.enable_chunked_attention``)
    sdpa = staticmethod(activations.sdpa)

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        dim, head_dim = cfg.hidden_size, cfg.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.scale = head_dim**-0.5
        self.q_proj = Linear(dim, self.n_heads * head_dim, bias=True)
        self.k_proj = Linear(dim, self.n_kv_heads * head_dim, bias=True)
        self.v_proj = Linear(dim, self.n_kv_heads * head_dim, bias=True)
        self.o_proj = Linear(self.n_heads * head_dim, dim, bias=False)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: Any = None,
                 cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = self.sdpa(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """``Qwen2MLP``: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized.mlp(x, [self.gate_proj, self.up_proj], activations.swiglu, self.down_proj)
        return self.down_proj(activations.swiglu(self.gate_proj(x), self.up_proj(x))) if y is None else y


class DecoderLayer(nn.Module):
    """``Qwen2VLDecoderLayer``: pre-norm attention and MLP, each with a residual.

    ``nn.RMSNorm`` (``mx.fast.rms_norm``) normalises in float32 like upstream's ``Qwen2RMSNorm``; in
    float32 the two agree to rounding (upstream casts back to the input dtype before the weight
    multiply, which only matters for bf16 activations).
    """

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: Any = None,
                 cache: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    """``Qwen2VLModel``: token embedding, decoder layers, final norm (no ``lm_head``)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary_emb = MRoPE(cfg.head_dim, cfg.rope_theta, tuple(cfg.mrope_section))

    def embed(self, ids: mx.array) -> mx.array:
        """Token ids (B, L) -> embeddings (B, L, H) (upstream ``embed_tokens``)."""
        return self.embed_tokens(ids)

    def make_cache(self) -> list[KVCache]:
        """One empty ``KVCache`` per layer."""
        return [KVCache() for _ in self.layers]

    def __call__(self, inputs_embeds: mx.array, position_ids: mx.array, cache: list | None = None,
                 mask: Any = None) -> mx.array:
        """Hidden states after the final norm.

        Args:
            inputs_embeds: (B, L, H).
            position_ids: (3, B, L) integer M-RoPE positions (t, h, w).
            cache: per-layer KV caches (``make_cache``), updated in place; ``None`` for no cache.
            mask: ``None`` for causal attention (the new block attends to every cached key and
                causally within itself), or any mask ``mx.fast.scaled_dot_product_attention``
                accepts, e.g. an additive (B or 1, 1, L, L_cached + L) array from
                ``make_attention_mask``.
        """
        if cache is None:
            cache = [None] * len(self.layers)
        if mask is None:
            mask = create_attention_mask(inputs_embeds, cache[0])
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)
        h = inputs_embeds
        for layer, c in zip(self.layers, cache):
            h = layer(h, cos, sin, mask, c)
        return self.norm(h)


def make_attention_mask(attention_mask: mx.array, num_new: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Additive causal + padding mask, as ``_prepare_4d_causal_attention_mask_with_cache_position``.

    Args:
        attention_mask: (B, L_total) with 1 for real tokens and 0 for padding, covering the cached
            tokens followed by the ``num_new`` new ones.
        num_new: number of new (query) tokens, the last ``num_new`` of ``L_total``.
    Returns:
        (B, 1, num_new, L_total): 0 where attention is allowed, ``finfo(dtype).min`` elsewhere.
    """
    total = attention_mask.shape[-1]
    q_pos = mx.arange(total - num_new, total)[:, None]
    allowed = (mx.arange(total)[None] <= q_pos)[None, None] & (attention_mask[:, None, None, :] != 0)
    return mx.where(allowed, mx.array(0, dtype), mx.array(mx.finfo(dtype).min, dtype))
