"""Exact stand-in for the two ``flash_attn`` functions the upstream VARGPT code imports.

Only for machines without the real ``flash_attn`` (no CUDA). The recorder puts the folder holding
this package on ``sys.path`` inside its own process, and only when ``import flash_attn`` would
fail otherwise. ``flash_attn.ops`` is deliberately absent, so upstream takes its plain-PyTorch
fallbacks for the fused norms / MLP.

Semantics (flash-attn 2.x varlen API): packed sequences delimited by ``cu_seqlens``; grouped-query
heads (query head ``h`` reads key/value head ``h // (H / Hk)``); ``softmax_scale`` (default
``1/sqrt(d)``); ``causal`` with bottom-right alignment (query ``i`` of a segment with ``Lq``
queries and ``Lk`` keys sees keys ``j <= i + Lk - Lq``; a query that sees no key returns 0).
Arithmetic: scores, softmax and the weighted sum in float32 from the given (possibly bf16) inputs;
the result is cast to ``q.dtype``, as the real kernel returns it. (The real kernel also rounds the
probabilities to bf16 inside its tiles; this stand-in does not, which is the exact math.)
"""

from __future__ import annotations

import math

import torch

__version__ = "2.7.3"  # the version upstream's requirements name; a stand-in, not that package
STANDIN = True


def _segment_attention(q, k, v, scale, causal):
    # q (Lq, H, d), k / v (Lk, Hk, d) -> (Lq, H, d) float32
    Lq, H, _ = q.shape
    Lk, Hk, _ = k.shape
    if H % Hk:
        raise ValueError(f"{H} query heads do not group over {Hk} key/value heads")
    rep = H // Hk
    qf = q.float().transpose(0, 1)  # (H, Lq, d)
    kf = k.float().transpose(0, 1).repeat_interleave(rep, dim=0)  # (H, Lk, d)
    vf = v.float().transpose(0, 1).repeat_interleave(rep, dim=0)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale
    if causal:
        i = torch.arange(Lq).view(-1, 1)
        j = torch.arange(Lk).view(1, -1)
        allowed = j <= i + (Lk - Lq)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # rows that see no key
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).transpose(0, 1)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                           block_table=None):
    """q (total_q, H, d), k / v (total_k, Hk, d) -> (total_q, H, d) in q.dtype."""
    if dropout_p:
        raise NotImplementedError("the flash_attn stand-in supports dropout_p=0 only")
    if tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None or block_table is not None:
        raise NotImplementedError("the flash_attn stand-in supports plain (windowless) attention only")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    if len(cq) != len(ck):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32, device=q.device)
    for s in range(len(cq) - 1):
        if cq[s + 1] > cq[s]:
            out[cq[s]:cq[s + 1]] = _segment_attention(q[cq[s]:cq[s + 1]], k[ck[s]:ck[s + 1]],
                                                      v[ck[s]:ck[s + 1]], scale, causal)
    out = out.to(q.dtype)
    if return_attn_probs:
        raise NotImplementedError("the flash_attn stand-in does not return attention probabilities")
    return out


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                    dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                    softcap=0.0, alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False):
    """q (total_q, H, d), kv (total_k, 2, Hk, d) -> (total_q, H, d) in q.dtype."""
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen=None, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                     deterministic=False, return_attn_probs=False):
    """qkv (total, 3, H, d) -> (total, H, d) in qkv.dtype."""
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen,
                                  max_seqlen, dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Batched: q (B, Lq, H, d), k / v (B, Lk, Hk, d) -> (B, Lq, H, d) in q.dtype."""
    B, Lq = q.shape[:2]
    Lk = k.shape[1]
    cq = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32)
    ck = torch.arange(0, (B + 1) * Lk, Lk, dtype=torch.int32)
    out = flash_attn_varlen_func(q.reshape(B * Lq, *q.shape[2:]), k.reshape(B * Lk, *k.shape[2:]),
                                 v.reshape(B * Lk, *v.shape[2:]), cq, ck, Lq, Lk, dropout_p, softmax_scale,
                                 causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)
    return out.reshape(B, Lq, *out.shape[1:])
