"""Infinity visual decoder (upstream ``vargpt_gen.*``) as VARGPT-v1.1 uses it.

Mirrors upstream ``infinity/models/infinity.py`` and ``infinity/models/basic.py`` (the copy under
``vargpt_qwen_v1_1/var_model``) with the switches of the released model: ``shared_aln``,
``cos_attn``, fused adaLN, ``use_bit_label``, ``add_lvl_embeding_only_first_block``,
``rope2d_each_sa_layer``, ``rope2d_normalized_by_hw=2``, ``head_aln``, ``head_depth=1``,
``cross_attn_layer_scale=-1``, no spatial patchify.

VARGPT drives the blocks itself: the block input of every scale is the projected LLM output
(``image_gen_projector_out``), not ``word_embed`` of the codes, so this module exposes the pieces
(condition, per-scale inference with a KV cache, block-causal training forward) rather than
upstream's ``autoregressive_infer_cfg``.

Numerics reproduced on purpose (``CrossAttention`` / ``precompute_rope2d_freqs_grid`` in ``basic.py``):

* the cross-attention and the ``text_proj_for_sos`` attentive pool cast q / k / v to bfloat16,
  attend in float32 from those values and round the output to bfloat16 (flash-attn's fp32 path);
* the 2-D RoPE rotates interleaved pairs and indexes a grid normalised to the '1M' schedule of
  the same aspect ratio, with float32 round-half-to-even indices.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

from .. import schedules
from ..config import InfinityConfig
from . import activations, quantized
from .bsq import l2_normalize

DROPPED: tuple[str, ...] = (
    "*.zero_k_bias",  # always-zero persistent buffers of every SA / CA / attentive pool
    "text_proj_for_ca.*",  # computed upstream, never used by VARGPT
)
"""Glob patterns of upstream keys (``vargpt_gen.`` stripped) that ``sanitize`` drops."""

ROPE_BASE = 10000.0
MAX_SCALE_MUL = math.log(100.0)  # clamp of the cosine-attention temperature (upstream ln 100)

Schedule = Sequence[tuple[int, int]]


def is_dropped(key: str) -> bool:
    """Whether an upstream key (prefix stripped) is one of the known dead weights in ``DROPPED``."""
    return any(fnmatch.fnmatchcase(key, pat) for pat in DROPPED)


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Upstream ``vargpt_gen.*`` weights (prefix stripped) -> this module's parameters.

    Names are identical (all layers are linear, nothing to transpose); only ``DROPPED`` keys are
    removed. Unknown keys are kept so that ``load_weights(strict=True)`` reports them.
    """
    return {k: v for k, v in weights.items() if not is_dropped(k)}


# ----------------------------------------------------------------------------------- helpers
def _bf16_round(x: mx.array) -> mx.array:
    """float32 -> bfloat16 -> float32 (flash-attn's input / output casts in fp32 mode)."""
    return x.astype(mx.bfloat16).astype(mx.float32)


def _ada_layer_norm(x: mx.array, scale: mx.array, shift: mx.array, eps: float) -> mx.array:
    """Upstream ``fused_ada_layer_norm``: ``layer_norm(x, no affine) * (1 + scale) + shift``."""
    return mx.fast.layer_norm(x, None, None, eps) * (1 + scale) + shift


