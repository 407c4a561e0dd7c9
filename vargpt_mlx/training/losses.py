"""Training forwards and losses, the same math as upstream's VARGPT-v1.1 SFT branch
(``VARGPTQwen2VLForConditionalGeneration.forward`` with ``pixel_gen_values``, ``version == 1.1``).

* ``t2i_sft_loss``: text cross-entropy + 3.0 x bit-label cross-entropy for a text-to-image sample.
  Upstream's text CE trains on *every* token except ``<|image_gen_pad|>`` (system and user prompt
  included: ``labels`` is only used as an "is not None" flag). ``text_loss="assistant"`` gives the
  corrected variant that only counts the supervised (labels != -100) tokens.
* ``und_sft_loss``: ordinary causal-LM CE on labels (mean over labels != -100), with image
  features scattered in; plain positions by default, as upstream's training pipeline feeds it.

Bitwise self-correction is a trainer option (``SFTTask(bit_flip=...)``); condition dropout is
not reproduced (the nano recipe trains the unconditional branch as inference runs it instead,
``uncond_bit_loss``).

``positions``: ``"plain"`` (0..T-1, what upstream's training feeds) or ``"inference"`` (what the
inference code computes for the same tokens: M-RoPE ``get_rope_index`` over the prompt and, for a
generation sample, over the prompt plus ``<|image_gen_start|>``, then plain cache positions for the
image tokens, as ``prefill_prompt`` / ``draw_images`` do). They differ only for prompts
holding images.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models import bsq
from ..models.rope_index import plain_position_ids
from ..models.vargpt import VARGPT, embed_multimodal, scatter_rows

IGNORE_INDEX = -100
BIT_LOSS_WEIGHT = 3.0


@dataclass
class T2ILoss:
    loss: mx.array
    text_ce: mx.array
    bit_ce: mx.array
    bit_ce_weighted: mx.array
    bit_logits: mx.array  # (B, L, 64)
    gt_bits: mx.array  # (B, L, 32)
    text_logits: mx.array  # (B, T, vocab)


def scale_weights(schedule: list[tuple[int, int]]) -> mx.array:
    """upstream reweight_loss_by_scale: sqrt(area_last)/sqrt(area_k) per token, normalised to 1."""
    last = schedule[-1][0] * schedule[-1][1]
    lw = np.concatenate([np.full(h * w, np.sqrt(last) / np.sqrt(h * w), dtype=np.float32) for h, w in schedule])
    return mx.array(lw / lw.sum(dtype=np.float32))


def bit_ce(bit_logits: mx.array, gt_bits: mx.array, schedule: list[tuple[int, int]],
           reweight: bool = False) -> mx.array:
    """Scalar bit cross-entropy of (B, L, 64) logits against (B, L, 32) bits.

    ``reweight=False`` is VARGPT's value: the plain mean over every token and bit (its
    ``forward`` multiplies the per-scale weights into the already-reduced mean, a no-op).
    ``reweight=True`` is what Infinity's own trainer computes (``var_model/trainer.py``,
    ``reweight_loss_by_scale``): the per-token mean over bits weighted by ``scale_weights``, so
    the first scales, one token of 121 at 128 px, are not drowned by the last.
    """
    B, L, _ = bit_logits.shape
    lw = scale_weights(schedule)
    logits, bits = bit_logits.astype(mx.float32).reshape(B, L, -1, 2), gt_bits.astype(mx.int32)
    if not reweight:  # upstream's arithmetic exactly, weights and all
        return (nn.losses.cross_entropy(logits, bits, reduction="mean") * lw).sum()
    return (nn.losses.cross_entropy(logits, bits, reduction="none").mean(axis=-1) * lw).sum(axis=-1).mean()


def masked_ce(logits: mx.array, targets: mx.array, ignore: mx.array) -> mx.array:
    """Mean cross-entropy over positions where ``ignore`` is false (torch CE, reduction='mean')."""
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.where(ignore, 0, targets), reduction="none")
    keep = (~ignore).astype(mx.float32)
    return (ce * keep).sum() / keep.sum()


def t2i_sft_loss(model: VARGPT, input_ids: mx.array, pixel_gen_values: mx.array,
                 schedule: list[tuple[int, int]], labels: mx.array | None = None,
                 text_loss: str = "upstream") -> T2ILoss:
    """Upstream ``get_gen_loss_1_1`` for one text-to-image sample.

    ``input_ids`` (1, T) holds ``<|image_gen_start|> <|image_gen_pad|> x N <|image_gen_end|>``;
    ``pixel_gen_values`` (1, H, W, 3) in [-1, 1] at the schedule's pixel size.
    """
    tok = model.config.tokens
    # 1. ground-truth bits and teacher-forcing inputs from the VAE (flip strength 0)
    feats = model.vae_local.encode_features(pixel_gen_values)
    bits, x_wo_prefix, _ = bsq.encode_multiscale(feats, schedule)
    gt = mx.concatenate([b.reshape(b.shape[0], -1, b.shape[-1]) for b in bits], axis=1)
    # 2-4. Infinity inputs into the pad slots, LLM forward (plain positions), Infinity on the
    # pad-slot states cross-attending to the prompt states
    hidden, bit_logits = gen_forward(model, input_ids, x_wo_prefix, schedule)
    text_logits = model.lm_head(hidden)
    # 5. losses
    targets = input_ids[:, 1:]
    if text_loss == "upstream":
        ignore = targets == tok.image_gen_pad_token_id
    elif text_loss == "assistant":
        if labels is None:
            raise ValueError("text_loss='assistant' needs labels")
        ignore = (labels[:, 1:] == IGNORE_INDEX) | (targets == tok.image_gen_pad_token_id)
    else:
        raise ValueError(f"unknown text_loss {text_loss!r}")
    text_ce = masked_ce(text_logits[:, :-1], targets, ignore)
    B, Lb, _ = bit_logits.shape
    bit_ce = nn.losses.cross_entropy(bit_logits.reshape(B, Lb, -1, 2), gt.astype(mx.int32), reduction="mean")
    # upstream applies the per-scale weights to the already-reduced scalar: a no-op scaling by sum(lw)
    bit_ce_weighted = (bit_ce * scale_weights(schedule)).sum()
    loss = text_ce + BIT_LOSS_WEIGHT * bit_ce_weighted
    return T2ILoss(loss, text_ce, bit_ce, bit_ce_weighted, bit_logits, gt, text_logits)


def und_sft_loss(model: VARGPT, input_ids: mx.array, labels: mx.array, pixel_values=None,
                 image_grid_thw=None, mrope: bool = False) -> mx.array:
    """Causal-LM CE on ``labels`` (shifted), image features scattered into the image pads.

    ``mrope=False`` feeds plain 0..L-1 positions, as upstream training does.
    """
    embeds = embed_multimodal(model, input_ids, pixel_values, image_grid_thw)
    B, T = input_ids.shape
    if mrope:
        pos, _ = model.rope_index(np.array(input_ids), image_grid_thw)
    else:
        pos = plain_position_ids(B, T)
    hidden = model.model(embeds, mx.array(pos))
    logits = model.lm_head(hidden)
    targets = labels[:, 1:]
    return masked_ce(logits[:, :-1], targets, targets == IGNORE_INDEX)


# ------------------------------------------------------------------------------------------
# Trainer building blocks (LoRA SFT / DPO). Same math as the functions above, with three
# practical differences that leave the numbers unchanged:
#   * ground-truth bits and teacher inputs come in precomputed (the VAE is frozen, so they are
#     computed once per target image instead of every step);
#   * ``lm_head`` runs only on the rows whose next token is a target (the vocabulary projection
#     of 2,560 image-pad rows is never needed: upstream ignores those targets);
#   * an edit sample's input images go through the vision tower (``embed_multimodal``).
# ------------------------------------------------------------------------------------------
@dataclass
class SampleLoss:
    loss: mx.array  # scalar: text_ce (+ 3.0 x bit_ce_weighted for generation samples)
    text_ce: mx.array
    bit_ce: mx.array | None  # the weighted bit CE (upstream's value), None without image
    bit_logits: mx.array | None  # (1, L, 64)


def text_target_rows(input_ids: np.ndarray, labels: np.ndarray | None, image_gen_pad_id: int,
                     text_loss: str = "upstream", has_image_gen: bool = False) -> np.ndarray:
    """Rows p whose next token ``input_ids[p + 1]`` is a text-loss target.

    ``upstream``: for generation samples every token except ``<|image_gen_pad|>`` (upstream
    ``get_gen_loss_1_1`` ignores ``labels``); for understanding samples the labelled tokens.
    ``assistant``: only labelled tokens (the assistant's answer), pads excluded.
    """
    ids = np.asarray(input_ids).reshape(-1)
    targets = ids[1:]
    if text_loss not in ("upstream", "assistant"):
        raise ValueError(f"unknown text_loss {text_loss!r}")
    keep = targets != image_gen_pad_id
    if text_loss == "assistant" or not has_image_gen:
        if labels is None:
            raise ValueError("labels are needed for this text loss")
        keep &= np.asarray(labels).reshape(-1)[1:] != IGNORE_INDEX
    return np.nonzero(keep)[0]


def training_positions(model: VARGPT, ids_np: np.ndarray, image_grid_thw=None, positions: str = "plain",
                       is_gen: bool = False) -> np.ndarray:
    """(3, 1, T) position ids of a training sample (see the module docstring)."""
    T = ids_np.shape[1]
    if positions == "plain":
        return plain_position_ids(1, T)
    if positions != "inference":
        raise ValueError(f"unknown positions {positions!r} (plain or inference)")
    tok = model.config.tokens
    n = int(np.nonzero(ids_np[0] == tok.image_gen_start_token_id)[0][0]) + 1 if is_gen else T
    pos, _ = model.rope_index(ids_np[:, :n], image_grid_thw)
    return np.concatenate([pos, plain_position_ids(1, T - n, offset=n)], axis=2) if n < T else pos


def gen_forward(model: VARGPT, input_ids: mx.array, x_wo_prefix: mx.array, schedule: list[tuple[int, int]],
                pixel_values=None, image_grid_thw=None, positions: str = "plain") -> tuple[mx.array, mx.array]:
    """The training forward of ``t2i_sft_loss`` steps 2-4 on precomputed teacher inputs.

    Returns ``(hidden (1, T, H), bit_logits (1, L, 64))``.
    """
    tok = model.config.tokens
    inf = model.vargpt_gen
    ids_np = np.asarray(input_ids)
    sid = tok.image_gen_start_token_id
    cond_BD = inf.condition(model.sos_embedding(mx.array([0])))  # image_gen_start's row (``sos_row``)
    x_BLC = mx.concatenate([inf.sos_tokens(cond_BD), inf.word_embed(x_wo_prefix.astype(cond_BD.dtype))], axis=1)
    pad_mask = ids_np == tok.image_gen_pad_token_id
    n_pad = int(pad_mask.sum())
    L = x_BLC.shape[1]
    if n_pad < L:
        raise ValueError(f"sample has {n_pad} <|image_gen_pad|> slots, the schedule needs {L}")
    x_BLC = mx.concatenate([x_BLC, mx.zeros((1, n_pad - L, x_BLC.shape[-1]), x_BLC.dtype)], axis=1)
    x_SH = model.image_gen_projector(x_BLC)
    embeds = embed_multimodal(model, input_ids, pixel_values, image_grid_thw)
    embeds = scatter_rows(embeds, mx.array(pad_mask), x_SH[0])
    pos = training_positions(model, ids_np, image_grid_thw, positions, is_gen=True)
    hidden = model.model(embeds, mx.array(pos))
    pad_idx = mx.array(np.nonzero(pad_mask[0])[0])
    inf_in = model.image_gen_projector_out(hidden[:, pad_idx])
    start_pos = int(np.nonzero(ids_np[0] == sid)[0][0])
    ca_kv = model.image_gen_projector_out(hidden[0, :start_pos])
    bit_logits = inf.forward_train(inf_in, cond_BD, [ca_kv], schedule)
    return hidden, bit_logits


def und_forward(model: VARGPT, input_ids: mx.array, pixel_values=None, image_grid_thw=None,
                positions: str = "plain") -> mx.array:
    """Hidden states (1, T, H) of an understanding sample (plain positions: upstream training)."""
    embeds = embed_multimodal(model, input_ids, pixel_values, image_grid_thw)
    pos = training_positions(model, np.asarray(input_ids), image_grid_thw, positions)
    return model.model(embeds, mx.array(pos))


def _row_logits(model: VARGPT, hidden: mx.array, rows: np.ndarray) -> mx.array:
    return model.lm_head(hidden[0, mx.array(rows)]).astype(mx.float32)


def sample_sft_loss(model: VARGPT, input_ids: mx.array, labels: mx.array | np.ndarray, *,
                    gt_bits: mx.array | None = None, x_wo_prefix: mx.array | None = None,
                    schedule: list[tuple[int, int]] | None = None, pixel_values=None, image_grid_thw=None,
                    text_loss: str = "upstream", positions: str = "plain", reweight: bool = False) -> SampleLoss:
    """SFT loss of one sample: ``und_sft_loss`` without a generation target, else upstream's
    ``text_ce + 3.0 x bit_ce`` (``t2i_sft_loss``) from precomputed GT bits / teacher inputs
    (``reweight``: see ``bit_ce``)."""
    tok = model.config.tokens
    ids_np = np.asarray(input_ids)
    is_gen = gt_bits is not None
    rows = text_target_rows(ids_np, np.asarray(labels), tok.image_gen_pad_token_id, text_loss, is_gen)
    if is_gen:
        hidden, bit_logits = gen_forward(model, input_ids, x_wo_prefix, schedule, pixel_values, image_grid_thw,
                                         positions)
    else:
        hidden, bit_logits = und_forward(model, input_ids, pixel_values, image_grid_thw, positions), None
    targets = mx.array(ids_np[0, rows + 1])
    text_ce = nn.losses.cross_entropy(_row_logits(model, hidden, rows), targets, reduction="mean")
    if not is_gen:
        return SampleLoss(text_ce, text_ce, None, None)
    bit = bit_ce(bit_logits, gt_bits, schedule, reweight)
    return SampleLoss(text_ce + BIT_LOSS_WEIGHT * bit, text_ce, bit, bit_logits)


def bit_logprobs(bit_logits: mx.array, gt_bits: mx.array) -> mx.array:
    """log p(gt bit) for every bit: (B, L, 32) from logits (B, L, 64) (columns 2j / 2j+1 = bit j
    being 0 / 1)."""
    B, L, _ = bit_logits.shape
    logp = nn.log_softmax(bit_logits.astype(mx.float32).reshape(B, L, -1, 2), axis=-1)
    return mx.take_along_axis(logp, gt_bits.astype(mx.int32)[..., None], axis=-1)[..., 0]


def sample_logprob(model: VARGPT, input_ids: mx.array, labels: mx.array | np.ndarray, *,
                   gt_bits: mx.array | None = None, x_wo_prefix: mx.array | None = None,
                   schedule: list[tuple[int, int]] | None = None, pixel_values=None,
                   image_grid_thw=None, positions: str = "plain") -> tuple[mx.array, int]:
    """Teacher-forced log-probability of a sample's answer: the summed log-probs of its labelled
    text tokens (``<|image_gen_pad|>`` excluded) plus, for a generation sample, of every GT bit
    of the image. Returns ``(sum, number of terms)``."""
    tok = model.config.tokens
    ids_np = np.asarray(input_ids)
    is_gen = gt_bits is not None
    rows = text_target_rows(ids_np, np.asarray(labels), tok.image_gen_pad_token_id, "assistant", is_gen)
    if is_gen:
        hidden, bit_logits = gen_forward(model, input_ids, x_wo_prefix, schedule, pixel_values, image_grid_thw,
                                         positions)
    else:
        hidden = und_forward(model, input_ids, pixel_values, image_grid_thw, positions)
    logits = _row_logits(model, hidden, rows)
    targets = mx.array(ids_np[0, rows + 1])
    logp = (mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)).sum()
    n = int(rows.shape[0])
    if is_gen:
        logp = logp + bit_logprobs(bit_logits, gt_bits).sum()
        n += int(gt_bits.size)
    return logp, n


def uncond_bit_loss(model: VARGPT, x_wo_prefix: mx.array, gt_bits: mx.array, schedule: list[tuple[int, int]],
                    n_memory: int, reweight: bool = False) -> mx.array:
    """Bit CE of the unconditional CFG branch, computed as ``autoregressive_infer_cfg`` runs it
    (upstream's quirk kept): start row ``cfg_uncond[0]``; every scale alone through the LLM with no
    prompt, no cache and positions 0..hw-1; the same next-scale inputs as the cond branch; the
    cross-attention memory is the raw ``cfg_uncond[:n_memory]`` (n = the prompt length)."""
    inf = model.vargpt_gen
    cond_BD = inf.condition(inf.cfg_uncond[:1])
    x_BLC = mx.concatenate([inf.sos_tokens(cond_BD), inf.word_embed(x_wo_prefix.astype(cond_BD.dtype))], axis=1)
    x_SH = model.image_gen_projector(x_BLC)
    outs, s = [], 0
    for h, w in schedule:
        n = h * w
        outs.append(model.model(x_SH[:, s:s + n], mx.array(plain_position_ids(1, n))))
        s += n
    inf_in = model.image_gen_projector_out(mx.concatenate(outs, axis=1))
    bit_logits = inf.forward_train(inf_in, cond_BD, [inf.cfg_uncond[:n_memory]], schedule)
    return bit_ce(bit_logits, gt_bits, schedule, reweight)
