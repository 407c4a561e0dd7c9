"""Next-scale image generation: upstream's ``autoregressive_infer_cfg``
(``vargpt_qwen_v1_1/modeling_vargpt_qwen2_vl.py``) with CFG on logits, batched over images.

A batch of B images continues B copies of the prompt's KV cache; Infinity rows are
``[cond_0..cond_{B-1}, uncond_0..uncond_{B-1}]``. Image i samples with ``mx.random.key(seed + i)``,
split once per scale as a single draw does, so it equals the one-image draw with that seed.
``mx.compile`` is not used: on the CPU backend it did not speed up the per-scale step or the VAE
decode (``benchmarks/README.md``), and the per-scale shapes change every scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from .. import sampling, schedules
from ..models import bsq
from ..models.infinity import CrossMemory
from ..models.rope_index import plain_position_ids
from ..models.vargpt import VARGPT, embed_multimodal
from ..models.vae import to_uint8
from ..options import check_count


@dataclass
class GenerationSettings:
    """Image generation settings; defaults are upstream's hard-coded ones."""

    cfg: float = 3.0
    tau: float = 0.5
    top_k: int = 900
    top_p: float = 0.97
    argmax: bool = False  # bit = argmax (deterministic); the parity fixtures use this
    seed: int = 0
    pn: str | None = None  # None: the checkpoint's pn ('0.25M' for the real model)
    aspect: float | str = 1.0  # h/w, or "W:H" string such as "16:9"


@dataclass
class ScaleRecord:
    """Scale k's tensors in a traced draw (upstream's reference run records them as ``gen.s{k}.*``)."""

    llm_pos_cond: mx.array
    llm_pos_uncond: mx.array
    llm_in_cond: mx.array
    llm_in_uncond: mx.array
    llm_out_cond: mx.array
    llm_out_uncond: mx.array
    inf_in: mx.array
    bit_logits_raw: mx.array
    bit_logits_cfg: mx.array | None = None
    bits: mx.array | None = None
    next_in_codes: mx.array | None = None  # scale k+1's input codes (None at the last scale)


@dataclass
class GenerationTrace:
    """What a traced draw (``trace=True``) records besides its result."""

    ca_src_hidden: mx.array  # the context rows the cross-attention memory is made of
    ca_kv_cond: mx.array
    cond_BD: mx.array
    next_logits: mx.array  # the logits after <|image_gen_start|> (upstream's token t2)
    scales: list[ScaleRecord] = field(default_factory=list)
    decoded: mx.array | None = None


@dataclass
class GenerationResult:
    image: np.ndarray | None  # (H, W, 3) uint8 RGB (None when drawn with ``decode=False``)
    bits: list[mx.array]  # per scale (1, h, w, 32) uint8
    summed_codes: mx.array  # (1, Hf, Wf, 32)
    schedule: list[tuple[int, int]]
    trace: GenerationTrace | None = None


@dataclass
class _Condition:
    """What every scale of one batch attends to."""

    memory: CrossMemory  # cross-attention memory, [cond] * B + [uncond] * B
    cond_BD: mx.array  # (2B, C)
    sos: mx.array  # (2B, 1, H): the scale-0 LLM input (cond and uncond rows differ)
    kv_cond: mx.array  # the cond memory rows before broadcasting


def _position_ids(offset: int, length: int) -> mx.array:
    return mx.array(plain_position_ids(1, length, offset=offset))


def prefill_prompt(model: VARGPT, input_ids: np.ndarray, pixel_values=None, image_grid_thw=None):
    """Run the prompt plus ``<|image_gen_start|>`` through the LLM.

    Returns ``(cache, hidden)``: ``hidden`` (n + 1, H) are the final-norm hidden states of the
    prompt tokens and of the start token (the last row).
    """
    tok = model.config.tokens
    ids = np.concatenate([np.asarray(input_ids).reshape(1, -1),
                          np.array([[tok.image_gen_start_token_id]])], axis=1)
    pos, _ = model.rope_index(ids, image_grid_thw)
    ids_mx = mx.array(ids)
    embeds = embed_multimodal(model, ids_mx, pixel_values, image_grid_thw)
    cache = model.model.make_cache()
    hidden = model.model(embeds, mx.array(pos), cache=cache)
    return cache, hidden[0]


def image_seeds(seed: int, n: int) -> list[int]:
    """Seeds of ``n`` images drawn with ``seed``: ``seed, seed + 1, ..., seed + n - 1``."""
    return [seed + i for i in range(n)]


def repeat_cache(cache: list, n: int) -> list[KVCache]:
    """A batch of ``n`` copies of a batch-1 LLM KV cache (the caller's cache is left unchanged)."""
    out = []
    for c in cache:
        r = KVCache()
        if c.keys is not None:
            k, v = c.keys[..., :c.offset, :], c.values[..., :c.offset, :]
            r.keys = mx.repeat(k, n, axis=0) if n > 1 else mx.array(k)
            r.values = mx.repeat(v, n, axis=0) if n > 1 else mx.array(v)
            r.offset = c.offset
        out.append(r)
    return out


