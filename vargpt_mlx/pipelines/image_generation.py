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

Several images for one prompt (``generate_images`` / ``generate_images_from_prefill``): the
prompt is prefilled once; a batch of B images continues B copies of that KV cache (keys/values
repeated along the batch axis) and every per-scale step runs batched, Infinity rows ordered
``[cond_0..cond_{B-1}, uncond_0..uncond_{B-1}]``. Image i samples with its own key,
``mx.random.key(seed + i)``, split once per scale exactly as a single draw does, so image i of a
batch equals the one-image draw with seed ``seed + i`` (checked bit for bit on the fixture).
``mx.compile`` is not used: on the CPU backend it did not speed up the per-scale step or the VAE
decode (see ``benchmarks/README.md``), and the per-scale shapes change every scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from .. import sampling, schedules
from ..models import bsq
from ..models.infinity import CrossMemory
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
    image: np.ndarray | None  # (H, W, 3) uint8 RGB (None when drawn with ``decode=False``)
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
    (it grows by every scale's tokens, as upstream's cache does). ``hidden`` (n + 1, H):
    final-norm hidden states of every context token, the start token last (a chat session keeps
    these as it goes).
    ``schedule``: explicit list of (h, w) scales (default: from ``settings.pn`` / ``aspect``).
    ``teacher_bits``: force these bits per scale (teacher forcing, used for parity checks).
    ``trace``: keep every per-scale tensor upstream's reference run records.
    ``on_scale(k, n_scales)``: progress callback after each scale.
    """
    s = settings or GenerationSettings()
    return _generate(model, cache, hidden, s, seeds=[s.seed], schedule=schedule,
                     teacher_bits=teacher_bits, trace=trace, on_scale=on_scale)[0]


def image_seeds(seed: int, n: int) -> list[int]:
    """Seeds of ``n`` images drawn with ``seed``: ``seed, seed + 1, ..., seed + n - 1``.

    Image ``i`` of a batch is the image a single draw with seed ``seed + i`` gives (the batch only
    shares the prompt prefill and runs the per-scale passes of all images together).
    """
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


def generate_images_from_prefill(
    model: VARGPT,
    cache: list,
    hidden: mx.array,
    settings: GenerationSettings | None = None,
    *,
    n: int = 1,
    batch_size: int | None = None,
    schedule: list[tuple[int, int]] | None = None,
    on_scale: Callable[[int, int], None] | None = None,
    decode: bool = True,
) -> list[GenerationResult]:
    """``n`` images from one prefilled context (``cache`` / ``hidden`` as in ``generate_from_prefill``).

    The prompt is prefilled once; each group of at most ``batch_size`` images (default: all ``n``
    at once) continues its own copy of ``cache`` (keys/values repeated along the batch axis), and
    the per-scale LLM, Infinity and sampling steps of the group run batched. Image ``i`` uses
    seed ``settings.seed + i`` (:func:`image_seeds`) and equals a single draw with that seed.
    ``cache`` itself is not modified. ``on_scale(k, n_scales)`` is called after each scale of
    each group. ``decode=False`` skips the VAE (``image`` is ``None``; bits and codes are kept).
    """
    s = settings or GenerationSettings()
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    bs = n if batch_size is None else batch_size
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = image_seeds(s.seed, n)
    results: list[GenerationResult] = []
    for start in range(0, n, bs):
        group = seeds[start:start + bs]
        results += _generate(model, repeat_cache(cache, len(group)), hidden, s, seeds=group,
                             schedule=schedule, on_scale=on_scale, decode=decode)
    return results


def generate_images(
    model: VARGPT,
    input_ids: np.ndarray,
    settings: GenerationSettings | None = None,
    *,
    n: int = 1,
    batch_size: int | None = None,
    pixel_values=None,
    image_grid_thw=None,
    schedule: list[tuple[int, int]] | None = None,
    on_scale: Callable[[int, int], None] | None = None,
    decode: bool = True,
) -> list[GenerationResult]:
    """``n`` images for one prompt: a single prefill, then ``generate_images_from_prefill``."""
    cache, hidden = prefill_prompt(model, input_ids, pixel_values, image_grid_thw)
    return generate_images_from_prefill(model, cache, hidden, settings, n=n, batch_size=batch_size,
                                        schedule=schedule, on_scale=on_scale, decode=decode)


def _generate(
    model: VARGPT,
    cache: list,
    hidden: mx.array,
    s: GenerationSettings,
    *,
    seeds: list[int],
    schedule: list[tuple[int, int]] | None = None,
    teacher_bits: list[mx.array] | None = None,
    trace: bool = False,
    on_scale: Callable[[int, int], None] | None = None,
    decode: bool = True,
) -> list[GenerationResult]:
    """The generation loop for ``B = len(seeds)`` images sharing one context.

    ``cache`` must hold ``B`` rows (``repeat_cache``); it is extended in place. Rows of the
    Infinity batch are ``[cond_0 .. cond_{B-1}, uncond_0 .. uncond_{B-1}]``.
    """
    B = len(seeds)
    if B < 1:
        raise ValueError("at least one image is needed")
    if (trace or teacher_bits is not None) and B != 1:
        raise ValueError("trace / teacher_bits need a single image")
    cfg = model.config
    schedule = schedule or schedules.get_schedule(s.pn or cfg.pn, s.aspect)
    rope_grid = schedules.rope_grid(schedule[-1][0] / schedule[-1][1])
    inf = model.vargpt_gen
    proj_in, proj_out = model.image_gen_projector, model.image_gen_projector_out
    keys = [mx.random.key(seed) for seed in seeds]
    rec: dict[str, mx.array] = {}

    prompt_hidden = hidden[:-1]  # cross-attention memory source: the start row is dropped
    n = prompt_hidden.shape[0]
    if n > cfg.infinity.text_maxlen:
        # the uncond memory is cfg_uncond[:n]; upstream crashes past its 512 rows
        raise ValueError(f"the context is {n} tokens; image generation supports at most "
                         f"{cfg.infinity.text_maxlen} (upstream limit of the unconditional memory)")
    kv_cond = proj_out(prompt_hidden)
    kv_uncond = inf.cfg_uncond[:n]
    memory = CrossMemory(mx.concatenate([
        mx.broadcast_to(kv_cond[None], (B, *kv_cond.shape)),
        mx.broadcast_to(kv_uncond[None].astype(kv_cond.dtype), (B, *kv_uncond.shape)),
    ]))
    cond_BD = inf.condition(model.sos_rows())  # (2, C): cond and uncond rows
    x = proj_in(inf.sos_tokens(cond_BD))  # (2, 1, H): cond and uncond differ at scale 0
    if B > 1:
        cond_BD = mx.repeat(cond_BD, B, axis=0)  # (2B, C): [cond]*B + [uncond]*B
        x = mx.repeat(x, B, axis=0)
    if trace:
        rec.update({"gen.ca_src_hidden": prompt_hidden, "gen.ca_kv_cond": kv_cond, "gen.cond_BD": cond_BD,
                    "gen.next_logits": model.lm_head(hidden[-1]),
                    "gen.next_token": mx.argmax(model.lm_head(hidden[-1]), axis=-1)})

    inf_cache = inf.make_cache()
    Hf, Wf = schedule[-1]
    summed = mx.zeros((B, Hf, Wf, cfg.infinity.codebook_dim), dtype=mx.float32)
    bits_out: list[mx.array] = []
    for k, (h, w) in enumerate(schedule):
        pos_c = _position_ids(cache[0].offset, h * w)  # cache positions; rope_deltas ignored (upstream)
        pos_u = _position_ids(0, h * w)  # uncond: no prompt, no cache (upstream quirk)
        out_c = model.model(x[:B], pos_c, cache=cache)
        out_u = model.model(x[B:], pos_u, cache=None)
        inf_in = proj_out(mx.concatenate([out_c, out_u], axis=0))
        raw = inf.forward_scale(inf_in, cond_BD, memory, k, schedule, inf_cache, rope_grid=rope_grid)
        logits = sampling.cfg_logits(raw, s.cfg, s.tau)  # (B, hw, 64)
        subs = []
        for i in range(B):
            keys[i], sub = mx.random.split(keys[i])
            subs.append(sub)
        if teacher_bits is not None:
            bits = teacher_bits[k].reshape(1, h * w, -1).astype(mx.uint8)
        elif s.argmax or B == 1:
            bits = sampling.choose_bits(logits, top_k=s.top_k, top_p=s.top_p, key=subs[0], argmax=s.argmax)
        else:  # one key per image: image i does not depend on the others
            bits = mx.concatenate([sampling.choose_bits(logits[i:i + 1], top_k=s.top_k, top_p=s.top_p,
                                                        key=subs[i]) for i in range(B)])
        bits = bits.reshape(B, h, w, -1)
        bits_out.append(bits)
        codes = bsq.bits_to_codes(bits)
        last = k == len(schedule) - 1
        summed = summed + (codes if last else bsq.upsample_trilinear(codes, (Hf, Wf)))
        if trace:
            p = f"gen.s{k}."
            rec.update({p + "llm_pos_cond": pos_c, p + "llm_pos_uncond": pos_u, p + "llm_in_cond": x[:1],
                        p + "llm_in_uncond": x[1:], p + "llm_out_cond": out_c, p + "llm_out_uncond": out_u,
                        p + "inf_in": inf_in, p + "bit_logits_raw": raw, p + "bit_logits_cfg": logits,
                        p + "bits": bits})
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

    # the KV caches are not needed for decoding: drop this frame's references so that their memory
    # (1.3 GB per image at 512x512 in bf16 for the full-size Infinity cache) is free during the VAE
    del inf_cache, cache, memory, x
    results = []
    for i in range(B):  # decode one image at a time: bounds the VAE's activation memory
        if not decode:
            results.append(GenerationResult(image=None, bits=[b[i:i + 1] for b in bits_out],
                                            summed_codes=summed[i:i + 1], schedule=schedule))
            continue
        decoded = model.vae_local.decode(summed[i:i + 1])
        image = to_uint8(decoded)[0]
        if trace:
            rec.update({"gen.summed_codes": summed, "gen.decoded": decoded})
        results.append(GenerationResult(image=image, bits=[b[i:i + 1] for b in bits_out],
                                        summed_codes=summed[i:i + 1], schedule=schedule,
                                        trace=rec if trace else {}))
    return results
