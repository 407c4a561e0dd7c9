"""Next-scale image generation, exactly as upstream ``autoregressive_infer_cfg`` runs it.

Per scale k (FACTS §5.3):

1. cond LLM pass on the generation KV cache (prompt + ``<|image_gen_start|>`` + earlier scales),
   positions = plain cache positions (upstream ignores ``rope_deltas`` here);
2. uncond LLM pass with *no* prompt and *no* cache, positions 0..hw-1 (upstream quirk);
3. ``image_gen_projector_out`` -> Infinity blocks (KV cache across scales) -> bit logits;
4. CFG on logits after ``1/tau``; bit choice (argmax, or seeded top-k/top-p sampling);
5. codes accumulate into the full-resolution sum; the next scale's input is the sum resized
   to the next grid, embedded by ``word_embed`` and ``image_gen_projector``.

Finally the BSQ VAE decodes the summed codes into pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

from .. import sampling, schedules
from ..models import bsq
from ..models.rope_index import get_rope_index, plain_position_ids
from ..models.vargpt import VARGPT, embed_multimodal
from ..models.vae import to_uint8


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
class GenerationResult:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    bits: list[mx.array]  # per scale (1, h, w, 32) uint8
    summed_codes: mx.array  # (1, Hf, Wf, 32)
    schedule: list[tuple[int, int]]
    trace: dict[str, mx.array] = field(default_factory=dict)


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
    pos, _ = get_rope_index(ids, image_grid_thw, None, image_token_id=tok.image_token_id,
                            video_token_id=tok.video_token_id,
                            vision_start_token_id=tok.vision_start_token_id,
                            spatial_merge_size=model.config.vision.spatial_merge_size)
    ids_mx = mx.array(ids)
    embeds = embed_multimodal(model, ids_mx, pixel_values, image_grid_thw)
    cache = model.model.make_cache()
    hidden = model.model(embeds, mx.array(pos), cache=cache)
    return cache, hidden[0]


def generate_image(
    model: VARGPT,
    input_ids: np.ndarray,
    settings: GenerationSettings | None = None,
    *,
    pixel_values=None,
    image_grid_thw=None,
    **kwargs,
) -> GenerationResult:
    """Generate one image for a prompt (token ids ending with ``<|im_start|>assistant\\n``).

    Prefills the prompt plus ``<|image_gen_start|>`` and runs ``generate_from_prefill``
    (see there for the keyword arguments).
    """
    cache, hidden = prefill_prompt(model, input_ids, pixel_values, image_grid_thw)
    return generate_from_prefill(model, cache, hidden, settings, **kwargs)


def generate_from_prefill(
    model: VARGPT,
    cache: list,
    hidden: mx.array,
    settings: GenerationSettings | None = None,
    *,
    schedule: list[tuple[int, int]] | None = None,
    teacher_bits: list[mx.array] | None = None,
    trace: bool = False,
    on_scale: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Draw an image from an LLM state that has just consumed ``<|image_gen_start|>``.

    ``cache``: the LLM KV cache holding the whole context up to and including the start token
    (it grows by every scale's tokens). ``hidden`` (n + 1, H): final-norm hidden states of every
    context token, the start token last (a chat session keeps these as it goes).
    ``schedule``: explicit list of (h, w) scales (default: from ``settings.pn`` / ``aspect``).
    ``teacher_bits``: force these bits per scale (teacher forcing, used for parity checks).
    ``trace``: keep every per-scale tensor upstream's reference run records.
    ``on_scale(k, n_scales)``: progress callback after each scale.
    """
    s = settings or GenerationSettings()
    cfg = model.config
    schedule = schedule or schedules.get_schedule(s.pn or cfg.pn, s.aspect)
    rope_grid = schedules.rope_grid(schedule[-1][0] / schedule[-1][1])
    inf = model.vargpt_gen
    proj_in, proj_out = model.image_gen_projector, model.image_gen_projector_out
    key = mx.random.key(s.seed)
    rec: dict[str, mx.array] = {}

    prompt_hidden = hidden[:-1]  # cross-attention memory source: the start row is dropped
    n = prompt_hidden.shape[0]
    if n > cfg.infinity.text_maxlen:
        # the uncond memory is cfg_uncond[:n]; upstream crashes past its 512 rows
        raise ValueError(f"the context is {n} tokens; image generation supports at most "
                         f"{cfg.infinity.text_maxlen} (upstream limit of the unconditional memory)")
    ca_kv = [proj_out(prompt_hidden), inf.cfg_uncond[:n]]
    cond_BD = inf.condition(model.sos_rows())
    x = proj_in(inf.sos_tokens(cond_BD))  # (2, 1, H): cond and uncond differ at scale 0
    if trace:
        rec.update({"gen.ca_src_hidden": prompt_hidden, "gen.ca_kv_cond": ca_kv[0], "gen.cond_BD": cond_BD,
                    "gen.next_token": mx.argmax(model.lm_head(hidden[-1]), axis=-1)})

    inf_cache = inf.make_cache()
    Hf, Wf = schedule[-1]
    summed = mx.zeros((1, Hf, Wf, cfg.infinity.codebook_dim), dtype=mx.float32)
    bits_out: list[mx.array] = []
    for k, (h, w) in enumerate(schedule):
        pos_c = _position_ids(cache[0].offset, h * w)  # cache positions; rope_deltas ignored (upstream)
        pos_u = _position_ids(0, h * w)  # uncond: no prompt, no cache (upstream quirk)
        out_c = model.model(x[:1], pos_c, cache=cache)
        out_u = model.model(x[1:], pos_u, cache=None)
        inf_in = proj_out(mx.concatenate([out_c, out_u], axis=0))
        raw = inf.forward_scale(inf_in, cond_BD, ca_kv, k, schedule, inf_cache, rope_grid=rope_grid)
        logits = sampling.cfg_logits(raw, s.cfg, s.tau)
        key, sub = mx.random.split(key)
        if teacher_bits is not None:
            bits = teacher_bits[k].reshape(1, h * w, -1).astype(mx.uint8)
        else:
            bits = sampling.choose_bits(logits, top_k=s.top_k, top_p=s.top_p, key=sub, argmax=s.argmax)
        bits = bits.reshape(1, h, w, -1)
        bits_out.append(bits)
        codes = bsq.bits_to_codes(bits)
        last = k == len(schedule) - 1
        summed = summed + (codes if last else bsq.upsample_trilinear(codes, (Hf, Wf)))
        if trace:
            p = f"gen.s{k}."
            rec.update({p + "llm_pos_cond": pos_c, p + "llm_pos_uncond": pos_u, p + "llm_in_cond": x[:1], p + "llm_in_uncond": x[1:], p + "llm_out_cond": out_c,
                        p + "llm_out_uncond": out_u, p + "inf_in": inf_in, p + "bit_logits_raw": raw,
                        p + "bit_logits_cfg": logits, p + "bits": bits})
        if not last:
            nh, nw = schedule[k + 1]
            nxt = bsq.next_scale_input(summed, (nh, nw))
            x_h = proj_in(inf.word_embed(nxt))
            x = mx.concatenate([x_h, x_h], axis=0)
            if trace:
                rec[f"gen.s{k + 1}.next_in_codes"] = nxt
        mx.eval(summed, x, cache[0].keys if cache[0].keys is not None else summed)
        if on_scale is not None:
            on_scale(k, len(schedule))

    decoded = model.vae_local.decode(summed)
    image = to_uint8(decoded)[0]
    if trace:
        rec.update({"gen.summed_codes": summed, "gen.decoded": decoded})
    return GenerationResult(image=image, bits=bits_out, summed_codes=summed, schedule=schedule, trace=rec)