def draw_images(
    model: VARGPT,
    cache: list,
    hidden: mx.array,
    settings: GenerationSettings | None = None,
    *,
    n: int = 1,
    batch_size: int | None = None,
    schedule: list[tuple[int, int]] | None = None,
    teacher_bits: list[mx.array] | None = None,
    trace: bool = False,
    on_scale: Callable[[int, int], None] | None = None,
    decode: bool = True,
) -> list[GenerationResult]:
    """``n`` images from an LLM state that has just consumed ``<|image_gen_start|>``.

    ``cache`` / ``hidden``: ``prefill_prompt``'s result, or a chat's: the KV cache of the whole
    context and the final-norm hidden states of every context token, the start token last. The
    cache is not modified: each group of at most ``batch_size`` images (default: all) continues
    its own copy. Image ``i`` uses seed ``settings.seed + i``.
    ``schedule``: explicit (h, w) scales (default: from ``settings.pn`` / ``aspect``).
    ``teacher_bits``: force these bits per scale (parity checks); ``trace``: record every
    per-scale tensor in ``result.trace``; both need ``n == 1``.
    ``on_scale(k, n_scales)``: progress, after each scale of each group.
    ``decode=False`` skips the VAE (``image`` is ``None``).
    """
    s = settings or GenerationSettings()
    check_count(n, batch_size)  # the API's check, so direct callers get the same rule and message
    bs = n if batch_size is None else batch_size
    if (trace or teacher_bits is not None) and n != 1:
        raise ValueError("trace / teacher_bits need a single image")
    schedule = schedule or schedules.get_schedule(s.pn or model.config.pn, s.aspect)
    seeds = image_seeds(s.seed, n)
    results: list[GenerationResult] = []
    for start in range(0, n, bs):
        group = seeds[start:start + bs]
        results += autoregressive_infer_cfg(model, repeat_cache(cache, len(group)), hidden, s, group, schedule,
                                            teacher_bits=teacher_bits, trace=trace, on_scale=on_scale,
                                            decode=decode)
    return results


def autoregressive_infer_cfg(model: VARGPT, cache: list, hidden: mx.array, s: GenerationSettings,
                             seeds: list[int], schedule: list[tuple[int, int]], *,
                             teacher_bits: list[mx.array] | None = None, trace: bool = False,
                             on_scale: Callable[[int, int], None] | None = None,
                             decode: bool = True) -> list[GenerationResult]:
    """Upstream's loop for ``B = len(seeds)`` images; ``cache`` holds B rows, extended in place."""
    B = len(seeds)
    rope_grid = schedules.rope_grid(schedule[-1][0] / schedule[-1][1])
    cond = _condition(model, hidden, B)
    record = GenerationTrace(hidden[:-1], cond.kv_cond, cond.cond_BD, model.lm_head(hidden[-1])) if trace else None
    keys = [mx.random.key(seed) for seed in seeds]
    inf_cache = model.vargpt_gen.make_cache()
    x, summed, bits_per_scale = cond.sos, None, []
    for k, (h, w) in enumerate(schedule):
        raw, rec = _scale_logits(model, x, cache, cond, inf_cache, k, schedule, rope_grid)
        logits = sampling.cfg_logits(raw, s.cfg, s.tau)  # (B, hw, 2 * bits)
        bits = teacher_bits[k] if teacher_bits is not None else _draw_bits(logits, keys, s)
        bits = bits.reshape(B, h, w, -1).astype(mx.uint8)
        summed, x, next_codes = get_next_autoregressive_input(model, summed, bits, k, schedule)
        bits_per_scale.append(bits)
        if record is not None:
            record.scales.append(replace(rec, bit_logits_cfg=logits, bits=bits, next_in_codes=next_codes))
        mx.eval(summed, *(a for a in (x, cache[0].keys) if a is not None))
        if on_scale is not None:
            on_scale(k, len(schedule))
    # the KV caches are not needed for decoding: drop this frame's references so that their memory
    # (1.3 GB per image at 512x512 in bf16 for the full-size Infinity cache) is free during the VAE
    del inf_cache, cache, cond, x
    return _results(model, summed, bits_per_scale, schedule, record, decode)


def context_error(model: VARGPT, n: int, what: str = "context") -> str | None:
    """Why ``n`` context tokens cannot condition a drawing (None when they can): the unconditional
    branch's memory is ``cfg_uncond[:n]``, ``text_maxlen`` (512) rows; upstream crashes past them.
    The one home of this check for the pipeline, the API, chat and the server."""
    limit = model.config.infinity.text_maxlen
    if n > limit:
        return (f"the {what} is {n} tokens; image generation supports at most {limit} "
                "(upstream limit of the unconditional memory)")
    return None


