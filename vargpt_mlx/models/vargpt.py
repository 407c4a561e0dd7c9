"""The whole VARGPT-v1.1 model: every part under the attribute name upstream's state dict uses.

=========================  ==========================================  =======================
attribute / key prefix     part                                        file
=========================  ==========================================  =======================
``visual``                 Qwen2-VL vision tower                       ``models/vision.py``
``model``                  Qwen2 decoder with M-RoPE                   ``models/qwen2.py``
``lm_head``                untied LM head (Linear, no bias)            here
``vargpt_gen``             Infinity next-scale visual decoder          ``models/infinity.py``
``vae_local``              BSQ VAE (+ multi-scale bit quantizer)       ``models/vae.py``, ``models/bsq.py``
``sos_embedding``          start-of-image embedding (the one row used) here
``image_gen_projector``    Infinity width -> LLM hidden                ``models/projectors.py``
``image_gen_projector_out`` LLM hidden -> Infinity width               ``models/projectors.py``
=========================  ==========================================  =======================

``sanitize`` is the explicit key map from the upstream checkpoint to these modules: it routes
each key to its part's ``sanitize`` and records what is knowingly dropped.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import VARGPTConfig
from . import infinity as infinity_mod
from . import projectors as projectors_mod
from . import qwen2 as qwen2_mod
from . import vae as vae_mod
from . import vision as vision_mod
from .linear import Linear
from .rope_index import get_rope_index

# prefix -> module implementing that part's sanitize/DROPPED
PARTS = {
    "visual": vision_mod,
    "model": qwen2_mod,
    "vargpt_gen": infinity_mod,
    "vae_local": vae_mod,
    "image_gen_projector": projectors_mod,
    "image_gen_projector_out": projectors_mod,
}
ROOT_KEYS = ("lm_head.weight", "sos_embedding.weight")


class VARGPT(nn.Module):
    def __init__(self, config: VARGPTConfig):
        super().__init__()
        self.config = config
        H = config.llm.hidden_size
        C = config.infinity.embed_dim
        self.visual = vision_mod.VisionTransformer(config.vision)
        self.model = qwen2_mod.Qwen2Model(config.llm)
        self.lm_head = Linear(H, config.llm.vocab_size, bias=False)
        self.vargpt_gen = infinity_mod.Infinity(config.infinity)
        self.vae_local = vae_mod.BSQVAE(config.vae)
        # upstream's table has image_gen_start_token_id + 1 rows and only ever reads the last one
        # (modeling_vargpt_qwen2_vl.py ``get_sos_word_embeddings`` looks up image_gen_start): this
        # keeps that row (``sos_row``)
        self.sos_embedding = nn.Embedding(1, C)
        self.image_gen_projector = projectors_mod.GenProjector(C, C, H)
        self.image_gen_projector_out = projectors_mod.GenProjector(H, H, C)

    # ------------------------------------------------------------------ helpers
    def sos_rows(self) -> mx.array:
        """``[sos_embedding[image_gen_start]; cfg_uncond[0]]``: the (cond, uncond) start rows."""
        return mx.stack([self.sos_embedding.weight[0], self.vargpt_gen.cfg_uncond[0]])

    def rope_index(self, input_ids, image_grid_thw=None):
        """M-RoPE positions (3, B, L) and deltas of ``input_ids`` (numpy) with this model's token ids
        (``get_rope_index`` of transformers' Qwen2-VL, as upstream's prefill calls it)."""
        tok = self.config.tokens
        return get_rope_index(input_ids, image_grid_thw, None, image_token_id=tok.image_token_id,
                              video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_token_id,
                              spatial_merge_size=self.config.vision.spatial_merge_size)


def split_parts(weights: dict[str, mx.array]) -> tuple[dict[str, dict[str, mx.array]], dict[str, mx.array]]:
    """Group upstream keys by part prefix (longest prefix wins); return (parts, unmatched)."""
    parts: dict[str, dict[str, mx.array]] = {p: {} for p in PARTS}
    rest: dict[str, mx.array] = {}
    prefixes = sorted(PARTS, key=len, reverse=True)
    for k, v in weights.items():
        for p in prefixes:
            if k.startswith(p + "."):
                parts[p][k[len(p) + 1:]] = v
                break
        else:
            rest[k] = v
    return parts, rest


def sanitize(weights: dict[str, mx.array]) -> tuple[dict[str, mx.array], list[str]]:
    """Map upstream checkpoint keys to this model's parameter names.

    Returns ``(mapped, dropped)`` where ``dropped`` lists the upstream keys knowingly discarded
    (dead weights: the always-zero ``zero_k_bias`` buffers of ``infinity/models/basic.py``,
    ``text_proj_for_ca`` and the projectors' ``ln_q``, computed or built by upstream but never
    used, and the BSQ ``mask`` buffer of ``bsq_vae/multiscale_bsq.py``). Unknown keys are passed
    through so that strict loading names them.
    """
    parts, rest = split_parts(weights)
    out: dict[str, mx.array] = {}
    dropped: list[str] = []
    for prefix, sub in parts.items():
        mapped = PARTS[prefix].sanitize(dict(sub))
        # Part sanitizers keep key names (they only transpose/reshape values), so a key that
        # went in and did not come out was dropped on purpose.
        dropped += [f"{prefix}.{k}" for k in sub if k not in mapped]
        out.update({f"{prefix}.{k}": v for k, v in mapped.items()})
    out.update(rest)
    return out, dropped



def sos_row(weights: dict[str, mx.array], config: VARGPTConfig) -> dict[str, mx.array]:
    """Keep the one row of ``sos_embedding.weight`` that upstream reads (``image_gen_start``, its
    last row): the real table is 151,658 x 2048 (0.58 GiB bf16) for one 4 KiB row. A table that
    already has one row (this port's own directories) passes; any other row count is left for the
    shape check to name."""
    key, rows = "sos_embedding.weight", config.tokens.image_gen_start_token_id + 1
    t = weights.get(key)
    if t is None or rows == 1 or t.shape[0] != rows:
        return weights
    return {**weights, key: t[-1:]}


def scatter_rows(embeds: mx.array, mask: mx.array, rows: mx.array) -> mx.array:
    """Write ``rows`` (n, D) in order into the positions where ``mask`` (B, L) is true.

    The MLX equivalent of upstream's ``masked_scatter`` (differentiable in both inputs).
    """
    flat_mask = mask.reshape(-1)
    idx = mx.maximum(mx.cumsum(flat_mask.astype(mx.int32)) - 1, 0)
    gathered = rows[idx].reshape(*mask.shape, -1)
    return mx.where(mask[..., None], gathered.astype(embeds.dtype), embeds)


def embed_multimodal(model: VARGPT, input_ids: mx.array, pixel_values: mx.array | None = None,
                     image_grid_thw=None) -> mx.array:
    """Token embeddings with vision-tower features written into the ``<|image_pad|>`` slots."""
    embeds = model.model.embed_tokens(input_ids)
    if pixel_values is not None:
        feats = model.visual(pixel_values, image_grid_thw)
        mask = input_ids == model.config.tokens.image_token_id
        n_slots = int(mask.sum().item())
        if n_slots != feats.shape[0]:
            raise ValueError(
                f"prompt has {n_slots} image tokens but the images give {feats.shape[0]} features"
            )
        embeds = scatter_rows(embeds, mask, feats)
    return embeds