def _apply_rope_interleaved(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Upstream ``apply_rotary_emb``: rotate pairs ``(2i, 2i+1)`` of ``x (B,H,L,d)`` by angle i."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = mx.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], axis=-1)
    return out.reshape(x.shape)


def rope_positions(aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid row / column of every token of the aspect's 1M schedule (``rope2d_normalized_by_hw=2``).

    A token (i, j) of an (h, w) scale sits at ``round(i * uph/h), round(j * upw/w)`` on the last
    1M grid ``(uph, upw)``, computed in float32 with round half to even, as upstream does.
    """
    full = schedules.FULL_SCHEDULES[aspect]
    uph, upw = full[-1]
    rows, cols = [], []
    for h, w in full:
        r = np.round(np.arange(h, dtype=np.float32) * np.float32(uph / h))
        c = np.round(np.arange(w, dtype=np.float32) * np.float32(upw / w))
        rows.append(np.repeat(r, w))
        cols.append(np.tile(c, h))
    return np.concatenate(rows), np.concatenate(cols)


@lru_cache(maxsize=16)
def _rope_table(aspect: float, head_dim: int, pad_to: int) -> tuple[np.ndarray, np.ndarray]:
    """Upstream ``precompute_rope2d_freqs_grid`` for one aspect: ``cos, sin`` of shape
    ``(L_1M padded to pad_to, head_dim/2)`` over ``rope_positions``. The first ``head_dim/4``
    angles use the row, the rest the column; padding rows are zero, as upstream.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (ROPE_BASE ** (np.arange(0, half, 2, dtype=np.float32) / np.float32(half)))
    inv_freq = inv_freq.astype(np.float32)
    r, c = rope_positions(aspect)
    angles = np.concatenate([r[:, None] * inv_freq, c[:, None] * inv_freq], axis=1)
    pad = (-angles.shape[0]) % pad_to
    cos = np.pad(np.cos(angles), ((0, pad), (0, 0)))
    sin = np.pad(np.sin(angles), ((0, pad), (0, 0)))
    return cos.astype(np.float32), sin.astype(np.float32)


@lru_cache(maxsize=8)
def _block_causal_mask(schedule: tuple[tuple[int, int], ...], n: int) -> np.ndarray:
    """Upstream training ``attn_bias`` (1,1,n,n): 0 where scale(row) >= scale(col), -inf elsewhere;
    padded rows see column 0 only, padded columns are hidden."""
    d = np.asarray(schedules.scale_of_token(schedule))
    L = d.shape[0]
    mask = np.full((n, n), -np.inf, dtype=np.float32)
    mask[:L, :L] = np.where(d[:, None] >= d[None, :], 0.0, -np.inf)
    mask[L:, 0] = 0.0
    return mask[None, None]


# ---------------------------------------------------------------------- cross-attention memory
@dataclass
class CrossMemory:
    """Per-row cross-attention memory: upstream ``(kv_compact, cu_seqlens_k, max_seqlen_k)``.

    ``kv`` is the rows' key/value sources zero-padded to a common length ``(B, M, C)``; ``mask``
    is an additive ``(B, 1, 1, M)`` key mask (``None`` when every row has M keys).
    """

    kv: mx.array
    mask: mx.array | None = None

    @classmethod
    def from_rows(cls, rows: Sequence[mx.array]) -> "CrossMemory":
        """Pack one ``(n_i, C)`` array per batch row (each row attends only to its own keys)."""
        lens = [int(r.shape[0]) for r in rows]
        if min(lens) < 1:
            raise ValueError("every cross-attention row needs at least one key")
        m = max(lens)
        if all(n == m for n in lens):
            return cls(mx.stack(list(rows)), None)
        kv = mx.stack([mx.pad(r, [(0, m - n), (0, 0)]) for r, n in zip(rows, lens)])
        valid = np.arange(m)[None, :] < np.asarray(lens)[:, None]
        mask = np.where(valid, 0.0, -np.inf).astype(np.float32)[:, None, None, :]
        return cls(kv, mx.array(mask))


def as_memory(ca_kv: CrossMemory | Sequence[mx.array]) -> CrossMemory:
    """Accept a packed ``CrossMemory`` or a sequence of per-row ``(n_i, C)`` arrays."""
    return ca_kv if isinstance(ca_kv, CrossMemory) else CrossMemory.from_rows(ca_kv)


# ------------------------------------------------------------------------------------- layers
class SelfAttention(nn.Module):
    """Upstream ``basic.SelfAttention`` with ``cos_attn=True`` and per-layer 2-D RoPE."""

    # the q, k, v -> out step: training swaps it per instance (``trainer.enable_chunked_attention``)
    sdpa = staticmethod(activations.sdpa)

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = mx.zeros((dim,))
        self.v_bias = mx.zeros((dim,))
        self.scale_mul_1H11 = mx.full((1, num_heads, 1, 1), math.log(4.0))
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | None = None,
                 cache: KVCache | None = None) -> mx.array:
        """Cosine attention: q, k l2-normalised (q times exp(min(scale_mul, ln 100))), then RoPE,
        then SDPA with scale 1 over the cached keys of earlier scales plus this call's keys."""
        B, L, C = x.shape
        bias = mx.concatenate([self.q_bias, mx.zeros_like(self.q_bias), self.v_bias])
        qkv = (self.mat_qkv(x) + bias).reshape(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        q = l2_normalize(q) * mx.exp(mx.minimum(self.scale_mul_1H11, MAX_SCALE_MUL))
        k = l2_normalize(k)
        q, k = _apply_rope_interleaved(q, cos, sin), _apply_rope_interleaved(k, cos, sin)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # q, k are float32 after the float32 RoPE (upstream too: its k cache is fp32); the output goes
        # back to x's dtype (upstream's ``oup: bf16``), else a bfloat16 model's residual stream, and
        # with it every v cache, turned float32
        out = self.sdpa(q, k, v, cache=cache, scale=1.0, mask=mask).astype(x.dtype)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Upstream ``basic.CrossAttention`` (cos_attn forced off) on its fp32 flash-attn path.

    With ``for_attn_pool`` the query is the learned ``mat_q`` (1, heads, head_dim), one per row
    (``TextAttentivePool``); otherwise ``mat_q`` is a Linear on the block input.
    """

    def __init__(self, dim: int, kv_dim: int, num_heads: int, for_attn_pool: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.for_attn_pool = for_attn_pool
        if for_attn_pool:
            self.mat_q = mx.zeros((1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = mx.zeros((dim,))
        self.proj = nn.Linear(dim, dim)

    def _queries(self, x: mx.array | None, batch: int) -> mx.array:
        """Queries as (B, heads, Lq, head_dim)."""
        if self.for_attn_pool:
            q = self.mat_q.reshape(1, self.num_heads, 1, self.head_dim)
            return mx.broadcast_to(q, (batch, self.num_heads, 1, self.head_dim))
        B, Lq, _ = x.shape
        return self.mat_q(x).reshape(B, Lq, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def keys_values(self, memory: CrossMemory) -> tuple[mx.array, mx.array]:
        """k, v as (B, heads, M, head_dim), before their bfloat16 rounding."""
        B, M, _ = memory.kv.shape
        bias = mx.concatenate([mx.zeros_like(self.v_bias), self.v_bias])
        kv = (self.mat_kv(memory.kv) + bias).reshape(B, M, 2, self.num_heads, self.head_dim)
        k, v = kv.transpose(2, 0, 3, 1, 4)
        return k, v

    def __call__(self, x: mx.array | None, memory: CrossMemory) -> mx.array:
        """Each row attends to its own memory; q, k, v and the output are rounded to bfloat16."""
        B = memory.kv.shape[0]
        k, v = self.keys_values(memory)
        q = self._queries(x, B)
        out = mx.fast.scaled_dot_product_attention(
            _bf16_round(q), _bf16_round(k), _bf16_round(v),
            scale=1.0 / math.sqrt(self.head_dim), mask=memory.mask,
        )
        # back in the model's dtype (float32 stays float32; a bfloat16 model keeps its activations in
        # bfloat16, where this float32 output had turned every later scale, and its caches, float32)
        out = _bf16_round(out).astype(v.dtype)
        Lq = out.shape[2]
        return self.proj(out.transpose(0, 2, 1, 3).reshape(B, Lq, -1))


class FFN(nn.Module):
    """Upstream ``basic.FFN``: fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized.mlp(x, [self.fc1], activations.gelu_approx, self.fc2)
        return self.fc2(activations.gelu_approx(self.fc1(x))) if y is None else y


class CrossAttnBlock(nn.Module):
    """Upstream ``basic.CrossAttnBlock`` (shared adaLN, fused-norm path, ``ca_gamma = 1``)."""

    def __init__(self, cfg: InfinityConfig, drop_path: float = 0.0):
        super().__init__()
        C = cfg.embed_dim
        self.norm_eps = cfg.norm_eps
        self.drop_path_rate = drop_path
        self.ada_gss = mx.zeros((1, 1, 6, C))
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = CrossAttention(C, C, cfg.num_heads)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.ffn = FFN(C, cfg.ffn_hidden)

    def _drop_path(self, x: mx.array, stochastic: bool) -> mx.array:
        """timm ``DropPath`` on a residual branch (per sample), only when ``stochastic``."""
        if not stochastic or self.drop_path_rate <= 0.0:
            return x
        keep = 1.0 - self.drop_path_rate
        return x * mx.random.bernoulli(keep, (x.shape[0], 1, 1)) / keep

    def __call__(self, x: mx.array, cond_gss: mx.array, memory: CrossMemory, cos: mx.array,
                 sin: mx.array, mask: mx.array | None = None, cache: KVCache | None = None,
                 stochastic: bool = False) -> mx.array:
        """``cond_gss (B,1,6,C)`` + ``ada_gss`` unbinds into gamma1, gamma2, scale1, scale2,
        shift1, shift2 (upstream order)."""
        g1, g2, s1, s2, b1, b2 = [t.squeeze(2) for t in mx.split(self.ada_gss + cond_gss, 6, axis=2)]
        sa = self.sa(_ada_layer_norm(x, s1, b1, self.norm_eps), cos, sin, mask, cache)
        x = x + self._drop_path(sa * g1, stochastic)
        x = x + self.ca(self.ca_norm(x), memory)
        ffn = self.ffn(_ada_layer_norm(x, s2, b2, self.norm_eps))
        return x + self._drop_path(ffn * g2, stochastic)


class BlockChunk(nn.Module):
    """Upstream ``MultipleLayers``: consecutive blocks, keys ``block_chunks.{i}.module.{j}``."""

    def __init__(self, blocks: list[CrossAttnBlock]):
        super().__init__()
        self.module = blocks


class TextAttentivePool(nn.Module):
    """Upstream ``TextAttentivePool`` (``text_proj_for_sos``): one learned query per row."""

    def __init__(self, text_channels: int, dim: int):
        super().__init__()
        head_dim = 64 if dim > 4096 else 128
        self.ca = CrossAttention(dim, text_channels, text_channels // head_dim, for_attn_pool=True)

    def __call__(self, memory: CrossMemory) -> mx.array:
        return self.ca(None, memory)[:, 0]


class AdaLNBeforeHead(nn.Module):
    """Upstream ``AdaLNBeforeHead``: ``(scale, shift) = Linear(SiLU(cond))``, then adaLN."""

    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.norm_eps = eps
        self.ada_lin = [nn.SiLU(), nn.Linear(cond_dim, 2 * dim)]

    def __call__(self, x: mx.array, cond_BD: mx.array) -> mx.array:
        ss = self.ada_lin[1](self.ada_lin[0](cond_BD)).reshape(cond_BD.shape[0], 1, 2, -1)
        return _ada_layer_norm(x, ss[:, :, 0], ss[:, :, 1], self.norm_eps)


# -------------------------------------------------------------------------------------- model
class Infinity(nn.Module):
    """The Infinity transformer (``vargpt_gen``) with upstream parameter names.

    Inference (per scale, KV cache across scales)::

        cond_BD = inf.condition(sos_rows)                 # (B, C), e.g. rows [cond; uncond]
        cache = inf.make_cache()
        memory = CrossMemory.from_rows([kv_cond, inf.cfg_uncond[:n]])
        for k in range(len(schedule)):
            logits = inf.forward_scale(x_k, cond_BD, memory, k, schedule, cache)   # (B, hw, 64)

    Training: ``inf.forward_train(x_BNC, cond_BD, memory, schedule, drop_path=True)`` with the
    block-causal mask; ``drop_path`` enables upstream's train-mode DropPath (off by default, so
    forwards are deterministic, as upstream's ``eval()`` fixtures).
    """

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        if cfg.text_channels != cfg.embed_dim:
            raise ValueError("Infinity needs text_channels == embed_dim (the sos embedding is fed to text_norm)")
        C = cfg.embed_dim
        self.cfg = cfg
        self.pos_start = mx.zeros((1, 1, C))
        self.cfg_uncond = mx.zeros((cfg.text_maxlen, cfg.text_channels))
        self.text_norm = nn.RMSNorm(cfg.text_channels, eps=cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(cfg.text_channels, C)
        self.lvl_embed = nn.Embedding(cfg.num_lvl, C)
        self.word_embed = nn.Linear(cfg.codebook_dim, C)
        self.shared_ada_lin = [nn.SiLU(), nn.Linear(C, 6 * C)]
        rates = np.linspace(0.0, cfg.drop_path_rate, cfg.depth)
        blocks = [CrossAttnBlock(cfg, float(r)) for r in rates]
        per = cfg.depth // cfg.block_chunks
        self.block_chunks = [BlockChunk(blocks[i * per:(i + 1) * per]) for i in range(cfg.block_chunks)]
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * cfg.codebook_dim)

    @property
    def blocks(self) -> list[CrossAttnBlock]:
        """All blocks in order (upstream ``unregistered_blocks``)."""
        return [b for chunk in self.block_chunks for b in chunk.module]

    # ------------------------------------------------------------------ condition
    def condition(self, sos: mx.array) -> mx.array:
        """``cond_BD = text_proj_for_sos(text_norm(sos))`` for ``sos (B, C)``, one key per row.

        VARGPT feeds ``[sos_embedding[image_gen_start]; cfg_uncond[0]]`` (generation) or the
        sos row alone (training); the result does not depend on the prompt.
        """
        return self.text_proj_for_sos(CrossMemory(self.text_norm(sos)[:, None]))

    def ada_condition(self, cond_BD: mx.array) -> mx.array:
        """``cond_BD_or_gss = shared_ada_lin(cond_BD)``: SiLU -> Linear, reshaped (B, 1, 6, C)."""
        h = self.shared_ada_lin[1](self.shared_ada_lin[0](cond_BD))
        return h.reshape(cond_BD.shape[0], 1, 6, -1)

    def sos_tokens(self, cond_BD: mx.array) -> mx.array:
        """First-scale Infinity token ``cond_BD[:, None] + pos_start`` (B, 1, C)."""
        return cond_BD[:, None] + self.pos_start

    def train_inputs(self, cond_BD: mx.array, codes: mx.array, schedule: Schedule) -> mx.array:
        """Upstream ``Infinity.forward`` step 1: ``x_BLC = [sos ; word_embed(codes)]`` zero-padded
        to a multiple of ``pad_to_multiplier`` (``codes`` = teacher inputs of scales 1.., (B, L-1, 32))."""
        x = mx.concatenate([self.sos_tokens(cond_BD), self.word_embed(codes)], axis=1)
        n = schedules.padded_tokens(list(schedule), self.cfg.pad_to_multiplier)
        return mx.pad(x, [(0, 0), (0, n - x.shape[1]), (0, 0)])

    # ------------------------------------------------------------------ shared pieces
    def _rope(self, schedule: Schedule, start: int, length: int,
              rope_grid: tuple[int, int] | None = None) -> tuple[mx.array, mx.array]:
        """cos / sin rows ``start:start+length`` of the schedule's aspect table (upstream picks
        the table by the schedule itself and slices it by ``scale_ind``). ``rope_grid``, when
        given, must be that aspect's 1M grid (``schedules.rope_grid``): a consistency check."""
        aspect = schedules.aspect_of(list(schedule))
        if rope_grid is not None and tuple(rope_grid) != schedules.rope_grid(aspect):
            raise ValueError(f"rope_grid {tuple(rope_grid)} does not match the schedule's aspect "
                             f"{aspect} (1M grid {schedules.rope_grid(aspect)})")
        cos, sin = _rope_table(aspect, self.cfg.head_dim, self.cfg.pad_to_multiplier)
        if start + length > cos.shape[0]:
            raise ValueError(f"{start + length} tokens exceed the rotary table ({cos.shape[0]})")
        return mx.array(cos[start:start + length]), mx.array(sin[start:start + length])

    def logits(self, h: mx.array, cond_BD: mx.array) -> mx.array:
        """Upstream ``get_logits``: ``head(head_nm(h, cond_BD))`` -> (B, L, 2*bits); bit j's
        logits for 0 / 1 are columns 2j / 2j+1."""
        return self.head(self.head_nm(h, cond_BD))

    def make_cache(self) -> list[KVCache]:
        """One self-attention KV cache per block, shared by all scales of one image."""
        return [KVCache() for _ in range(self.cfg.depth)]

    # ------------------------------------------------------------------ forwards
    def forward_scale(self, x: mx.array, cond_BD: mx.array, ca_kv: CrossMemory | Sequence[mx.array],
                      scale_index: int, schedule: Schedule, cache: list[KVCache],
                      rope_grid: tuple[int, int] | None = None) -> mx.array:
        """One scale of VARGPT's ``autoregressive_infer_cfg`` Infinity loop.

        ``x (B, h*w, C)`` is the block input of scale ``scale_index`` (``image_gen_projector_out``
        of the LLM output); ``lvl_embed[k]`` is added, the blocks attend to every cached token of
        scales 0..k of the same row (no mask), and the bit logits ``(B, h*w, 64)`` are returned.
        """
        h, w = schedule[scale_index]
        if x.shape[1] != h * w:
            raise ValueError(f"scale {scale_index} has {h * w} tokens, got {x.shape[1]}")
        start = schedules.total_tokens(list(schedule[:scale_index]))
        cos, sin = self._rope(schedule, start, h * w, rope_grid)
        memory = as_memory(ca_kv)
        gss = self.ada_condition(cond_BD)
        x = x + self.lvl_embed.weight[scale_index]
        for block, block_cache in zip(self.blocks, cache):
            x = block(x, gss, memory, cos, sin, cache=block_cache)
        return self.logits(x, cond_BD)

    def level_embedding(self, schedule: Schedule, n: int) -> mx.array:
        """Upstream ``add_lvl_embeding_for_x_BLC`` addend: ``lvl_embed[scale(token)]`` for the L
        scale tokens, zero for the padding up to ``n`` -> (n, C)."""
        idx = mx.array(schedules.scale_of_token(list(schedule)))
        lvl = self.lvl_embed(idx)
        return mx.pad(lvl, [(0, n - lvl.shape[0]), (0, 0)])

    def forward_train(self, x: mx.array, cond_BD: mx.array, ca_kv: CrossMemory | Sequence[mx.array],
                      schedule: Schedule, rope_grid: tuple[int, int] | None = None,
                      drop_path: bool = False) -> mx.array:
        """Upstream ``forward_decoder`` (training): ``x (B, N, C)`` holds the L scale tokens then
        padding; level embeddings before the first chunk, block-causal mask, logits for the first
        L tokens -> (B, L, 64). The rotary rows are 0..N-1 (upstream uses ``scale_ind=0``).

        ``drop_path=True`` applies DropPath with rates ``linspace(0, drop_path_rate, depth)``
        (upstream's ``train()`` mode, drawn from MLX's global generator)."""
        n = x.shape[1]
        L = schedules.total_tokens(list(schedule))
        if n < L:
            raise ValueError(f"x has {n} tokens, the schedule needs {L}")
        cos, sin = self._rope(schedule, 0, n, rope_grid)
        mask = mx.array(_block_causal_mask(tuple(map(tuple, schedule)), n))
        memory = as_memory(ca_kv)
        gss = self.ada_condition(cond_BD)
        x = x + self.level_embedding(schedule, n)
        for block in self.blocks:
            x = block(x, gss, memory, cos, sin, mask=mask, stochastic=drop_path)
        return self.logits(x[:, :L], cond_BD)