def _condition(model: VARGPT, hidden: mx.array, B: int) -> _Condition:
    inf = model.vargpt_gen
    prompt_hidden = hidden[:-1]  # cross-attention memory source: the start row is dropped
    n = prompt_hidden.shape[0]
    if (msg := context_error(model, n)) is not None:
        raise ValueError(msg)
    kv_cond = model.image_gen_projector_out(prompt_hidden)
    kv_uncond = inf.cfg_uncond[:n]
    memory = CrossMemory(mx.concatenate([
        mx.broadcast_to(kv_cond[None], (B, *kv_cond.shape)),
        mx.broadcast_to(kv_uncond[None].astype(kv_cond.dtype), (B, *kv_uncond.shape)),
    ]))
    cond_BD = inf.condition(model.sos_rows())  # (2, C): cond and uncond rows
    sos = model.image_gen_projector(inf.sos_tokens(cond_BD))
    if B > 1:
        cond_BD, sos = mx.repeat(cond_BD, B, axis=0), mx.repeat(sos, B, axis=0)  # [cond] * B + [uncond] * B
    return _Condition(memory, cond_BD, sos, kv_cond)


def _scale_logits(model: VARGPT, x: mx.array, cache: list, cond: _Condition, inf_cache: list, k: int,
                  schedule, rope_grid) -> tuple[mx.array, ScaleRecord]:
    """Both CFG branches of scale k through the LLM and Infinity -> raw bit logits (2B, hw, 2 * bits).

    The cond branch continues the context's cache at plain cache positions (upstream ignores
    ``rope_deltas`` here); the uncond branch runs with no prompt and no cache at positions
    0..hw-1 (upstream's quirk)."""
    B = x.shape[0] // 2
    h, w = schedule[k]
    pos_c, pos_u = _position_ids(cache[0].offset, h * w), _position_ids(0, h * w)
    out_c = model.model(x[:B], pos_c, cache=cache)
    out_u = model.model(x[B:], pos_u, cache=None)
    inf_in = model.image_gen_projector_out(mx.concatenate([out_c, out_u], axis=0))
    raw = model.vargpt_gen.forward_scale(inf_in, cond.cond_BD, cond.memory, k, schedule, inf_cache,
                                         rope_grid=rope_grid)
    return raw, ScaleRecord(pos_c, pos_u, x[:B], x[B:], out_c, out_u, inf_in, raw)


def _draw_bits(logits: mx.array, keys: list[mx.array], s: GenerationSettings) -> mx.array:
    """Every image's bits from its own key (split once per scale): image i does not depend on the others."""
    subs = []
    for i in range(len(keys)):
        keys[i], sub = mx.random.split(keys[i])
        subs.append(sub)
    if s.argmax or len(keys) == 1:
        return sampling.choose_bits(logits, top_k=s.top_k, top_p=s.top_p, key=subs[0], argmax=s.argmax)
    return mx.concatenate([sampling.choose_bits(logits[i:i + 1], top_k=s.top_k, top_p=s.top_p, key=sub)
                           for i, sub in enumerate(subs)])


def get_next_autoregressive_input(model: VARGPT, summed: mx.array | None, bits: mx.array, k: int,
                                  schedule) -> tuple[mx.array, mx.array | None, mx.array | None]:
    """Upstream's ``get_next_autoregressive_input`` and the LLM input it makes: scale k's codes
    join the full-resolution sum; the next scale's input is the sum resized to its grid,
    word-embedded and projected, the same for both CFG branches.

    Returns ``(summed, next LLM input (2B, hw, H), its codes (B, hw, d))``, the last two ``None``
    after the last scale."""
    summed = bsq.add_scale_codes(summed, bits, k, schedule)
    if k == len(schedule) - 1:
        return summed, None, None
    codes = bsq.next_scale_input(summed, schedule[k + 1])
    x = next_scale_embedding(model, codes)
    return summed, mx.concatenate([x, x], axis=0), codes


def next_scale_embedding(model: VARGPT, codes: mx.array) -> mx.array:
    """The LLM input of a scale's codes: ``image_gen_projector(word_embed(codes))`` in the model's
    dtype. The float32 codes are cast first, as upstream's autocast casts a linear's input (and as
    training does): a bfloat16 model otherwise ran every later scale in float32, with float32 KV
    caches (measured on the full-size q4 model: 2.78 GiB of caches instead of 2.02)."""
    dtype = model.model.norm.weight.dtype  # the compute dtype (never quantized)
    return model.image_gen_projector(model.vargpt_gen.word_embed(codes.astype(dtype)))


def _results(model: VARGPT, summed: mx.array, bits_per_scale: list[mx.array], schedule,
             record: GenerationTrace | None, decode: bool) -> list[GenerationResult]:
    results = []
    for i in range(summed.shape[0]):  # decode one image at a time: bounds the VAE's activation memory
        image = None
        if decode:
            decoded = model.vae_local.decode(summed[i:i + 1])
            image = to_uint8(decoded)[0]
            if record is not None:
                record.decoded = decoded
        results.append(GenerationResult(image=image, bits=[b[i:i + 1] for b in bits_per_scale],
                                        summed_codes=summed[i:i + 1], schedule=schedule, trace=record))
    return results
