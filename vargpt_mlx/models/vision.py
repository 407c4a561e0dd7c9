"""Qwen2-VL vision tower (upstream ``visual.*``).

Mirrors transformers 4.46.1 ``Qwen2VisionTransformerPretrainedModel`` as used by VARGPT-v1.1:

* ``PatchEmbed``: a Conv3d with kernel == stride over rows of ``(C, T, 14, 14)`` pixels, i.e. a
  bias-free matmul with the weight flattened to ``(E, C*T*14*14)``.
* ``depth`` pre-LayerNorm blocks: attention with 2-D rotary embeddings (rotate_half, float32),
  restricted to each image / frame (``cu_seqlens`` segments), then a quick_gelu MLP.
* ``PatchMerger``: LayerNorm, every 4 consecutive rows (one 2x2 window) concatenated, then
  Linear -> GELU (exact erf) -> Linear to the LLM width.

Parameter names equal upstream's with the ``visual.`` prefix stripped.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import VisionConfig
from . import activations
from .qwen2 import rotate_half

DROPPED: tuple[str, ...] = ()  # every upstream ``visual.*`` weight is used

ROPE_THETA = 10000.0


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Upstream ``visual.*`` weights (prefix stripped) to this module's parameters.

    The Conv3d patch-embedding weight ``(E, C, T, p, p)`` is flattened to ``(E, C*T*p*p)``, keeping
    the (channel, temporal, py, px) column order of the image processor's ``pixel_values``.
    Everything else passes through unchanged (unknown keys are left for ``load_weights`` to report).
    """
    out = dict(weights)
    key = "patch_embed.proj.weight"
    if key in out and out[key].ndim == 5:
        out[key] = out[key].reshape(out[key].shape[0], -1)
    return out


def _window_order(a: np.ndarray, merge_size: int) -> np.ndarray:
    """Flatten an ``(h, w)`` grid window by window (``merge_size`` squares, both row-major)."""
    h, w = a.shape
    return a.reshape(h // merge_size, merge_size, w // merge_size, merge_size).transpose(0, 2, 1, 3).reshape(-1)


def grid_position_ids(grid_thw: np.ndarray, merge_size: int) -> np.ndarray:
    """(row, col) patch coordinates of every pixel_values row, upstream ``rot_pos_emb`` order.

    Rows are in merge-window order (see :func:`_window_order`), repeated for every temporal
    slice. Returns int ``(N, 2)``.
    """
    ids = []
    for t, h, w in grid_thw:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hw = np.stack([_window_order(rows, merge_size), _window_order(cols, merge_size)], axis=-1)
        ids.append(np.tile(hw, (int(t), 1)))
    return np.concatenate(ids, axis=0)


def segment_ids(grid_thw: np.ndarray) -> np.ndarray:
    """Which attention segment (image / frame) each row is in: upstream's ``cu_seqlens``."""
    lengths = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return np.repeat(np.arange(len(lengths)), lengths)


def apply_rotary_pos_emb_vision(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate ``x`` ``(N, heads, head_dim)`` in float32, cast back (upstream ``apply_rotary_pos_emb_vision``)."""
    xf = x.astype(mx.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def vision_rope(positions: np.ndarray, dim: int, theta: float = ROPE_THETA) -> tuple[mx.array, mx.array]:
    """cos, sin ``(N, 1, 2*dim)`` for ``(N, 2)`` (row, col) positions, in float32.

    Upstream ``VisionRotaryEmbedding(head_dim // 2)`` + ``rot_pos_emb``: ``dim / 2`` frequencies
    per axis, ``emb = cat(freqs[row], freqs[col])``, rotated as ``cat(emb, emb)`` (rotate_half).
    """
    inv_freq = 1.0 / (theta ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))
    seq = mx.arange(int(positions.max()) + 1, dtype=mx.float32)
    table = seq[:, None] * inv_freq[None, :]
    emb = table[mx.array(positions)].reshape(positions.shape[0], -1)
    emb = mx.concatenate([emb, emb], axis=-1)[:, None, :]
    return mx.cos(emb), mx.sin(emb)


class PatchEmbed(nn.Module):
    """Upstream ``PatchEmbed``: Conv3d(C, E, k=stride=(T, p, p), bias=False) as a matmul."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        in_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        self.proj = nn.Linear(in_dim, cfg.embed_dim, bias=False)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        return self.proj(pixel_values)


class VisionAttention(nn.Module):
    """Upstream ``VisionSdpaAttention``: fused qkv, 2-D RoPE on q/k, segment-masked SDPA."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True)

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array | None) -> mx.array:
        n = x.shape[0]
        q, k, v = mx.split(self.qkv(x).reshape(n, 3, self.num_heads, -1), 3, axis=1)
        q = apply_rotary_pos_emb_vision(q.squeeze(1), *rope)
        k = apply_rotary_pos_emb_vision(k.squeeze(1), *rope)
        q, k, v = (a.reshape(n, self.num_heads, -1).transpose(1, 0, 2)[None] for a in (q, k, v))
        out = activations.sdpa(q, k, v, scale=self.scale, mask=mask)
        return self.proj(out[0].transpose(1, 0, 2).reshape(n, -1))


class VisionMlp(nn.Module):
    """Upstream ``VisionMlp``: fc1 -> quick_gelu (x * sigmoid(1.702 x)) -> fc2."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu_fast_approx(self.fc1(x)))


class VisionBlock(nn.Module):
    """Upstream ``Qwen2VLVisionBlock``: pre-LayerNorm attention and MLP, each with a residual."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMlp(cfg)

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array | None) -> mx.array:
        x = x + self.attn(self.norm1(x), rope, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Upstream ``PatchMerger``: LayerNorm, view(-1, E * merge**2), Linear -> GELU -> Linear.

    ``mlp`` is a plain list so its parameters are named ``mlp.0`` / ``mlp.2`` as upstream's
    ``nn.Sequential`` (index 1 is the parameter-free GELU).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.hidden = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = [nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, cfg.hidden_size)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.ln_q(x).reshape(-1, self.hidden)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionTransformer(nn.Module):
    """Upstream ``Qwen2VisionTransformerPretrainedModel`` (``model.visual``)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.merge_size = cfg.spatial_merge_size
        self.patch_embed = PatchEmbed(cfg)
        self.rope_dim = cfg.head_dim // 2
        self.blocks = [VisionBlock(cfg) for _ in range(cfg.depth)]
        self.merger = PatchMerger(cfg)

    def __call__(self, pixel_values: mx.array, grid_thw) -> mx.array:
        """``pixel_values`` ``(N, C*T*p*p)`` of images with ``grid_thw`` ``(n, 3)`` -> ``(N / merge**2, hidden_size)``.

        Rows of all images are concatenated; each image (and each temporal slice) attends only
        to itself.
        """
        grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        n_rows = int(np.sum(np.prod(grid, axis=1)))
        if pixel_values.shape[0] != n_rows:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but grid_thw {grid.tolist()} needs {n_rows}")
        rope = vision_rope(grid_position_ids(grid, self.merge_size), self.rope_dim)
        mask = self.segment_mask(grid)
        x = self.patch_embed(pixel_values)
        for block in self.blocks:
            x = block(x, rope, mask)
        return self.merger(x)

    @staticmethod
    def segment_mask(grid: np.ndarray) -> mx.array | None:
        """Boolean block-diagonal ``(N, N)`` mask (True = attend), or None for a single segment."""
        seg = segment_ids(grid)
        if seg.size == 0 or seg[-1] == 0:
            return None
        return mx.array(seg[:, None] == seg[None, :])
